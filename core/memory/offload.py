"""Activation offloading: the tensors a forward pass saves for backward outside checkpointed
layers — with gradient checkpointing, chiefly each decoder layer's input, which the checkpoint
keeps until backward recomputes the layer — move to pinned CPU memory while the forward goes on,
and come back just before backward needs them.

``with ActivationOffload(): loss = model(...)`` (the backward pass may run outside the block).
PyTorch's own ``torch.autograd.graph.save_on_cpu`` does the same but copies synchronously (the
host waits for every copy, so kernel launches stop running ahead of the GPU) and fetches each
tensor only when backward reaches it. Here, on CUDA:

* the copy to the host runs on a side stream after the producing kernels, and the caching
  allocator does not reuse the GPU tensor until the copy is done (``record_stream``): the
  forward never waits for a copy;
* in backward, fetching tensor *k* starts the copy of tensor *k - 1* (saved just before it, so
  needed next), overlapping it with tensor *k*'s layer recompute and backward.

Torch's non-reentrant checkpoint saves a layer's inputs through the saved-tensor hooks active
around the layer call, and the tensors saved inside the layer through its own inner hooks
(recomputed, never stored): so these hooks see exactly the checkpoint inputs and what lies
outside the checkpointed layers. Parameters and tensor subclasses are never offloaded, nor
tensors under ``min_bytes`` on CUDA (positions, masks: their copies would cost more than they save). On CPU every saved
tensor is copied once and returned unchanged, so tests can check exactness of the mechanism.
"""

from __future__ import annotations

from typing import Any

#: Saved tensors smaller than this stay on the GPU.
MIN_BYTES = 1 << 20


class _Offloaded:
    """One saved tensor's host copy (and, while fetched, its device copy)."""

    __slots__ = ("device", "host", "forward", "index", "gpu", "ready")

    def __init__(self, device, host, forward: int, index: int):
        self.device, self.host, self.forward, self.index = device, host, forward, index
        self.gpu = self.ready = None


class ActivationOffload:
    """A ``torch.autograd.graph.saved_tensors_hooks`` context that offloads saved activations
    (see the module docstring). ``offloaded_bytes`` counts what the last block moved; one
    instance may be entered once per forward pass (micro-batch)."""

    def __init__(self, min_bytes: int = MIN_BYTES):
        import torch

        self.min_bytes = min_bytes
        self.records: list[_Offloaded] = []  # of the last forward pass, in the order saved
        self.forwards = 0
        self.offloaded_bytes = 0
        self.stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self._hooks: Any = None

    def __enter__(self) -> ActivationOffload:
        import torch

        self.records, self.offloaded_bytes = [], 0
        self.forwards += 1
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None

    def _pack(self, tensor):
        import torch

        cuda = tensor.device.type == "cuda"
        nbytes = tensor.numel() * tensor.element_size()
        # Only plain dense activations: parameters (trainable or frozen, e.g. bitsandbytes'
        # Params4bit) stay where they are, and so do tensor subclasses, whose layout a plain
        # host copy would lose.
        if type(tensor) is not torch.Tensor or tensor.layout != torch.strided or (tensor.requires_grad and tensor.is_leaf):
            return tensor
        if tensor.device.type not in ("cuda", "cpu") or (cuda and nbytes < self.min_bytes):
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=cuda)
        if cuda:
            stream = self.stream
            stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(stream):
                host.copy_(tensor, non_blocking=True)
            tensor.record_stream(stream)  # its memory is not reused before the copy is done
        else:
            host.copy_(tensor)
        record = _Offloaded(tensor.device, host, self.forwards, len(self.records))
        self.records.append(record)
        self.offloaded_bytes += nbytes
        return record

    def _fetch(self, record: _Offloaded) -> None:
        import torch

        if record.gpu is not None:
            return
        with torch.cuda.stream(self.stream):
            record.gpu = record.host.to(record.device, non_blocking=True)
            record.ready = torch.cuda.Event()
            record.ready.record(self.stream)

    def _unpack(self, packed):
        import torch

        if isinstance(packed, torch.Tensor):
            return packed
        if packed.device.type != "cuda":
            return packed.host
        self._fetch(packed)
        current = torch.cuda.current_stream(packed.device)
        current.wait_event(packed.ready)
        tensor, packed.gpu = packed.gpu, None
        tensor.record_stream(current)
        if packed.forward == self.forwards and packed.index > 0:
            self._fetch(self.records[packed.index - 1])  # needed next by backward: its copy overlaps this layer's work
        return tensor
