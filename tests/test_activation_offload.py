"""native's activation_offload (qpeft.offload): the checkpointed layers' inputs go to host memory
and come back; losses and the trained adapter are exactly those of the run without it."""

import pytest
import torch
from safetensors.torch import load_file

from qpeft import orchestrator
from qpeft.errors import ConfigError
from qpeft.offload import ActivationOffload
from qpeft.registry import load_registry


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def _run(tiny_config, registry, tmp_path, **opts):
    cfg = tiny_config(
        trainer={"name": "native", "options": {"batch_size": 2, "grad_accum": 2, "max_steps": 3, "lr": 3e-3, **opts}},
        evaluate=False,
        output_dir=str(tmp_path),
        generate={"max_new_tokens": 2},
    )
    cfg["data"]["max_train_examples"] = 12
    cfg["peft"]["options"]["dropout"] = 0.1  # the recompute must replay the dropout masks of the offloaded run
    resolved, reg = orchestrator.prepare(cfg, registry=registry)
    s = orchestrator.run(resolved, reg)
    return s, load_file(tmp_path / "adapter" / "adapter_model.safetensors")


def test_offloaded_run_equals_the_plain_one(tiny_config, registry, tmp_path):
    plain, w_plain = _run(tiny_config, registry, tmp_path / "plain")
    off, w_off = _run(tiny_config, registry, tmp_path / "offload", activation_offload=True)
    assert [h["loss"] for h in off["loss_history"]] == [h["loss"] for h in plain["loss_history"]]
    assert w_off.keys() == w_plain.keys()
    assert all(torch.equal(w_off[k], w_plain[k]) for k in w_plain)
    assert any("activation offloading" in n and "2 checkpointed layers" in n for n in off["notes"]), off["notes"]


def test_offload_catches_each_checkpointed_layer_input(tiny_llama_path):
    """What is offloaded: each decoder layer's input (the checkpoint keeps it) and what lies
    outside the checkpointed layers; gradients through them equal the plain ones exactly."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad_("q_proj" in name or "down_proj" in name)
    x = torch.randint(3, 1000, (2, 32))
    hidden = model.config.hidden_size

    def grads(offload):
        model.zero_grad(set_to_none=True)
        with offload if offload else torch.enable_grad():
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    loss, ref = grads(None)
    offload = ActivationOffload()
    loss_off, got = grads(offload)
    assert torch.equal(loss, loss_off) and all(torch.equal(ref[n], got[n]) for n in ref)
    layer_inputs = [r for r in offload.records if tuple(r.host.shape) == (2, 32, hidden)]
    assert len(layer_inputs) >= model.config.num_hidden_layers, [tuple(r.host.shape) for r in offload.records]
    assert offload.offloaded_bytes >= model.config.num_hidden_layers * 2 * 32 * hidden * 4


def test_parameters_stay_put():
    w = torch.nn.Parameter(torch.randn(64, 64))
    frozen = torch.nn.Parameter(torch.randn(64, 64), requires_grad=False)
    x = torch.randn(8, 64, requires_grad=True)
    h = x * 2  # an activation (not a leaf)
    with ActivationOffload() as offload:
        y = ((h @ w) @ frozen).sum()
    y.backward()
    saved = [tuple(r.host.shape) for r in offload.records]
    assert (8, 64) in saved and (64, 64) not in saved, saved  # h and h @ w offloaded, the weights not
    assert torch.allclose(x.grad, 2 * (frozen.sum(1) @ w.T).expand(8, 64))


def test_offload_needs_gradient_checkpointing(tiny_config, registry, tmp_path):
    cfg = tiny_config(trainer={"name": "native", "options": {"activation_offload": True}}, gradient_checkpointing=False)
    with pytest.raises(ConfigError, match="trainer.options.activation_offload"):
        orchestrator.prepare(cfg, registry=registry)


@pytest.mark.gpu
def test_offload_on_cuda_equals_plain_and_frees_memory(tiny_llama_path):
    """On CUDA the copies run on a side stream with prefetch: same gradients, and the saved
    layer inputs no longer count in the memory held between forward and backward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.bfloat16).cuda()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad_("q_proj" in name)
    x = torch.randint(3, 1000, (4, 2048), device="cuda")

    def grads(offload):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        with offload if offload else torch.enable_grad():
            out = model(input_ids=x, labels=x)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        out.loss.backward()
        torch.cuda.synchronize()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, held

    loss, ref, held = grads(None)
    loss_off, got, held_off = grads(ActivationOffload(min_bytes=0))
    assert torch.equal(loss, loss_off) and all(torch.equal(ref[n], got[n]) for n in ref)
    layer_inputs = model.config.num_hidden_layers * 4 * 2048 * model.config.hidden_size * 2
    assert held - held_off >= 0.9 * layer_inputs, (held, held_off, layer_inputs)


def test_offload_with_compiled_layers(tiny_llama_path):
    """native's `compile` compiles each decoder layer (checkpoint inside the compiled region): the
    hooks still see the layer inputs (AOTAutograd saves them through them) and change nothing.
    The aot_eager backend keeps the test short; inductor gave the same on this CPU by hand."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_layers import GradientCheckpointingLayer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad_("q_proj" in name)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile(backend="aot_eager")
    x = torch.randint(3, 1000, (2, 32))

    def grads(offload):
        model.zero_grad(set_to_none=True)
        with offload if offload else torch.enable_grad():
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    try:
        loss, ref = grads(None)
        offload = ActivationOffload()
        loss_off, got = grads(offload)
    finally:
        for layer in layers:
            layer._compiled_call_impl = None
    assert torch.equal(loss, loss_off) and all(torch.equal(ref[n], got[n]) for n in ref)
    hidden = model.config.hidden_size
    assert sum(tuple(r.host.shape) == (2, 32, hidden) for r in offload.records) >= len(layers)
