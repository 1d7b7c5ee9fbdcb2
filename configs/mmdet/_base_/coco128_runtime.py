# mmdet's default runtime with iteration-based logging and checkpoints, and
# gloo for distributed runs, which work on CPU.
_base_ = 'mmdet::_base_/default_runtime.py'

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10),
    checkpoint=dict(
        type='CheckpointHook', by_epoch=False, interval=200, max_keep_ckpts=1))
log_processor = dict(type='LogProcessor', window_size=10, by_epoch=False)
env_cfg = dict(dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)

# mmengine's default DDP wrapper passes device_ids, which torch rejects for a
# model on the CPU. This wrapper from blockswap_plugin.mmdet drops them there.
custom_imports = dict(
    imports=['blockswap_plugin.mmdet'], allow_failed_imports=False)
model_wrapper_cfg = dict(type='mmdet.AnyDeviceDistributedDataParallel')
# mmengine's pytorch launcher calls torch.cuda.set_device, which fails without
# a GPU; this runner starts the gloo process group on the CPU first.
runner_type = 'mmdet.AnyDeviceRunner'
