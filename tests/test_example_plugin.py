"""The external plugin package examples/qpeft-torchao, installed the way users install one
(the README's install command does): listed by ``qpeft plugins``, conformant, trains from a
config. Also the plugin API's promises with real installed distributions: failing or
incompatible plugins are reported and never break qpeft; two packages claiming one name is
an error naming both.

If qpeft-torchao is not installed these tests fail (they do not skip): CI must install it.
"""

import importlib.metadata
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO

from qpeft.testing import QuantizerConformance, tiny_model_path

DIST = "qpeft-torchao"
QUANTIZER = "example-torchao-int8"
INSTALL = "pip install ./examples/qpeft-torchao (part of the README's install command)"


def _dist():
    try:
        return importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{DIST} is not installed: {INSTALL}")


def _qpeft(*args, env_path: Path | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", COLUMNS="200")
    if env_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(env_path), env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-m", "qpeft", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


# ---------------------------------------------------------------------------- the example package


def test_installed_with_an_entry_point_only():
    dist = _dist()
    version = next(l for l in (REPO / "examples" / DIST / "pyproject.toml").read_text().splitlines() if l.startswith("version"))
    assert dist.version == version.split('"')[1], f"installed {DIST} {dist.version} is stale: {INSTALL}"
    eps = [ep for ep in dist.entry_points if ep.group == "qpeft"]
    assert [(ep.name, ep.value) for ep in eps] == [("qpeft_torchao", "qpeft_torchao")]
    assert QUANTIZER not in (REPO / "pyproject.toml").read_text()  # qpeft itself does not name it


def test_listed_by_qpeft_plugins():
    _dist()
    out = _qpeft("plugins", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    listed = {p["name"]: p for p in info["quantizer"]}
    assert QUANTIZER in listed, f"{QUANTIZER} missing from `qpeft plugins`; broken: {info['broken']}"
    p = listed[QUANTIZER]
    assert p["source"] == f"qpeft_torchao ({DIST} {_dist().version})"
    assert p["api_version"] == 1 and p["capabilities"]["bits"] == 8 and p["capabilities"]["merge_source"] == "dequantize"
    assert set(p["options"]["properties"]) == {"granularity", "group_size", "skip_modules"}
    assert info["broken"] == []
    table = _qpeft("plugins")
    assert table.returncode == 0 and QUANTIZER in table.stdout and DIST in table.stdout


class TestTorchaoInt8Conformance(QuantizerConformance):
    quantizer = QUANTIZER


def test_per_group_scales_and_a_group_size_that_does_not_fit(tmp_path):
    """per_group stores one scale per group (more bytes than per_row); a group size that does
    not divide the layer widths is refused naming the option, before torchao's long report."""
    from qpeft.config import load_config, resolve
    from qpeft.context import RunContext
    from qpeft.errors import ConfigError
    from qpeft.registry import load_registry

    _dist()
    reg, path = load_registry(), tiny_model_path()

    def load(**options):
        cfg = load_config({"model": path, "quantizer": {"name": QUANTIZER, "options": options}, "peft": "lora", "trainer": "hf"})
        r = resolve(cfg, reg, device="cpu")
        ctx = RunContext(config=cfg, device="cpu", dtype="float32", output_dir=str(tmp_path))
        return r.quantizer.load(path, r.quantizer_options, ctx, training=True)

    w = load(granularity="per_group", group_size=32).model.layers[0].self_attn.q_proj.weight
    assert type(w).__name__ == "Int8Tensor" and tuple(w.scale.shape) == (128, 4)
    with pytest.raises(ConfigError) as exc:
        load(granularity="per_group", group_size=96)
    assert exc.value.key == "quantizer.options.group_size" and "128" in exc.value.message


def test_memory_footprint_guard(tmp_path):
    """transformers' get_memory_footprint counts a torchao weight at its logical float32 size
    (numel x 4 B), so qpeft would report no memory saved; the plugin's guard counts the int8
    data and scales. If the first assertion fails, transformers fixed it and the guard may go."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedModel

    from qpeft.config import load_config, resolve
    from qpeft.context import RunContext
    from qpeft.modeling import weight_memory_gib
    from qpeft.registry import load_registry

    _dist()
    path = tiny_model_path()
    cfg = load_config({"model": path, "quantizer": QUANTIZER, "peft": "lora", "trainer": "hf"})
    r = resolve(cfg, load_registry(), device="cpu")
    model = r.quantizer.load(
        path, r.quantizer_options, RunContext(config=cfg, device="cpu", dtype="float32", output_dir=str(tmp_path)), training=True
    )
    fp32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).get_memory_footprint()
    assert PreTrainedModel.get_memory_footprint(model) == fp32  # the transformers bug
    guarded = weight_memory_gib(model) * 2**30
    print(f"\n[example-torchao-int8] tiny model footprint: fp32 {fp32} B, int8 (guarded) {guarded:.0f} B ({guarded / fp32:.3f})")
    assert guarded < 0.55 * fp32  # linear layers at ~0.26 of fp32; embeddings and head stay fp32


def test_qpeft_run_from_the_config_file(tmp_path):
    """`qpeft run configs/example_plugin.yaml` in a fresh process (entry-point discovery and
    all), on the kit's tiny model with 3 steps instead of the embedded model, to stay fast."""
    _dist()
    out_dir = tmp_path / "run"
    proc = _qpeft(
        "run", "configs/example_plugin.yaml",
        "--set", f"model.name_or_path={tiny_model_path()}",
        "--set", "trainer.options.max_steps=4",
        "--set", "trainer.options.lr=1e-2",
        "--set", "data.max_train_examples=8",
        "--set", "data.max_length=48",
        "--set", "generate.max_new_tokens=4",
        "--set", f"output_dir={out_dir}",
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["quantizer"] == QUANTIZER and summary["peft"] == "lora"
    losses = [h["loss"] for h in summary["loss_history"]]
    assert losses[-1] < losses[0], losses
    assert summary["reload_max_abs_logit_diff"] < 1e-4
    meta = json.loads((out_dir / "adapter" / "qpeft.json").read_text())
    assert meta["quantizer"] == {"name": QUANTIZER, "options": {"granularity": "per_row", "group_size": 128, "skip_modules": None}}


# ---------------------------------------------------------------------------- plugin API promises


def _fake_package(site: Path, dist: str, module: str, code: str) -> None:
    """An installed distribution as pip leaves it: a module and a dist-info with entry points."""
    (site / f"{module}.py").write_text(textwrap.dedent(code))
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[qpeft]\n{module} = {module}\n")


PLUGIN = """
    from qpeft import hookimpl
    from qpeft.api import Capabilities, QuantizerPlugin

    class Q(QuantizerPlugin):
        name = {name!r}
        description = "test"
        {api}

    @hookimpl
    def qpeft_register_quantizers(register):
        register(Q())
"""


def test_failing_and_incompatible_plugins_are_reported_not_fatal(tmp_path):
    _fake_package(tmp_path, "fake-import-error", "fake_import_error", "raise ImportError('needs libfoo.so')\n")
    _fake_package(tmp_path, "fake-exits", "fake_exits", "import sys\nsys.exit(3)\n")
    _fake_package(tmp_path, "fake-old-api", "fake_old_api", PLUGIN.format(name="old-q", api="api_version = 0"))
    _fake_package(tmp_path, "fake-future-api", "fake_future_api", PLUGIN.format(name="future-q", api="api_version = 2"))
    _fake_package(tmp_path, "fake-unstated-api", "fake_unstated_api", PLUGIN.format(name="unstated-q", api=""))
    _fake_package(tmp_path, "fake-nameless", "fake_nameless", PLUGIN.format(name="", api="api_version = 1"))
    _fake_package(tmp_path, "fake-good", "fake_good", PLUGIN.format(name="good-q", api="api_version = 1"))
    out = _qpeft("plugins", "--json", env_path=tmp_path)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    names = {p["name"] for p in info["quantizer"]}
    assert {"none", "bnb-nf4", "good-q"} <= names and not names & {"old-q", "future-q", "unstated-q"}
    broken = {b["source"]: b["reason"] for b in info["broken"]}
    assert "import failed: ImportError: needs libfoo.so" in broken["fake-import-error 1.0"]
    assert "SystemExit" in broken["fake-exits 1.0"]
    assert "targets qpeft plugin API 0, this qpeft has 1" in broken["fake-old-api 1.0"]
    assert "targets qpeft plugin API 2, this qpeft has 1" in broken["fake-future-api 1.0"]
    assert "does not state the qpeft plugin API it targets; set api_version = 1" in broken["fake-unstated-api 1.0"]
    assert "whose name is ''" in broken["fake-nameless 1.0"]
    table = _qpeft("plugins", env_path=tmp_path)
    assert table.returncode == 0 and "broken plugin fake_old_api (fake-old-api 1.0)" in " ".join(table.stdout.split())
    check = _qpeft("run", "configs/quickstart.yaml", "--check", env_path=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr  # other plugins' failures never block a run
    refused = _qpeft("run", "configs/quickstart.yaml", "--check", "--set", "quantizer=old-q", env_path=tmp_path)
    text = " ".join((refused.stdout + refused.stderr).split())
    assert refused.returncode == 2 and "unknown quantizer 'old-q'" in text and "targets qpeft plugin API 0" in text, text


def test_two_packages_claiming_one_name_is_an_error_naming_both(tmp_path):
    _dist()
    _fake_package(tmp_path, "fake-torchao-clone", "fake_torchao_clone", PLUGIN.format(name=QUANTIZER, api="api_version = 1"))
    out = _qpeft("plugins", env_path=tmp_path)
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode == 2, text
    assert f"two plugins provide the quantizer '{QUANTIZER}'" in text
    assert f"{DIST} {_dist().version}" in text and "fake-torchao-clone 1.0" in text
