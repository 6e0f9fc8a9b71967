"""Bad files: truncated or corrupt safetensors, broken model configs, pickle
checkpoints, adapters for another base, a missing tokenizer, models that need remote code,
hub ids while offline. Each must end with exit status 2 and one error line that names the
file and says what to do — and, where the problem can be seen from the files, before any
weight is loaded (a lifecycle plugin counts loaded base models)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import WeightWatch
from transformers.utils import logging as transformers_logging
from typer.testing import CliRunner

from qpeft import cli
from qpeft.registry import load_registry

# Let transformers attach its log handler to the real stderr now: set up inside a CliRunner
# invocation it would keep that invocation's (later closed) stream.
transformers_logging.get_logger("transformers")
RUNNER = CliRunner()


@pytest.fixture()
def qpeft(monkeypatch):
    """Run the qpeft CLI in-process; returns (result, error line, WeightWatch)."""

    def call(*args: str):
        watch = WeightWatch()
        monkeypatch.setattr(cli, "_registry", lambda extra=(): load_registry([*extra, watch]))
        result = RUNNER.invoke(cli.app, list(args))
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        line = errors[-1] if errors else ""
        if result.exit_code == 2:
            assert len(errors) == 1 and result.stderr.rstrip().endswith(line.rstrip()), result.stderr
        assert "Traceback" not in result.output, result.output
        return result, line, watch

    return call


def write_config(path: Path, model_path: str, out: Path, **extra) -> str:
    """A small run config for ``model_path`` (JSON, which is YAML); ``extra`` updates sections."""
    cfg = {
        "model": {"name_or_path": model_path, "device": "cpu"},
        "quantizer": "none",
        "peft": {"name": "lora", "options": {"r": 4}},
        "trainer": {"name": "hf", "options": {"max_steps": 1, "batch_size": 2}},
        "data": {"max_train_examples": 4, "max_val_examples": 2, "max_length": 96},
        "output_dir": str(out),
        "evaluate": False,
        "generate": {"max_new_tokens": 2},
    }
    for key, value in extra.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return str(path)


def clone(src: str, dst: Path, skip=()) -> Path:
    dst.mkdir(parents=True)
    for f in Path(src).iterdir():
        if f.name not in skip:
            shutil.copy(f, dst / f.name)
    return dst


def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _garbage_header(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[:8] = b"\xff" * 8
    p.write_bytes(bytes(data))


def _bad_header_json(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[10:20] = b"!" * 10
    p.write_bytes(bytes(data))


def _zero_bytes(p: Path) -> None:
    p.write_bytes(b"")


@pytest.mark.parametrize(
    "damage", [_truncate, _garbage_header, _bad_header_json, _zero_bytes], ids=["truncated", "header-length", "header-json", "empty"]
)
def test_corrupt_model_safetensors(qpeft, tiny_llama_path, tmp_path, damage):
    model = clone(tiny_llama_path, tmp_path / "model")
    damage(model / "model.safetensors")
    result, line, watch = qpeft("run", write_config(tmp_path / "c.yaml", str(model), tmp_path / "out"))
    assert result.exit_code == 2
    assert f"{model / 'model.safetensors'} is truncated or corrupt" in line and "download or convert it again" in line, line
    assert watch.loaded == 0


def test_shard_missing_from_index(qpeft, tiny_llama_path, tmp_path):
    model = clone(tiny_llama_path, tmp_path / "model")
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    index = {
        "metadata": {},
        "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "lm_head.weight": "model-00002-of-00002.safetensors",
        },
    }
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    result, line, watch = qpeft("run", write_config(tmp_path / "c.yaml", str(model), tmp_path / "out"))
    assert result.exit_code == 2 and "lists model-00002-of-00002.safetensors, which is missing" in line, line
    assert watch.loaded == 0


@pytest.mark.parametrize(
    "text,fragment",
    [
        ('{"model_type": "llama", ', "config.json is not valid JSON"),
        ('{"hidden_size": 8}', "names no model_type"),
        ('{"model_type": "qpeft_unknown_arch"}', "model_type 'qpeft_unknown_arch' is unknown to transformers"),
    ],
    ids=["not-json", "no-model-type", "unknown-model-type"],
)
def test_broken_model_config(qpeft, tiny_llama_path, tmp_path, text, fragment):
    model = clone(tiny_llama_path, tmp_path / "model")
    (model / "config.json").write_text(text)
    result, line, watch = qpeft("run", write_config(tmp_path / "c.yaml", str(model), tmp_path / "out"))
    assert result.exit_code == 2 and fragment in line and str(model) in line, line
    assert watch.loaded == 0


@pytest.fixture(scope="module")
def pickle_model(tiny_llama_path, tmp_path_factory):
    """The tiny model with its weights as a pickle (``pytorch_model.bin``) only."""
    import torch
    from safetensors.torch import load_file

    model = clone(tiny_llama_path, tmp_path_factory.mktemp("pickle") / "model", skip=("model.safetensors",))
    torch.save(load_file(Path(tiny_llama_path) / "model.safetensors"), model / "pytorch_model.bin")
    return model


def test_pickle_checkpoint_is_refused_naming_the_file_and_opt_in(qpeft, pickle_model, tmp_path):
    result, line, watch = qpeft("run", write_config(tmp_path / "c.yaml", str(pickle_model), tmp_path / "out"))
    assert result.exit_code == 2
    assert line.startswith("error: model.allow_pickle:") and f"{pickle_model / 'pytorch_model.bin'} is a pickle checkpoint" in line, line
    assert "convert it to safetensors" in line and "set model.allow_pickle: true" in line
    assert watch.loaded == 0


def test_pickle_checkpoint_loads_when_opted_in_and_is_logged(pickle_model, tiny_llama_path, tmp_path, caplog):
    import torch

    from qpeft.config import load_config
    from qpeft.context import RunContext
    from qpeft.modeling import load_causal_lm

    def logits(path, allow):
        cfg = load_config({"quantizer": "none", "peft": "lora", "trainer": "hf", "model": {"name_or_path": path, "allow_pickle": allow}})
        ctx = RunContext(config=cfg, device="cpu", dtype="float32", output_dir=str(tmp_path))
        with torch.no_grad():
            return load_causal_lm(path, ctx).eval()(input_ids=torch.tensor([[5, 6, 7]])).logits

    with caplog.at_level(logging.WARNING, logger="qpeft"):
        from_pickle = logits(str(pickle_model), True)
    assert any("allow_pickle is on" in r.getMessage() and str(pickle_model) in r.getMessage() for r in caplog.records)
    assert torch.equal(from_pickle, logits(tiny_llama_path, False))


@pytest.fixture(scope="module")
def plain_adapters(tiny_llama_path, tmp_path_factory):
    """Plain-peft LoRA adapters of the tiny model: safetensors and pickle (``adapter_model.bin``)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_path), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(root / "safe")
    model.save_pretrained(root / "pickle", safe_serialization=False)
    assert (root / "pickle" / "adapter_model.bin").is_file() and not list((root / "pickle").glob("*.safetensors"))
    return root


