"""How qpeft counts a model's weight storage and parameters, whatever a quantizer stores.

**Storage** (:func:`held_bytes`): the bytes of every tensor the model holds, each storage counted
once. "Holds" means: parameters and buffers, tensors kept as plain attributes of a module
(``module.codes = tensor``, also inside lists, tuples, dicts and small objects such as
bitsandbytes' ``QuantState``), and tensors hanging off a parameter (``weight.quant_state.absmax``,
``weight.SCB``). A tensor subclass (torchao's quantized tensors) counts by its inner tensors; two
tensors sharing a storage (tied embeddings, bitsandbytes' ``CB`` and ``weight.data``) count once.

**Parameters** (:func:`parameter_counts`): the *logical* size of the model, so that a quantized
model reports what its float original has. A linear-like module (``torch.nn.Linear``, or any
module with ``in_features`` and ``out_features`` whose class name ends in ``Linear``) that stores
its weight in another form (packed codes in a parameter or buffer, scales and zero points in
buffers) counts ``in_features × out_features`` plus its bias, once, however many tensors hold
it; bitsandbytes' 4-bit parameters count by their original shape (``quant_state.shape``);
every other parameter counts its ``numel()``; buffers (scales, rotary tables) are not parameters.
A quantizer whose layers hold something else reports its own counts by overriding
:meth:`qpeft.api.QuantizerPlugin.storage_bytes` / :meth:`~qpeft.api.QuantizerPlugin.count_parameters`.
"""

from __future__ import annotations

from collections.abc import Iterator

#: Attribute containers of ``torch.nn.Module`` that are walked separately (or hold no tensors).
_MODULE_INTERNALS = frozenset(
    {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_state_dict_hooks", "_load_state_dict_pre_hooks"}
)


def _inner(t) -> list:
    """The tensors a tensor subclass stores (itself for a plain tensor)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return [x for n in names if getattr(t, n, None) is not None for x in _inner(getattr(t, n))]
    return [t]


def _tensors_in(obj, depth: int, seen: set[int]) -> Iterator:
    """Tensors reachable from a non-module attribute value (depth-limited, cycle-safe)."""
    import torch

    if depth < 0 or id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None), torch.nn.Module)):
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
        extra = getattr(obj, "__dict__", None) or {}
        for value in extra.values():  # quant_state, CB/SCB, ...
            yield from _tensors_in(value, depth - 1, seen)
    elif isinstance(obj, dict):
        for value in list(obj.values()):
            yield from _tensors_in(value, depth - 1, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for value in list(obj):
            yield from _tensors_in(value, depth - 1, seen)
    elif hasattr(obj, "__dict__") and not callable(obj) and type(obj).__module__.split(".")[0] not in ("builtins", "functools"):
        for value in list(vars(obj).values()):
            yield from _tensors_in(value, depth - 1, seen)


def held_tensors(model) -> Iterator:
    """Every tensor ``model`` holds (see the module docstring), subclasses flattened; may repeat
    tensors and storages (:func:`held_bytes` counts each storage once)."""
    for module in model.modules():
        seen: set[int] = set()
        for t in list(module._parameters.values()) + list(module._buffers.values()):
            if t is not None:
                for x in _tensors_in(t, 3, seen):
                    yield from _inner(x)
        for key, value in list(vars(module).items()):
            if key not in _MODULE_INTERNALS:
                for x in _tensors_in(value, 3, seen):
                    yield from _inner(x)


def held_bytes(model) -> int:
    """Bytes of every storage ``model`` holds, each counted once (meta tensors hold none)."""
    total, storages = 0, set()
    for t in held_tensors(model):
        if t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        key = (t.device.type, t.device.index, storage.data_ptr())
        if key not in storages:
            storages.add(key)
            total += storage.nbytes()
    return total


def is_linear_like(module) -> bool:
    """``torch.nn.Linear``, or a quantized linear layer that keeps ``in_features``/``out_features``
    (GPTQ's QuantLinear, bitsandbytes' layers, a plugin's own)."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return True
    return type(module).__name__.endswith("Linear") and hasattr(module, "in_features") and hasattr(module, "out_features")


def _logical_numel(p) -> int:
    state = getattr(p, "quant_state", None)
    shape = getattr(state, "shape", None)
    return int(shape.numel()) if shape is not None else p.numel()


def _stores_weight_in_another_form(module) -> bool:
    """A linear-like module whose own tensors are not a plain float weight of its logical shape."""
    if not is_linear_like(module):
        return False
    own = [t for t in list(module._parameters.values()) + list(module._buffers.values()) if t is not None]
    if not own:
        return False  # a wrapper (peft's lora.Linear): its children hold the tensors
    weight = module._parameters.get("weight")
    if weight is not None and weight.is_floating_point() and getattr(weight, "quant_state", None) is None:
        return _logical_numel(weight) != module.in_features * module.out_features
    return not (weight is not None and getattr(weight, "quant_state", None) is not None)


def parameter_counts(model) -> tuple[int, int]:
    """``(trainable, total)`` parameters at their logical size (see the module docstring)."""
    trainable = total = 0
    seen: set[int] = set()  # tied weights (embeddings and output head) count once
    for module in model.modules():
        own = [p for p in module._parameters.values() if p is not None and id(p) not in seen]
        seen.update(id(p) for p in own)
        trainable += sum(_logical_numel(p) for p in own if p.requires_grad)
        if _stores_weight_in_another_form(module):
            bias = module._parameters.get("bias")
            if bias is None:
                bias = module._buffers.get("bias")
            total += module.in_features * module.out_features + (bias.numel() if bias is not None else 0)
        else:
            total += sum(_logical_numel(p) for p in own)
    return trainable, total
