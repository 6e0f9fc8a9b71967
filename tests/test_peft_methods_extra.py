"""Prefix tuning (``prefix``) and bottleneck adapters (``adapters``, Pfeiffer and Houlsby) on
fp32, bnb int8 and bnb NF4 bases of a tiny random Llama (widths multiples of 128 for bnb's
4-bit CPU kernels; vocab 384 = transformers' file-less byte-level ByT5 tokenizer).

For each method x base: a few optimizer steps on a fixed batch lower the loss; the base
weights (and quantization state) stay bit-identical; save + ``PeftModel.from_pretrained`` on
a freshly quantized base reproduces the eval logits; generation works after reload.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from qpeft.context import RunContext
from qpeft.errors import ConfigError
from qpeft.plugins.peft_adapters import Adapters, AdaptersOptions, find_block_targets, register_bottleneck
from qpeft.plugins.peft_prefix import Prefix, PrefixOptions

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

BASES = ["fp32", "int8", "nf4"]
METHODS = {
    # name: (plugin class, options, learning rate)
    "prefix": (Prefix, PrefixOptions(num_virtual_tokens=8), 5e-2),
    "pfeiffer": (Adapters, AdaptersOptions(placement="pfeiffer"), 1e-2),
    "houlsby": (Adapters, AdaptersOptions(placement="houlsby", non_linearity="gelu"), 1e-2),
}
STEPS = 5
PAD = 0
EOS = 1
VOCAB = 384


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors here are tiny: one thread is fastest, and it avoids OpenMP spin-waits that
    made these tests ~30x slower on a 2-core machine shared with other work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    path = tmp_path_factory.mktemp("tiny-llama-byt5")
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()  # bytes + 3 specials (+125 extra ids): no files, no hub


@pytest.fixture()
def ctx(tmp_path, tokenizer):
    return RunContext(config=None, device="cpu", dtype="float32", output_dir=str(tmp_path), tokenizer=tokenizer)


def load_base(path: str, base: str):
    """The tiny model as fp32, bnb int8 or bnb NF4 (fp32 compute), on CPU."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if base != "fp32":
        pytest.importorskip("bitsandbytes")
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True)
            if base == "int8"
            else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map={"": "cpu"}, **kwargs)
    if base == "nf4":
        # The engine's guard against bnb's inference-only CPU repacking (docs/architecture.md, library facts).
        from qpeft.plugins.quant_bnb import Bnb4bit

        Bnb4bit().ensure_training_kernels(model, None)
    return model


def prepare(model, base: str):
    """What the quantizer plugins do before attach (no gradient checkpointing)."""
    if base == "fp32":
        for p in model.parameters():
            p.requires_grad_(False)
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def base_state(model) -> dict[str, torch.Tensor]:
    """Every base tensor (weights, quantization state) by its name in the unwrapped model."""
    out = {}
    for key, value in model.state_dict().items():
        if "bottleneck_" in key or not isinstance(value, torch.Tensor):
            continue
        out[key.replace(".base_layer", "")] = value.detach().clone()
    return out


def fixed_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 259, (2, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in row 2
    ids[1, :5] = PAD
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def eval_logits(model, ids, mask):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


def greedy_by_forward(model, prompt, steps):
    """Greedy decoding by full forwards (no cache): the reference for ``generate``."""
    x = prompt
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(input_ids=x).logits[:, -1:].argmax(-1)
            x = torch.cat([x, nxt], dim=1)
    return x


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("method", list(METHODS))
def test_train_save_reload(method, base, tiny_path, ctx, tmp_path):
    plugin_cls, options, lr = METHODS[method]
    plugin = plugin_cls()
    plugin.check(options, ctx)
    model = prepare(load_base(tiny_path, base), base)
    before = base_state(model)

    torch.manual_seed(0)
    pm = plugin.attach(model, options, ctx)
    trainable = [p for p in pm.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in trainable)
    assert sum(p.numel() for p in trainable) < 0.05 * sum(p.numel() for p in pm.parameters())

    ids, mask, labels = fixed_batch()
    if plugin_cls is Adapters:  # up-projections start at zero: the adapted model starts as the base
        with pm.disable_adapter():
            plain = eval_logits(pm, ids, mask)
        assert torch.equal(eval_logits(pm, ids, mask), plain)

    opt = torch.optim.AdamW(trainable, lr=lr)
    pm.train()
    losses = []
    for _ in range(STEPS):
        loss = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.02, losses

    after = base_state(pm.get_base_model())
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"base tensors changed by training: {changed[:5]}"

    trained = eval_logits(pm, ids, mask)
    adapter_dir = tmp_path / "adapter"
    plugin.save(pm, str(adapter_dir))
    assert sorted(p.name for p in adapter_dir.iterdir() if p.suffix != ".md") == ["adapter_config.json", "adapter_model.safetensors"]
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["peft_type"] == ("PREFIX_TUNING" if method == "prefix" else "QPEFT_BOTTLENECK")
    del pm, model

    reloaded = plugin.load_adapter(load_base(tiny_path, base), str(adapter_dir), ctx)
    assert not any(p.requires_grad for p in reloaded.parameters())
    diff = (eval_logits(reloaded, ids, mask) - trained).abs().max().item()
    assert diff <= 1e-5, f"reload changed logits by {diff}"

    prompt = ids[:1, -8:]
    out = reloaded.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    assert out.shape[0] == 1 and 8 < out.shape[1] <= 12
    assert torch.equal(out, greedy_by_forward(reloaded, prompt, out.shape[1] - 8))
    if method == "prefix":
        # Batched with left padding, and use_cache=False (which crashes unguarded).
        batch = reloaded.generate(input_ids=ids[:, :12], attention_mask=mask[:, :12], max_new_tokens=3, do_sample=False, pad_token_id=PAD)
        assert batch.shape[0] == 2
        with pytest.warns(UserWarning, match="use_cache=True"):
            no_cache = reloaded.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, pad_token_id=PAD, use_cache=False)
        assert torch.equal(no_cache, out)