def test_pickle_adapter_is_refused_unless_opted_in(qpeft, plain_adapters):
    adapter = plain_adapters / "pickle"
    result, line, watch = qpeft(
        "generate", "--adapter", str(adapter), "--prompt", "hi", "--max-new-tokens", "2", "--set", "model.device=cpu"
    )
    assert (
        result.exit_code == 2 and f"{adapter / 'adapter_model.bin'} is a pickle checkpoint" in line and "model.allow_pickle: true" in line
    ), line
    assert watch.loaded == 0
    result, _, _ = qpeft(
        "generate",
        "--adapter",
        str(adapter),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
        "--set",
        "model.device=cpu",
        "--set",
        "model.allow_pickle=true",
    )
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("damage", [_truncate, _garbage_header], ids=["truncated", "header-length"])
def test_corrupt_adapter(qpeft, plain_adapters, tmp_path, damage):
    adapter = shutil.copytree(plain_adapters / "safe", tmp_path / "adapter")
    damage(adapter / "adapter_model.safetensors")
    result, line, watch = qpeft("generate", "--adapter", str(adapter), "--prompt", "hi", "--set", "model.device=cpu")
    assert result.exit_code == 2 and f"{adapter / 'adapter_model.safetensors'} is truncated or corrupt" in line, line
    assert watch.loaded == 0


def test_corrupt_adapter_config(qpeft, plain_adapters, tmp_path):
    adapter = shutil.copytree(plain_adapters / "safe", tmp_path / "adapter")
    (adapter / "adapter_config.json").write_text('{"peft_type": ')
    result, line, _ = qpeft("generate", "--adapter", str(adapter), "--prompt", "hi")
    assert result.exit_code == 2 and f"{adapter / 'adapter_config.json'} is corrupt" in line, line


