_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    './_base_/coco128_detection.py',
    './_base_/coco128_schedule.py',
    './_base_/coco128_runtime.py',
]

# RetinaNet ResNet-18 FPN teacher on COCO128, trained from scratch on CPU: no pretrained
# backbone (init_cfg=None), so no stage is frozen and BatchNorm statistics train.
model = dict(
    backbone=dict(
        depth=18, frozen_stages=-1, norm_eval=False, init_cfg=None),
    neck=dict(in_channels=[64, 128, 256, 512]))
