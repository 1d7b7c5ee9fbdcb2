_base_ = './faster-rcnn_r50_fpn_coco128.py'

# BlockSwap student of the faster-rcnn_r50_fpn_coco128.py teacher: at the start of training
# BlockSwapHook searches the backbone on one training minibatch, puts the best
# candidate in place and distils it from the trained teacher by attention
# transfer. Train the teacher first: python tools/train.py faster-rcnn_r50_fpn_coco128.py
custom_imports = dict(
    imports=['blockswap_plugin.mmdet'], allow_failed_imports=False)
custom_hooks = [
    dict(
        type='BlockSwapHook',
        budget=0.6,
        num_samples=20,
        seed=0,
        teacher_checkpoint='work_dirs/faster-rcnn_r50_fpn_coco128/iter_200.pth',
        distill=dict(at_weight=1000.0, neck_weight=0.0))
]
