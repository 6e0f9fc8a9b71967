"""native's activation_offload (qpeft.memory.offload): the checkpointed layers' inputs go to host memory
and come back; losses and the trained adapter are exactly those of the run without it."""

import pytest
import torch
from safetensors.torch import load_file

from qpeft import orchestrator
from qpeft.errors import ConfigError
from qpeft.memory.offload import ActivationOffload
from qpeft.registry import load_registry


@pytest.fixture(scope="module")
def registry():
    return load_registry()


@pytest.fixture(scope="module")
def tiny_config_module(tiny_llama_path, tmp_path_factory):
    """conftest's tiny_config, for module-scoped runs."""

    def make(**overrides) -> dict:
        cfg = {
            "model": {"name_or_path": tiny_llama_path},
            "quantizer": {"name": "bnb-nf4"},
            "peft": {"name": "lora", "options": {"r": 8, "alpha": 16}},
            "data": {"path": "embedded:instruct", "max_length": 96, "max_train_examples": 24, "max_val_examples": 4},
            "seed": 0,
        }
        cfg.update(overrides)
        return cfg

    return make


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


@pytest.fixture(scope="module")
def plain(tiny_config_module, registry, tmp_path_factory):
    return _run(tiny_config_module, registry, tmp_path_factory.mktemp("plain"))


@pytest.mark.parametrize(
    "options,note",
    [
        ({"activation_offload": True}, "activation offloading to pinned CPU memory (the inputs of 2 checkpointed layers)"),
        # memory-budget mode with an explicit count (qpeft.memory.activations): one layer not recomputed
        ({"keep_activations": 1}, "keep_activations: 1 of 2 decoder layers keep their activations"),
    ],
    ids=["offload", "keep-1"],
)
def test_memory_options_train_exactly_as_the_plain_run(plain, tiny_config_module, registry, tmp_path, options, note):
    s_plain, w_plain = plain
    s, w = _run(tiny_config_module, registry, tmp_path, **options)
    assert [h["loss"] for h in s["loss_history"]] == [h["loss"] for h in s_plain["loss_history"]]
    assert w.keys() == w_plain.keys()
    assert all(torch.equal(w[k], w_plain[k]) for k in w_plain)
    assert any(note in n for n in s["notes"]), s["notes"]


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
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 64, generator=g))
    frozen = torch.nn.Parameter(torch.randn(64, 64, generator=g), requires_grad=False)
    x = torch.randn(8, 64, generator=g, requires_grad=True)

    def x_grad(offload):
        x.grad = w.grad = None
        with offload if offload else torch.enable_grad():
            y = (((x * 2) @ w) @ frozen).sum()  # saved: x * 2 (for w's gradient), w and frozen
        y.backward()
        return x.grad.clone(), w.grad.clone()

    ref = x_grad(None)
    offload = ActivationOffload()
    got = x_grad(offload)
    saved = [tuple(r.host.shape) for r in offload.records]
    assert saved == [(8, 64)], saved  # the activation; neither weight
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])


@pytest.mark.parametrize(
    "options,gc,key",
    [
        ({"activation_offload": True}, False, "activation_offload"),
        ({"keep_activations": "auto"}, False, "keep_activations"),
        ({"keep_activations": -1}, True, "keep_activations"),
        ({"keep_activations": 2, "activation_offload": True}, True, "keep_activations"),
    ],
)
def test_memory_options_refused_where_they_cannot_work(tiny_config, registry, options, gc, key):
    cfg = tiny_config(trainer={"name": "native", "options": options}, gradient_checkpointing=gc)
    with pytest.raises(ConfigError, match=f"trainer.options.{key}"):
        orchestrator.prepare(cfg, registry=registry)


def test_memory_budget_arithmetic():
    from qpeft.memory.activations import extrapolate, layers_that_fit

    gib = 2**30
    assert layers_that_fit(80 * gib, 20 * gib, 2.5 * gib, 32) == 24
    assert layers_that_fit(80 * gib, 20 * gib, 1 * gib, 32) == 32  # never more than the model has
    assert layers_that_fit(10 * gib, 12 * gib, 1 * gib, 32) == 0
    assert extrapolate((256, 512), (1.0, 2.0), 4096) == pytest.approx(16.0)  # linear
    assert extrapolate((256, 512), (1.0, 4.0), 1024) == pytest.approx(16.0)  # quadratic stays quadratic
    assert extrapolate((256, 512), (1.0, 1.5), 1024) == pytest.approx(3.0)  # never below linear


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


@pytest.mark.gpu
@pytest.mark.parametrize("budget,expect", [(0.9, "2 of 2"), (1e-4, "0 of 2")])
def test_keep_activations_auto_on_cuda(tiny_config_module, registry, tmp_path, budget, expect):
    """auto measures one layer and the first step, then keeps what fits: on a whole card the
    tiny model keeps both layers; with a budget below its weights, none. Losses as without."""
    model = {"name_or_path": tiny_config_module()["model"]["name_or_path"], "device": "cuda"}
    tiny = lambda **kw: tiny_config_module(model=model, **kw)  # noqa: E731
    s_plain, _ = _run(tiny, registry, tmp_path / "plain")
    s, _ = _run(tiny, registry, tmp_path / "auto", keep_activations="auto", memory_budget=budget)
    note = next(n for n in s["notes"] if "keep_activations auto" in n)
    assert f"{expect} decoder layers" in note, note
    for a, b in zip(s["loss_history"], s_plain["loss_history"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-3 * abs(b["loss"]), (s["loss_history"], s_plain["loss_history"])
