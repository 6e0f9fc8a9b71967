"""A fresh round of attacks on qpeft's CLI (2026-12-01), one test per finding, each of which
failed before its fix: untrusted adapter folders, planted files in an output folder, configs
and command lines that hang or blow memory, bad values that gave a traceback. See
docs/reliability.md, "Fresh attack round"."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qpeft.cli import app
from qpeft.config import load_config, resolve
from qpeft.errors import ConfigError, QpeftError

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

BASE = {
    "model": {"name_or_path": "smollm2", "device": "cpu"},
    "quantizer": "none",
    "peft": {"name": "lora", "options": {"r": 4}},
    "trainer": {"name": "native", "options": {"max_steps": 2, "batch_size": 2}},
    "data": {"path": "embedded:text", "max_length": 32},
}


def _one_line_error(result) -> str:
    """The CLI failed with exit 2 and one ``error:`` line, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    return result.output


def _adapter(folder: Path, base: str = "smollm2", quantizer: dict | None = None, config: dict | None = None) -> Path:
    """An adapter folder as qpeft writes it, metadata only (enough for what is refused before
    any weight is read)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "base_model_name_or_path": base, "target_modules": ["q_proj", "v_proj"], "r": 4, "lora_alpha": 8}
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    meta = {"model": {"name_or_path": base}, "quantizer": quantizer or {"name": "none", "options": {}}, "peft": {"name": "lora"}}
    (folder / "qpeft.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory):
    """A tiny random Llama (with the embedded tokenizer) and a real LoRA adapter on it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qpeft.model_source import resolve_model_path
    from qpeft.testing import save_tiny_llama

    root = tmp_path_factory.mktemp("tiny")
    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2"))
    base = save_tiny_llama(tok, root / "base")
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapter = root / "adapter"
    model.save_pretrained(adapter, safe_serialization=True)
    meta = {"model": {"name_or_path": str(Path(base).resolve())}, "quantizer": {"name": "none", "options": {}}, "peft": {"name": "lora"}}
    (adapter / "qpeft.json").write_text(json.dumps(meta))
    return Path(base), adapter


def _cli(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "qpeft", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------- output folders


def test_a_planted_lock_file_symlink_is_never_written_through(tmp_path):
    """OUTPUT_DIR/.qpeft.lock planted as a symlink made `qpeft run` truncate the file it points
    at (and write its pid there); a FIFO there is refused too."""
    from qpeft.io import folder_lock

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".qpeft.lock").symlink_to(victim)
    with pytest.raises(QpeftError, match="symbolic link"):
        with folder_lock(out):
            pass
    assert victim.read_text() == "precious\n"
    assert (out / ".qpeft.lock").is_symlink()

    fifo_out = tmp_path / "fifo_out"
    fifo_out.mkdir()
    os.mkfifo(fifo_out / ".qpeft.lock")
    with pytest.raises(QpeftError, match="not a regular file"):
        with folder_lock(fifo_out):
            pass


def test_outputs_follow_the_umask(tmp_path):
    """summary.json, resolved_config.yaml, qpeft.json and the adapter's weights were written
    0600 (mkstemp, safetensors' own temp file) beside 0644 files, and the adapter folder 0755
    whatever the umask (a private umask 077 left it listable by everyone)."""
    import torch
    from safetensors.torch import save_file

    from qpeft.io import atomic_dir, atomic_write_json

    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "summary.json", {"a": 1})
        assert stat.S_IMODE(os.stat(tmp_path / "summary.json").st_mode) == 0o644
        with atomic_dir(tmp_path / "adapter") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "adapter_model.safetensors"))
        assert stat.S_IMODE(os.stat(tmp_path / "adapter").st_mode) == 0o755
        assert stat.S_IMODE(os.stat(tmp_path / "adapter" / "adapter_model.safetensors").st_mode) == 0o644
        os.umask(0o077)
        with atomic_dir(tmp_path / "private") as tmp:
            (tmp / "x").write_text("x")
        assert stat.S_IMODE(os.stat(tmp_path / "private").st_mode) == 0o700
        assert stat.S_IMODE(os.stat(tmp_path / "private" / "x").st_mode) == 0o600
    finally:
        os.umask(old)


