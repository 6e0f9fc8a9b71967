"""Test support, imported at start-up by every Python process whose PYTHONPATH begins with this
folder and that has QPEFT_FSDP_ON_CPU=1: lets accelerate run FSDP on CPU processes, so that CI
(which has no GPU) runs qpeft's FSDP path for real.

accelerate turns FSDP on only for accelerator backends: on CPU it quietly falls back to DDP
(MULTI_CPU) although torch's FSDP2 (fully_shard) runs on CPU over gloo. This keeps the FSDP
plugin accelerate built from the launch environment, as it does on GPUs; accelerate then
prepares the model with fully_shard and torch shards it, unchanged. qpeft's own "FSDP needs a
GPU" refusal is lifted for the same processes. The GPU test (tests/test_fsdp.py) runs without it.
"""

import os

if os.environ.get("QPEFT_FSDP_ON_CPU") == "1":
    import accelerate.state
    from accelerate.utils import DistributedType

    _init = accelerate.state.AcceleratorState.__init__

    def _init_keeping_fsdp(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = plugin

    accelerate.state.AcceleratorState.__init__ = _init_keeping_fsdp

    import qpeft.config

    _check = qpeft.config.check_fsdp

    def _check_as_on_gpu(ctx, *args, **kwargs):
        device, ctx.device = ctx.device, "cuda"
        try:
            _check(ctx, *args, **kwargs)
        finally:
            ctx.device = device

    qpeft.config.check_fsdp = _check_as_on_gpu