def test_prefix_reparameterized_roundtrip(tiny_path, ctx, tmp_path):
    """reparameterize saves the projected prefix: exact for inference, and training can resume on it."""
    plugin = Prefix()
    options = PrefixOptions(num_virtual_tokens=4, reparameterize=True, encoder_hidden_size=32)
    plugin.check(options, ctx)
    pm = plugin.attach(prepare(load_base(tiny_path, "fp32"), "fp32"), options, ctx)
    assert pm.peft_config["default"].prefix_projection
    ids, mask, labels = fixed_batch()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    for _ in range(2):
        pm(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    trained = eval_logits(pm, ids, mask)
    plugin.save(pm, str(tmp_path / "a"))

    for trainable in (False, True):
        again = plugin.load_adapter(load_base(tiny_path, "fp32"), str(tmp_path / "a"), ctx, trainable=trainable)
        assert any(p.requires_grad for p in again.parameters()) == trainable
        assert (eval_logits(again, ids, mask) - trained).abs().max().item() <= 1e-5
    assert any("resumes on its saved prefix" in n for n in ctx.notes)


def test_prefix_text_init_is_reading_the_text(tiny_path, ctx, tokenizer):
    """init: text starts the prefix as the model's keys/values for init_text: the adapted
    model's logits are exactly the base model's after reading that text first."""
    options = PrefixOptions(num_virtual_tokens=10, init_text="Hello, world")  # 12 bytes: cut to 10
    pm = Prefix().attach(prepare(load_base(tiny_path, "fp32"), "fp32"), options, ctx)
    assert "keys/values of 'Hello, world'" in ctx.notes[-1]
    ids = fixed_batch()[0][:1]
    text = torch.tensor([tokenizer("Hello, world", add_special_tokens=False)["input_ids"][:10]])
    adapted = eval_logits(pm, ids, torch.ones_like(ids))
    with pm.disable_adapter():
        read_first = eval_logits(pm, torch.cat([text, ids], 1), torch.ones(1, 10 + ids.shape[1], dtype=torch.long))
    torch.testing.assert_close(adapted, read_first[:, 10:], rtol=1e-4, atol=1e-4)

    # Without a tokenizer it falls back to a small normal init; "peft" keeps peft's N(0, 1).
    ctx.tokenizer = None
    pm = Prefix().attach(prepare(load_base(tiny_path, "fp32"), "fp32"), options, ctx)
    assert "normal (std 0.02), as no tokenizer" in ctx.notes[-1]
    assert pm.prompt_encoder["default"].embedding.weight.std().item() < 0.03
    pm = Prefix().attach(prepare(load_base(tiny_path, "fp32"), "fp32"), PrefixOptions(init="peft"), ctx)
    assert pm.prompt_encoder["default"].embedding.weight.std().item() > 0.5


def test_prefix_options_and_grad_checkpointing(tiny_path, ctx):
    with pytest.raises(ConfigError, match="reparameterize"):
        Prefix().check(PrefixOptions(encoder_hidden_size=64), ctx)
    model = prepare(load_base(tiny_path, "fp32"), "fp32")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(ConfigError) as err:
        Prefix().attach(model, PrefixOptions(), ctx)
    assert err.value.key == "gradient_checkpointing"


def test_orchestrator_grad_checkpointing_policy(tmp_path):
    """auto turns checkpointing off for prefix (keeps it for adapters); forcing it on is an error."""
    from qpeft.config import load_config, resolve
    from qpeft.registry import load_registry

    reg = load_registry()
    assert {"prefix", "adapters"} <= set(reg.backends["peft"])

    def resolved(peft, gc):
        cfg = load_config({"quantizer": "none", "peft": peft, "trainer": "hf", "gradient_checkpointing": gc, "output_dir": str(tmp_path)})
        return resolve(cfg, reg, device="cpu")

    assert resolved("prefix", "auto").grad_checkpointing is False
    assert resolved("adapters", "auto").grad_checkpointing is True
    with pytest.raises(ConfigError, match="prefix"):
        resolved("prefix", True)


@pytest.mark.parametrize("plugin", [Prefix(), Adapters()], ids=["prefix", "adapters"])
def test_merge_refused(plugin, tiny_path, ctx):
    assert plugin.capabilities.mergeable is False
    options = plugin.Options()
    pm = plugin.attach(prepare(load_base(tiny_path, "fp32"), "fp32"), options, ctx)
    with pytest.raises(NotImplementedError, match="qpeft generate --adapter"):
        plugin.merge(pm)
    if isinstance(plugin, Adapters):
        with pytest.raises(NotImplementedError, match="non-linear"):
            pm.merge_and_unload()
        assert not any("bottleneck" in n for n, _ in pm.unload().named_modules())


def test_adapters_targets(tiny_path, ctx):
    model = load_base(tiny_path, "fp32")
    assert find_block_targets(model, "pfeiffer") == ["mlp"]
    assert find_block_targets(model, "houlsby") == ["mlp", "self_attn"]
    with pytest.raises(ConfigError, match="no module named 'ffn_out'"):
        Adapters().attach(model, AdaptersOptions(target_modules=["ffn_out"]), ctx)
    pm = Adapters().attach(model, AdaptersOptions(target_modules=["layers.1.mlp"], reduction_factor=4), ctx)
    wrapped = [n for n, m in pm.named_modules() if type(m).__name__ == "BottleneckLayer"]
    assert wrapped == ["base_model.model.model.layers.1.mlp"]
    assert pm.peft_config["default"].hidden_size == 128
    assert pm.base_model.model.model.layers[1].mlp.bottleneck_down["default"].out_features == 32

    no_ffn = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no feed-forward block"):
        find_block_targets(no_ffn, "pfeiffer")


def test_adapters_registration_idempotent():
    import importlib

    import peft
    from peft.utils import PeftType

    import qpeft.plugins.peft_adapters as mod

    first = register_bottleneck()
    assert register_bottleneck() is first
    reloaded = importlib.reload(mod)  # a second copy of the module must reuse the registration
    try:
        assert reloaded.register_bottleneck()["BottleneckConfig"] is first["BottleneckConfig"]
    finally:
        reloaded._impl = first
    assert list(PeftType).count("QPEFT_BOTTLENECK") == 1
    assert PeftType("QPEFT_BOTTLENECK") is PeftType.QPEFT_BOTTLENECK
    config = peft.PeftConfig.from_peft_type(peft_type="QPEFT_BOTTLENECK", reduction_factor=8)
    assert type(config) is first["BottleneckConfig"] and config.reduction_factor == 8


FRESH_PROCESS = """
import sys, torch
from transformers import AutoModelForCausalLM
from qpeft.context import RunContext
from qpeft.plugins.peft_adapters import Adapters
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
model = Adapters().load_adapter(base, sys.argv[2], RunContext(None, "cpu", "float32", "."))
model.eval()
with torch.no_grad():
    logits = model(input_ids=torch.load(sys.argv[3])).logits
torch.save(logits, sys.argv[4])
"""


def test_adapters_reload_in_fresh_process(tiny_path, ctx, tmp_path):
    """A new process (like `qpeft generate`) registers the method before peft reads the adapter."""
    pm = Adapters().attach(prepare(load_base(tiny_path, "fp32"), "fp32"), AdaptersOptions(init_scale=0.5), ctx)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "bottleneck_up" in name:
                p.normal_(std=0.1)
    ids = fixed_batch()[0][:1]
    expected = eval_logits(pm, ids, torch.ones_like(ids))
    pm.save_pretrained(tmp_path / "a")
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, tiny_path, str(tmp_path / "a"), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        check=True,
        capture_output=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    got = torch.load(tmp_path / "out.pt")
    assert (got - expected).abs().max().item() <= 1e-5
    with pm.disable_adapter():  # and the adapter does change the output
        assert (expected - eval_logits(pm, ids, torch.ones_like(ids))).abs().max().item() > 1e-3
