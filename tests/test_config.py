"""Config validation: every bad input is a one-line error naming the key, before any weight loads."""

import subprocess
import sys
import time

import pytest
import yaml

from qpeft.api import Capabilities, PeftPlugin
from qpeft.config import apply_overrides, check_combination, load_config, resolve
from qpeft.errors import ConfigError
from qpeft.registry import load_registry

BASE = {"quantizer": "bnb-nf4", "peft": "lora", "trainer": "hf"}


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def _resolve(registry, data, sets=()):
    return resolve(load_config(data, list(sets)), registry, device="cpu")


def _error(registry, data, sets=()) -> str:
    with pytest.raises(ConfigError) as exc:
        _resolve(registry, data, sets)
    return str(exc.value)


def test_shorthands_and_defaults(registry):
    r = _resolve(registry, BASE)
    assert (r.quantizer.name, r.peft.name, r.trainer.name) == ("bnb-nf4", "lora", "hf")
    assert r.config.model.name_or_path == "smollm2"
    assert r.config.model.trust_remote_code is False
    assert r.dtype == "float32" and r.grad_checkpointing is True
    assert r.peft_options.r == 16


def test_set_overrides_types_and_nesting(registry):
    r = _resolve(registry, BASE, ["trainer.options.lr=1e-4", "peft.options.r=4", "quantizer=bnb-8bit", "model=/x/y"])
    assert r.trainer_options.lr == pytest.approx(1e-4)
    assert r.peft_options.r == 4
    assert r.quantizer.name == "bnb-8bit"
    assert r.config.model.name_or_path == "/x/y"


def test_resolved_config_round_trips(registry):
    r = _resolve(registry, BASE, ["peft.options.r=4"])
    again = _resolve(registry, yaml.safe_load(yaml.safe_dump(r.to_dict())))
    assert again.to_dict() == r.to_dict()


@pytest.mark.parametrize(
    "data,sets,key,fragment",
    [
        (BASE, ["quantizer=gptqq"], "quantizer.name", "unknown quantizer 'gptqq'"),
        (BASE, ["peft=loar"], "peft.name", "did you mean 'lora'"),
        (BASE, ["trainer=xx"], "trainer.name", "valid: dpo, grpo, hf"),
        (BASE, ["quantizer.options.double_quant=maybe"], "quantizer.options.double_quant", "valid boolean"),
        (BASE, ["peft.options.r=0"], "peft.options.r", "greater than or equal to 1"),
        (BASE, ["peft.options.rank=8"], "peft.options.rank", "unknown key 'rank'"),
        (BASE, ["quantizer.options.quant_type=fp4"], "quantizer.options.quant_type", "unknown key"),
        (BASE, ["trainer.options.lr=fast"], "trainer.options.lr", "valid number"),
        (BASE, ["seed=-1"], "seed", "greater than or equal to 0"),
        (BASE, ["data.max_length=1"], "data.max_length", "greater than or equal to 8"),
        (BASE, ["model.dtype=float8"], "model.dtype", "'auto', 'float32', 'bfloat16' or 'float16'"),
        (BASE, ["outptu_dir=x"], "outptu_dir", "did you mean 'output_dir'"),
        ({"quantizer": "none", "peft": "lora"}, [], "trainer", "required key is missing"),
    ],
)
def test_bad_values_name_the_key(registry, data, sets, key, fragment):
    msg = _error(registry, data, sets)
    assert msg.startswith(key + ":"), msg
    assert fragment in msg, msg
    assert "\n" not in msg


def test_cuda_only_option_on_cpu(registry):
    msg = _error(registry, {**BASE, "quantizer": {"name": "bnb-8bit", "options": {"cpu_offload": True}}})
    assert msg.startswith("quantizer.options.cpu_offload:") and "cuda" in msg


def test_incompatible_combination_is_refused(registry):
    class NoGptq(PeftPlugin):
        name = "vera-like"
        capabilities = Capabilities(incompatible={"bnb-nf4": "needs full-precision weights"})

    with pytest.raises(ConfigError, match=r"quantizer.name: quantizer 'bnb-nf4' does not work with peft 'vera-like'"):
        check_combination(registry.get("quantizer", "bnb-nf4"), NoGptq(), registry.get("trainer", "hf"))


def test_forced_grad_checkpointing_with_unsupporting_method(registry):
    class NoCkpt(PeftPlugin):
        name = "prefix-like"
        capabilities = Capabilities(grad_checkpointing=False)

    registry.backends["peft"]["prefix-like"] = NoCkpt()
    try:
        msg = _error(registry, {**BASE, "peft": "prefix-like", "gradient_checkpointing": True})
        assert msg.startswith("gradient_checkpointing:")
        r = _resolve(registry, {**BASE, "peft": "prefix-like"})
        assert r.grad_checkpointing is False and any("turned off" in n for n in r.notes)
    finally:
        del registry.backends["peft"]["prefix-like"]


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="--set: expected key.path=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="cannot set"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def _cli(tmp_path, text, *args):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "qpeft", "run", str(cfg), *args], capture_output=True, text=True, timeout=60)
    return proc, time.perf_counter() - t0