def test_adapter_for_another_base(qpeft, plain_adapters, tiny_llama_path, tmp_path):
    """Shapes differ: a clear error naming the adapter, the base and what to do."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_llama_path)
    other = tmp_path / "other"
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok), hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2
        )
    ).save_pretrained(other)
    tok.save_pretrained(other)
    adapter = plain_adapters / "safe"
    result, line, _ = qpeft("generate", "--adapter", str(adapter), "--prompt", "hi", "--set", f"model={other}", "--set", "model.device=cpu")
    assert result.exit_code == 2, result.output
    assert f"adapter {adapter} does not load on base '{other}'" in line and "size mismatch" in line, line
    assert "the base model it was trained on" in line, line


def test_missing_tokenizer(qpeft, tiny_llama_path, tmp_path):
    model = clone(tiny_llama_path, tmp_path / "model", skip=("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"))
    result, line, watch = qpeft("run", write_config(tmp_path / "c.yaml", str(model), tmp_path / "out"))
    assert result.exit_code == 2 and f"{model} has no tokenizer" in line and "copy the base model's tokenizer files" in line, line
    assert watch.loaded == 0


def test_broken_tokenizer_file(qpeft, tiny_llama_path, tmp_path):
    model = clone(tiny_llama_path, tmp_path / "model")
    (model / "tokenizer.json").write_text("{")
    result, line, watch = qpeft("run", write_config(tmp_path / "c.yaml", str(model), tmp_path / "out"))
    assert result.exit_code == 2 and f"cannot load the tokenizer of {model}" in line, line
    assert watch.loaded == 0


def test_model_that_needs_remote_code_is_refused_and_its_code_never_runs(qpeft, tiny_llama_path, tmp_path):
    model = clone(tiny_llama_path, tmp_path / "model")
    marker = tmp_path / "REMOTE_CODE_RAN"
    config = json.loads((model / "config.json").read_text())
    config.update(
        model_type="qpeft_custom",
        auto_map={"AutoConfig": "modeling_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomModel"},
    )
    (model / "config.json").write_text(json.dumps(config))
    (model / "modeling_custom.py").write_text(
        textwrap.dedent(f"""
        open({str(marker)!r}, "w").write("ran")
        from transformers import LlamaConfig, LlamaForCausalLM
        class CustomConfig(LlamaConfig):
            model_type = "qpeft_custom"
        class CustomModel(LlamaForCausalLM):
            config_class = CustomConfig
    """)
    )
    result, line, watch = qpeft("run", write_config(tmp_path / "c.yaml", str(model), tmp_path / "out"))
    assert result.exit_code == 2 and line.startswith("error: model.trust_remote_code:") and str(model) in line, line
    assert "set model.trust_remote_code: true only if you trust its author" in line
    assert not marker.exists() and watch.loaded == 0


def test_trust_remote_code_on_is_logged(qpeft, tiny_llama_path, tmp_path, caplog):
    cfg = write_config(
        tmp_path / "c.yaml",
        tiny_llama_path,
        tmp_path / "out",
        model={"trust_remote_code": True},
        data={"path": str(tmp_path / "missing.jsonl")},
    )
    result, line, watch = qpeft("run", cfg)
    assert "trust_remote_code is ON" in result.stderr
    assert result.exit_code == 2 and "data file not found" in line and watch.loaded == 0

    from qpeft.config import load_config
    from qpeft.context import RunContext
    from qpeft.modeling import load_causal_lm

    config = load_config(
        {"quantizer": "none", "peft": "lora", "trainer": "hf", "model": {"name_or_path": tiny_llama_path, "trust_remote_code": True}}
    )
    with caplog.at_level(logging.WARNING, logger="qpeft"):
        load_causal_lm(tiny_llama_path, RunContext(config=config, device="cpu", dtype="float32", output_dir=str(tmp_path)))
    assert any("trust_remote_code is on" in r.getMessage() for r in caplog.records)


def test_defaults_are_safe():
    from qpeft.config import ModelConfig

    m = ModelConfig()
    assert m.trust_remote_code is False and m.allow_pickle is False


def test_too_short_max_length_is_an_error_before_weights(qpeft, tiny_llama_path, tmp_path):
    """Found by fuzzing: max_length 8 left no example with a target token, and training
    crashed with ZeroDivisionError after the weights were loaded."""
    cfg = write_config(tmp_path / "c.yaml", tiny_llama_path, tmp_path / "out", data={"max_length": 8})
    result, line, watch = qpeft("run", cfg)
    assert result.exit_code == 2 and "data.max_length: no training example" in line and "raise data.max_length" in line, line
    assert watch.loaded == 0


def test_output_dir_that_is_a_file(qpeft, tiny_llama_path, tmp_path):
    (tmp_path / "taken").write_text("a file")
    result, line, watch = qpeft("run", write_config(tmp_path / "c.yaml", tiny_llama_path, tmp_path / "taken"))
    assert result.exit_code == 2 and str(tmp_path / "taken") in line, line
    assert watch.loaded == 0


# ---------------------------------------------------------------------------- network

AUDIT = """
import os, sys
def hook(event, args):
    if event in ("socket.connect", "socket.getaddrinfo"):
        sys.stderr.write(f"NETWORK {event} {args[1:]!r}\\n")
        raise RuntimeError("network access at run time")
