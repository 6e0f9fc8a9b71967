"""native's mlp_chunk (qpeft.memory.tiled_mlp): each decoder layer's gated MLP runs a tile of tokens at a
time, recomputed in backward. The same loss and gradients (up to float summation order), no MLP
intermediate of more than one tile kept for backward, undone after training."""

import pytest
import torch

from qpeft import orchestrator
from qpeft.errors import ConfigError
from qpeft.memory.tiled_mlp import gated_mlps, tile_mlps
from qpeft.registry import load_registry


def _model(path, *, checkpointing: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"))
    model.train()
    return model


def _loss_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks in both runs (per tile: the checkpoint replays them)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_tiled_mlp_gives_the_same_loss_and_gradients(tiny_llama_path, checkpointing):
    model = _model(tiny_llama_path, checkpointing=checkpointing)
    x = torch.randint(3, 1000, (2, 40))
    for module in model.modules():  # dropout masks differ with the tile shapes: compare without
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    loss, ref = _loss_and_grads(model, x)
    n, undo = tile_mlps(model, 16)  # 80 tokens: tiles of 16
    assert n == model.config.num_hidden_layers
    tiled_loss, got = _loss_and_grads(model, x)
    undo()
    torch.testing.assert_close(tiled_loss, loss, rtol=1e-5, atol=1e-6)
    assert ref.keys() == got.keys() and any("mlp" in k for k in ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
    # undone: the class forward again, and the loss of the untiled model
    assert all("forward" not in mlp.__dict__ for mlp in gated_mlps(model))
    assert torch.equal(_loss_and_grads(model, x)[0], loss)


def test_tiles_keep_only_their_inputs_for_backward(tiny_llama_path):
    """What backward keeps: untiled, tensors of all 80 tokens × the MLP's width; tiled, none of
    that width (each tile's checkpoint keeps its input and recomputes the rest in backward)."""
    model = _model(tiny_llama_path, checkpointing=False)
    width = model.config.intermediate_size
    x = torch.randint(3, 1000, (2, 40))
    weights = {p.data_ptr() for p in model.parameters()}  # down_proj's weight is saved too: not an activation

    def widest_rows() -> int:
        rows = []

        def pack(t):
            if t.dim() >= 2 and t.shape[-1] == width and t.data_ptr() not in weights:
                rows.append(t.numel() // width)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=x, labels=x).loss.backward()
        return max(rows, default=0)

    assert widest_rows() == 80
    _, undo = tile_mlps(model, 16)
    assert widest_rows() == 0
    undo()
    with torch.no_grad():  # no gradients recorded: the plain forward, untiled
        _, undo = tile_mlps(model, 16)
        model(input_ids=x)
        undo()


def test_mixture_of_experts_blocks_are_not_tiled():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
    )
    model = MixtralForCausalLM(cfg)
    assert gated_mlps(model) == []
    assert tile_mlps(model, 16)[0] == 0


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def test_native_run_with_mlp_chunk(tiny_config, registry, tmp_path):
    """A training run tiles the MLPs (noted), trains as the plain run does, and leaves the model
    untiled for evaluation and generation."""

    def run(out, **opts):
        cfg = tiny_config(
            trainer={"name": "native", "options": {"batch_size": 2, "max_steps": 3, "lr": 3e-3, **opts}},
            evaluate=False,
            output_dir=str(out),
            generate={"max_new_tokens": 2},
        )
        cfg["data"]["max_train_examples"] = 6
        resolved, reg = orchestrator.prepare(cfg, registry=registry)
        return orchestrator.run(resolved, reg)

    plain = run(tmp_path / "plain")
    tiled = run(tmp_path / "tiled", mlp_chunk=32)
    assert any("tiled MLP in 2 decoder layers (32 tokens per tile" in n for n in tiled["notes"]), tiled["notes"]
    for a, b in zip(plain["loss_history"], tiled["loss_history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert tiled["reload_max_abs_logit_diff"] <= 1e-4


def test_mlp_chunk_is_validated(tiny_config, registry):
    cfg = tiny_config(trainer={"name": "native", "options": {"mlp_chunk": 4}})
    with pytest.raises(ConfigError, match=r"trainer.options.mlp_chunk"):
        orchestrator.prepare(cfg, registry=registry)


@pytest.mark.gpu
def test_tiled_mlp_lowers_peak_memory_on_cuda():
    """A long row on CUDA in bfloat16: the same loss, and a lower peak (the MLP intermediates of
    one tile instead of the whole row in the recompute of each checkpointed layer)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=1024, hidden_size=512, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"))
    model.train()
    x = torch.randint(3, 1000, (1, 16384), device="cuda")

    def step():
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.cuda.synchronize()
        return float(loss), torch.cuda.max_memory_allocated()

    loss, peak = step()
    _, undo = tile_mlps(model, 2048)
    tiled_loss, tiled_peak = step()
    undo()
    assert tiled_loss == pytest.approx(loss, rel=1e-2)
    # untiled, one layer's recompute holds 16384 × 4096 × (gate, up, act, product) in bfloat16: 512 MiB
    assert tiled_peak < peak - 256 * 2**20, (peak / 2**30, tiled_peak / 2**30)