def test_output_dir_inside_the_embedded_models_folder_is_refused(tmp_path, monkeypatch):
    """output_dir inside the embedded model's cached folder (the folder the run loads) was
    accepted: "not inside the model folder" held only for models named by a path."""
    from qpeft.outputs import check_run_output

    monkeypatch.setenv("QPEFT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    for out in (folder, folder / "run"):  # also before the first conversion made the folder
        with pytest.raises(QpeftError, match="inside the model.name_or_path"):
            check_run_output(load_config({**BASE, "output_dir": str(out)}))
    check_run_output(load_config({**BASE, "output_dir": str(tmp_path / "elsewhere")}))


# ---------------------------------------------------------------------------- untrusted files


def test_deeply_nested_or_huge_metadata_is_one_line(tmp_path, monkeypatch):
    """qpeft.json, a model's config.json and a summary.json in output_dir nested 100,000
    levels deep gave a RecursionError traceback; a huge (sparse) qpeft.json was read whole
    into memory."""
    from qpeft.model_source import check_model_config
    from qpeft.outputs import check_run_output

    deep = "[" * 100_000 + "]" * 100_000
    monkeypatch.chdir(tmp_path)
    adapter = _adapter(tmp_path / "deep")
    (adapter / "qpeft.json").write_text('{"model": ' + deep + "}")
    out = _one_line_error(runner.invoke(app, ["generate", "--adapter", str(adapter), "--prompt", "hi"]))
    assert "qpeft.json is corrupt: nested too deeply" in out

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama", "x": ' + deep + "}")
    with pytest.raises(QpeftError, match="nested too deeply"):
        check_model_config(model)

    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(deep)
    with pytest.raises(QpeftError, match="not a qpeft run summary"):
        check_run_output(load_config({**BASE, "output_dir": str(run)}))

    huge = _adapter(tmp_path / "huge")
    with open(huge / "qpeft.json", "wb") as f:
        f.truncate(1 << 40)  # 1 TiB, sparse: reading it whole would never end
    t0 = time.perf_counter()
    out = _one_line_error(runner.invoke(app, ["generate", "--adapter", str(huge), "--prompt", "hi"]))
    assert "larger than" in out and time.perf_counter() - t0 < 30