@pytest.mark.parametrize(
    "text,args,key",
    [
        ("quantizer: bnb-nf9\npeft: lora\ntrainer: hf\n", [], "quantizer.name"),
        ("quantizer: bnb-nf4\npeft: lora\ntrainer: hf\n", ["--set", "peft.options.r=many"], "peft.options.r"),
        (
            "quantizer: {name: bnb-8bit, options: {cpu_offload: true}}\npeft: lora\ntrainer: hf\nmodel: {device: cpu}\n",
            [],
            "quantizer.options.cpu_offload",
        ),
        ("quantizer: [1\n", [], "not valid YAML"),
        ("- a\n- b\n", [], "top level must be a mapping"),
    ],
)
def test_cli_exits_2_fast_with_one_line(tmp_path, text, args, key):
    proc, seconds = _cli(tmp_path, text, *args)
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and key in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert seconds < 5, seconds
    assert not (tmp_path / "runs").exists()


def test_cli_check_mode_loads_no_weights(tmp_path):
    """--check loads no weights, but it does look for the model folder (a missing one was
    "config ok" and failed 11 s into the run; more in tests/test_check_paths.py)."""
    proc, seconds = _cli(tmp_path, "quantizer: bnb-nf4\npeft: lora\ntrainer: hf\nmodel: /nonexistent/model\n", "--check")
    assert proc.returncode == 2 and "error: model.name_or_path: model folder not found" in proc.stderr, proc.stderr
    proc, seconds = _cli(tmp_path, "quantizer: bnb-nf4\npeft: lora\ntrainer: hf\n", "--check")
    assert proc.returncode == 0, proc.stderr
    assert "config ok" in proc.stdout


def test_shipped_qlora_7b_config_is_valid(tiny_llama_path):
    """configs/qlora_7b.yaml (the seed recipe with qpeft's fast path) passes `qpeft run --check`
    once it names a model and, on this CPU machine, the CPU; untouched here, it fails on the
    first thing that is missing, naming the key, before any weight is loaded."""
    from conftest import REPO

    cfg = str(REPO / "configs" / "qlora_7b.yaml")
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "qpeft",
            "run",
            cfg,
            "--check",
            "--set",
            f"model.name_or_path={tiny_llama_path}",
            "--set",
            "model.device=cpu",
            "--set",
            "model.dtype=float32",
            "--set",
            "quantizer.options.compute_dtype=float32",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "bnb-nf4" in ok.stdout and "native" in ok.stdout
    raw = yaml.safe_load(open(cfg))
    assert raw["quantizer"]["options"] == {"double_quant": True, "compute_dtype": "bfloat16"}  # the seed's NF4 recipe
    bad = subprocess.run([sys.executable, "-m", "qpeft", "run", cfg, "--check"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "model." in (bad.stdout + bad.stderr)


@pytest.mark.skipif(__import__("importlib").util.find_spec("torchao") is None, reason="torchao is not installed")
@pytest.mark.parametrize("trainer", ["hf", "dpo"])
def test_torchao_int4_refuses_trainers_built_on_transformers_trainer(trainer):
    """transformers' Trainer raised "QuantizationMethod.TORCHAO ... do not support training" for
    torchao-int4 on an H200 (TorchAoHfQuantizer.is_trainable: 8-bit types only): refused from the config."""
    registry = load_registry()
    quant, other = registry.get("quantizer", "torchao-int4"), registry.get("trainer", trainer)
    with pytest.raises(ConfigError) as err:
        check_combination(quant, registry.get("peft", "lora"), other)
    assert err.value.key == "trainer.name" and "trainer native" in str(err.value)
    # and native trains nothing on it either: no derivative for the int4 matmul (seen on an H200)
    with pytest.raises(ConfigError, match="no derivative"):
        check_combination(quant, registry.get("peft", "lora"), registry.get("trainer", "native"))


def test_error_line_keeps_a_backslash_before_a_bracket(tmp_path):
    """rich.markup.escape leaves "\\[" alone and markup then printed it as "[": a config key
    "\\[" was named "[" (found by tests/test_fuzz_config.py). Errors are printed as plain Text."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text('quantizer: none\npeft: lora\ntrainer: hf\n"\\\\[": 1\n')
    proc = subprocess.run([sys.executable, "-m", "qpeft", "run", str(cfg), "--check"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: \\[: unknown key"), proc.stderr