sys.addaudithook(hook)
sys.argv = ["qpeft", *sys.argv[1:]]
from qpeft.cli import main
main()
"""


def _offline_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "QPEFT_ALLOW", "TRANSFORMERS_OFFLINE"))}
    env.update(HF_HOME=str(tmp_path / "hf-home"), **extra)
    return env


def test_hub_id_is_offline_without_opt_in_and_opens_no_socket(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", "some-org/some-model", tmp_path / "out")
    proc = subprocess.run(
        [sys.executable, "-c", AUDIT, "run", cfg], capture_output=True, text=True, timeout=300, env=_offline_env(tmp_path)
    )
    assert "NETWORK" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "some-org/some-model" in errors[0] and "QPEFT_ALLOW_HUB=1" in errors[0], proc.stderr


def test_hub_access_only_with_opt_in(tmp_path):
    probe = "import os,sys; sys.argv=['qpeft','--help']\nfrom qpeft import cli\ntry: cli.main()\nexcept SystemExit: pass\nprint('HF_HUB_OFFLINE=' + str(os.environ.get('HF_HUB_OFFLINE')))"
    off = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=_offline_env(tmp_path))
    on = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=_offline_env(tmp_path, QPEFT_ALLOW_HUB="1")
    )
    assert off.stdout.strip().endswith("HF_HUB_OFFLINE=1"), off.stdout
    assert on.stdout.strip().endswith("HF_HUB_OFFLINE=None"), on.stdout


# An adapter folder is data: its metadata never widens trust (qpeft.adapter_source).


def _adapter_with_metadata(src: Path, dst: Path, model: dict) -> Path:
    adapter = shutil.copytree(src, dst)
    meta = {"model": model, "quantizer": {"name": "none", "options": {}}, "peft": {"name": "lora"}}
    (adapter / "qpeft.json").write_text(json.dumps(meta))
    return adapter


def _base_with_code(tiny_llama_path: str, root: Path) -> tuple[Path, Path]:
    """The tiny model with an ``auto_map`` to Python in its folder that leaves a marker file
    when it is imported."""
    base = clone(tiny_llama_path, root / "base-with-code")
    marker = root / "code-ran"
    (base / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaForCausalLM as EvilModel, PreTrainedTokenizerFast as EvilTokenizer\n"
    )
    for name, auto_map in (
        ("config.json", {"AutoModelForCausalLM": "evil.EvilModel"}),
        ("tokenizer_config.json", {"AutoTokenizer": ["evil.EvilTokenizer", None]}),
    ):
        cfg = json.loads((base / name).read_text())
        (base / name).write_text(json.dumps({**cfg, "auto_map": auto_map}))
    return base, marker


@pytest.mark.parametrize("command", ["generate", "merge"])
def test_adapter_metadata_cannot_turn_on_remote_code(qpeft, plain_adapters, tiny_llama_path, tmp_path, command):
    base, marker = _base_with_code(tiny_llama_path, tmp_path)
    adapter = _adapter_with_metadata(
        plain_adapters / "safe", tmp_path / "adapter", {"name_or_path": str(base), "trust_remote_code": True, "allow_pickle": True}
    )
    args = ["--prompt", "hi", "--max-new-tokens", "2"] if command == "generate" else ["--out", str(tmp_path / "merged")]
    result, line, _ = qpeft(command, "--adapter", str(adapter), *args, "--set", "model.device=cpu")
    assert not marker.exists(), "an adapter's qpeft.json ran a base folder's Python"
    assert result.exit_code in (0, 2), result.output
    if result.exit_code == 0:
        said = " ".join(result.output.split())  # rich wraps long lines
        assert "ignored trust_remote_code=True" in said and "only your own --set model.trust_remote_code" in said, said


def test_adapter_metadata_cannot_allow_pickles(qpeft, plain_adapters, tiny_llama_path, tmp_path):
    adapter = _adapter_with_metadata(
        plain_adapters / "pickle", tmp_path / "adapter", {"name_or_path": tiny_llama_path, "allow_pickle": True}
    )
    result, line, watch = qpeft("generate", "--adapter", str(adapter), "--prompt", "hi", "--set", "model.device=cpu")
    assert result.exit_code == 2 and "adapter_model.bin is a pickle checkpoint" in line and "allow_pickle" in line, line
    assert watch.loaded == 0


@pytest.mark.parametrize("written_by", ["qpeft", "peft"])
@pytest.mark.parametrize("base", ["../../base", "base", "~/base", "/models/../base"])
def test_adapter_metadata_paths_are_not_resolved_against_the_current_folder(
    qpeft, plain_adapters, tiny_llama_path, tmp_path, monkeypatch, written_by, base
):
    monkeypatch.chdir(tmp_path)
    clone(tiny_llama_path, tmp_path / "base")  # so that 'base' is a folder here, not a hub id
    if written_by == "qpeft":
        adapter = _adapter_with_metadata(plain_adapters / "safe", tmp_path / "adapter", {"name_or_path": base})
    else:
        adapter = shutil.copytree(plain_adapters / "safe", tmp_path / "adapter")
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": base}))
    result, line, watch = qpeft("generate", "--adapter", str(adapter), "--prompt", "hi", "--set", "model.device=cpu")
    assert result.exit_code == 2 and f"names the base model {base!r}" in line and "--set model.name_or_path=PATH" in line, line
    assert watch.loaded == 0
    # The user may name it.
    result, line, _ = qpeft(
        "generate",
        "--adapter",
        str(adapter),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
        "--set",
        "model.device=cpu",
        "--set",
        f"model.name_or_path={tmp_path / 'base'}",
    )
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "meta",
    [{"model": "smollm2", "quantizer": {"name": "none"}, "peft": {"name": "lora"}}, {"model": {"name_or_path": "smollm2"}}, []],
    ids=["model-as-string", "missing-sections", "not-an-object"],
)
def test_malformed_adapter_metadata_is_one_line(qpeft, plain_adapters, tmp_path, meta):
    adapter = shutil.copytree(plain_adapters / "safe", tmp_path / "adapter")
    (adapter / "qpeft.json").write_text(json.dumps(meta))
    result, line, watch = qpeft("generate", "--adapter", str(adapter), "--prompt", "hi", "--set", "model.device=cpu")
    assert result.exit_code == 2 and str(adapter / "qpeft.json") in line, line
    assert watch.loaded == 0


@pytest.mark.parametrize("where", ["model-weights", "model-config", "adapter-weights"])
def test_a_fifo_where_a_file_is_read_is_refused_not_waited_on(qpeft, tiny_llama_path, plain_adapters, tmp_path, where):
    """A FIFO (or device) instead of a weights or config file blocked the run forever."""
    model = clone(tiny_llama_path, tmp_path / "model")
    adapter = shutil.copytree(plain_adapters / "safe", tmp_path / "adapter")
    fifo = {"model-weights": model / "model.safetensors", "model-config": model / "config.json"}.get(
        where, adapter / "adapter_model.safetensors"
    )
    fifo.unlink()
    os.mkfifo(fifo)
    if where == "adapter-weights":
        args = (
            "generate",
            "--adapter",
            str(adapter),
            "--prompt",
            "hi",
            "--set",
            "model.device=cpu",
            "--set",
            f"model.name_or_path={model}",
        )
    else:
        args = ("run", write_config(tmp_path / "c.yaml", str(model), tmp_path / "out"))
    result, line, watch = qpeft(*args)
    assert result.exit_code == 2 and f"{fifo} is not a regular file" in line, line
    assert watch.loaded == 0