def test_an_adapter_config_regex_cannot_hang_or_import(tiny_adapter, tmp_path):
    """adapter_config.json is read by peft as it is: a target_modules string is a regular
    expression matched against every module name, and `(.|.)*Z` made `qpeft generate` run
    forever (exponential backtracking); megatron_config makes peft import a module by name."""
    import shutil

    base, good = tiny_adapter
    evil = tmp_path / "evil"
    shutil.copytree(good, evil)
    cfg = json.loads((evil / "adapter_config.json").read_text())
    (evil / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": "(.|.)*Z"}))
    try:
        proc = _cli(["generate", "--adapter", str(evil), "--prompt", "hi", "--max-new-tokens", "2"], tmp_path, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("qpeft generate hung on an adapter's target_modules regex")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "target_modules pattern '(.|.)*Z' is refused" in proc.stderr and "Traceback" not in proc.stderr

    from qpeft.adapter_source import check_adapter_config

    check_adapter_config(good)  # what peft writes passes
    for field, value in (
        ("exclude_modules", "(a+)+$"),
        ("modules_to_save", ["(x|xy)*"]),
        ("rank_pattern", {r"(\w+)\1": 8}),
        ("layers_pattern", ".*" * 6),
        ("megatron_config", {"a": 1}),
    ):
        (evil / "adapter_config.json").write_text(json.dumps({**cfg, field: value}))
        with pytest.raises(QpeftError, match=field):
            check_adapter_config(evil)
    (evil / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": r".*\.(q_proj|v_proj)"}))
    check_adapter_config(evil)  # an ordinary pattern passes


def test_adapter_quantizer_options_cannot_name_relative_paths(tmp_path, monkeypatch):
    """qpeft.json's quantizer options passed through as they were: a GPTQ adapter could point
    quantized_path (the weights actually loaded) at '../..' or '~', and calibration at a file
    in the user's current folder, all resolved against wherever the user runs qpeft."""
    from qpeft.adapter_source import read_adapter_metadata, trusted_run_sections

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.jsonl").write_text('{"text": "mine"}\n')
    for key, value in (("quantized_path", "../../weights"), ("quantized_path", "~/w"), ("calibration", "notes.jsonl")):
        adapter = _adapter(tmp_path / f"a-{key}-{len(value)}", quantizer={"name": "gptq", "options": {key: value}})
        meta = read_adapter_metadata(adapter)
        with pytest.raises(QpeftError, match=f"quantizer.options.{key}"):
            trusted_run_sections(meta, adapter, set())
        sections, _ = trusted_run_sections(meta, adapter, {f"quantizer.options.{key}"})  # the user named it
        assert sections["quantizer"]["options"][key] == value
    ok = _adapter(tmp_path / "ok", quantizer={"name": "gptq", "options": {"calibration": "embedded", "quantized_path": "/abs/w"}})
    trusted_run_sections(read_adapter_metadata(ok), ok, set())


def test_adapter_base_cannot_reach_the_current_folder_through_proc(tmp_path, monkeypatch):
    """Relative bases are refused, but `/proc/self/cwd/planted` is absolute and has no `..`:
    `qpeft generate` loaded the model folder `planted` from the user's current folder."""
    from qpeft.adapter_source import read_adapter_metadata, trusted_run_sections

    monkeypatch.chdir(tmp_path)
    for base in ("/proc/self/cwd/planted", "//proc/self/cwd/planted", "/./proc/thread-self/cwd/p", "/dev/fd/3"):
        adapter = _adapter(tmp_path / f"a{len(base)}", base=base)
        with pytest.raises(QpeftError, match="model"):
            trusted_run_sections(read_adapter_metadata(adapter), adapter, set())
    gptq = _adapter(tmp_path / "g", quantizer={"name": "gptq", "options": {"quantized_path": "/proc/self/cwd/w"}})
    with pytest.raises(QpeftError, match="quantizer.options.quantized_path"):
        trusted_run_sections(read_adapter_metadata(gptq), gptq, set())


def test_adapter_metadata_must_name_the_method_peft_loads(tmp_path):
    """qpeft.json naming another method than adapter_config.json's peft_type: qpeft checked the
    named method (LoRA can merge) while peft loaded the saved one (prefix tuning), and
    `qpeft merge` ended in `AttributeError: ... no attribute 'merge_and_unload'`; `generate`
    silently ran the other method."""
    for named, saved in (("lora", "PREFIX_TUNING"), ("prefix", "LORA")):
        adapter = _adapter(tmp_path / named, config={"peft_type": saved})
        meta = json.loads((adapter / "qpeft.json").read_text())
        (adapter / "qpeft.json").write_text(json.dumps({**meta, "peft": {"name": named}}))
        out = _one_line_error(runner.invoke(app, ["merge", "--adapter", str(adapter), "--out", str(tmp_path / f"m-{named}")]))
        assert f"names the method {named!r}" in out and saved in out


def test_a_base_missing_weights_its_config_declares_is_refused(tiny_adapter, tmp_path):
    """A model folder whose config.json declares a layer its safetensors lack trained with exit
    0: transformers initialised the missing weights at random and only printed a report (and a
    config.json declaring 20,000 layers ended in a MemoryError traceback)."""
    import shutil

    import yaml

    base, _ = tiny_adapter
    model = tmp_path / "model"
    shutil.copytree(base, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": cfg["num_hidden_layers"] + 1}))
    config = tmp_path / "c.yaml"
    data = {"path": "embedded:text", "max_length": 32, "max_train_examples": 8, "max_val_examples": 2}
    config.write_text(yaml.safe_dump({**BASE, "model": {"name_or_path": str(model), "device": "cpu"}, "data": data}))
    result = runner.invoke(app, ["run", str(config), "--set", f"output_dir={tmp_path / 'out'}", "--set", "evaluate=false"])
    out = _one_line_error(result)
    assert "weights that its config.json declares" in " ".join(out.split())


# ---------------------------------------------------------------------------- configs and flags


def test_device_map_values_are_checked_before_loading():
    """device_map `meta` (named in issue 17), `disk`, `{"": -1}`, `{x: [1]}`, a GPU on a CPU run
    or a GPU index past the machine's each gave a traceback after the data was read."""
    from qpeft.registry import load_registry

    for bad in ("meta", "garbage", {"": "disk"}, {"": "meta"}, {"": -1}, {"x": [1]}, {"": True}, {}):
        with pytest.raises(ConfigError, match="model.device_map"):
            load_config({**BASE, "model": {"device": "cpu", "device_map": bad}})
    for good in ("auto", "sequential", "cpu", "cuda:1", {"": "cpu"}, {"model.layers.0": 0, "lm_head": "cuda"}):
        load_config({**BASE, "model": {"device": "cpu", "device_map": good}})
    registry = load_registry()
    for gpu in ({"": 0}, "cuda:3", {"": 99}):
        with pytest.raises(ConfigError, match="model.device_map"):
            resolve(load_config({**BASE, "model": {"device": "cpu", "device_map": gpu}}), registry)


def test_set_values_obey_the_config_file_limits(tmp_path):
    """A YAML alias bomb or deep nesting given with --set skipped the limits a config file has:
    a 10^6 bomb in model.device_map took 40 s and wrote a 22 MB resolved_config.yaml before a
    traceback; 30,000 nested brackets were a RecursionError."""
    import yaml

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(BASE))
    bomb = "[&a [q,q,q,q,q,q,q,q,q,q]" + "".join(f", &{n} [{', '.join([f'*{p}'] * 10)}]" for p, n in zip("abcde", "bcdef", strict=True))
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="100,000 values"):
        load_config(config, [f"model.device_map={{x: {bomb}]}}"])
    assert time.perf_counter() - t0 < 10
    with pytest.raises(ConfigError, match="nested deeper"):
        load_config(config, ["data.path=" + "[" * 30_000 + "]" * 30_000])
    result = runner.invoke(app, ["run", str(config), "--check", "--set", "data.path=" + "[" * 30_000 + "]" * 30_000])
    _one_line_error(result)


def test_generate_max_new_tokens_is_bounded(tmp_path):
    """`qpeft generate --max-new-tokens` had no upper bound (generate.max_new_tokens in a config
    is at most 8192): 10^23 ran for more than 10 minutes on the tiny model, never ending."""
    adapter = _adapter(tmp_path / "a")
    result = runner.invoke(app, ["generate", "--adapter", str(adapter), "--prompt", "hi", "--max-new-tokens", "99999999999999999999999"])
    assert result.exit_code == 2
    assert "--max-new-tokens" in result.output and "8192" in result.output


def test_merge_out_as_dot_or_root_is_one_line(tmp_path, monkeypatch):
    """`qpeft merge --out . --requantize bnb-nf4` was `ValueError: PosixPath('.') has an empty
    name` (OUT-QUANTIZER is named from --out's last part), and so was `--out /`."""
    adapter = _adapter(tmp_path / "a")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out, says in ((".", "exists; pass --force"), ("/", "root folder"), ("", "--out: empty")):
        result = runner.invoke(app, ["merge", "--adapter", str(adapter), "--out", out, "--requantize", "bnb-nf4"])
        assert says in _one_line_error(result)


def test_bench_os_errors_are_one_line(tmp_path):
    """`qpeft bench MATRIX --out FILE/x` (or a folder under /proc) and `qpeft bench report` caught
    only qpeft's own errors: the OS's were tracebacks (exit 1)."""
    import yaml

    matrix = tmp_path / "m.yaml"
    matrix.write_text(yaml.safe_dump({"name": "m", "base": BASE, "axes": {"peft": ["lora"]}}))
    (tmp_path / "afile").write_text("x")
    result = runner.invoke(app, ["bench", str(matrix), "--out", str(tmp_path / "afile" / "x")])
    assert "Not a directory" in _one_line_error(result)


# Findings of the round in the data layer and the native trainer's checkpoints (fixed there).


def test_a_deeply_nested_data_row_is_one_line(tmp_path):
    from qpeft.data import iter_records

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(ConfigError, match=r"data.path: .*d.jsonl: row 2 is nested too deeply"):
        list(iter_records(path, "data.path"))


def test_a_pipe_or_device_as_data_path_is_not_a_regular_file(tmp_path):
    from qpeft.data import iter_records

    fifo = tmp_path / "d.jsonl"
    os.mkfifo(fifo)
    link = tmp_path / "zero.jsonl"
    link.symlink_to("/dev/zero")
    for path in (fifo, link):  # opening either would block or never end
        with pytest.raises(ConfigError, match=r"is not a regular file"):
            list(iter_records(path, "data.path"))


@pytest.mark.parametrize("planted", ["nested", "fifo", "list"])
def test_a_tampered_checkpoint_marker_makes_the_checkpoint_incomplete(tmp_path, planted):
    from qpeft.checkpoint import MARKER, read_marker

    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    marker = ckpt / MARKER
    if planted == "fifo":
        os.mkfifo(marker)  # reading it would wait for a writer for ever
    else:
        marker.write_text("[" * 100_000 + "]" * 100_000 if planted == "nested" else '[{"step": 2}]')
    t0 = time.monotonic()
    assert read_marker(ckpt) is None
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("damage", ["inf", "shape"])
def test_a_damaged_native_checkpoint_is_refused_naming_the_tensor(tmp_path, tiny_llama_path, damage):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from qpeft import orchestrator
    from qpeft.checkpoint import checkpoint_dir
    from qpeft.registry import load_registry

    cfg = {
        "model": {"name_or_path": tiny_llama_path, "device": "cpu"},
        "quantizer": "none",
        "peft": {"name": "lora", "options": {"r": 4}},
        "trainer": {"name": "native", "options": {"max_steps": 2, "batch_size": 2, "save_steps": 1}},
        "data": {"path": "embedded:text", "max_length": 32, "max_train_examples": 8, "max_val_examples": 2},
        "output_dir": str(tmp_path / "run"),
        "evaluate": False,
        "generate": {"max_new_tokens": 2},
    }
    registry = load_registry()
    orchestrator.run(orchestrator.prepare(cfg, registry=registry)[0], registry)
    shutil.rmtree(checkpoint_dir(tmp_path / "run", 2))  # resume from step 1, which is damaged below
    file = checkpoint_dir(tmp_path / "run", 1) / "trainable.safetensors"
    tensors = load_file(str(file))
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("inf")) if damage == "inf" else torch.zeros(3, 3)
    save_file(tensors, str(file))
    expected = "holds non-finite values" if damage == "inf" else r"has shape \(3, 3\)"
    with pytest.raises(ConfigError, match=rf"--resume: .*checkpoint-1: tensor '{name}' {expected}"):
        orchestrator.run(orchestrator.prepare(cfg, registry=registry)[0], registry, resume=True)
