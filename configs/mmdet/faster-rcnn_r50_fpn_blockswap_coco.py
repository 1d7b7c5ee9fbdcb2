_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'

# BlockSwap student of mmdet's faster-rcnn_r50_fpn_1x_coco.py on COCO 2017 (data in
# data/coco/ as mmdet expects). The teacher is a detector trained with that
# config; the student trains from scratch, so no pretrained backbone is loaded.
custom_imports = dict(
    imports=['blockswap_plugin.mmdet'], allow_failed_imports=False)
model = dict(backbone=dict(init_cfg=None))
custom_hooks = [
    dict(
        type='BlockSwapHook',
        budget=0.6,
        num_samples=1000,
        seed=0,
        teacher_checkpoint='work_dirs/faster-rcnn_r50_fpn_1x_coco/epoch_12.pth',
        distill=dict(at_weight=1000.0, neck_weight=0.0))
]
