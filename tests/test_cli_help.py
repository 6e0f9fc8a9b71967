"""The command line explains itself: --version, a help text for every option, no `<bool>` on
flags or `<list[str]>` on repeatable options, `qpeft bench MATRIX` in `bench --help`, whole
capabilities in `qpeft plugins` at 80 columns, described config schema fields, "did you mean"
for other tools' key names, and a word on resuming after Ctrl-C."""

from __future__ import annotations

import json

import pytest
import typer.main
from typer.testing import CliRunner

from qpeft import __version__, cli
from qpeft.config import load_config

RUNNER = CliRunner()


def _commands(group, path=("qpeft",)):
    """Every command and group under ``group`` (typer's own click: duck-typed)."""
    yield path, group
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


def test_version():
    result = RUNNER.invoke(cli.app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"qpeft {__version__}"


def test_every_option_has_help_and_no_type_noise():
    root = typer.main.get_command(cli.app)
    seen = set()
    for path, command in _commands(root):
        for param in command.params:
            if param.param_type_name == "option":
                assert param.help, f"{' '.join(path)} {param.opts[0]} has no help text"
        result = RUNNER.invoke(cli.app, [*path[1:], "--help"], env={"COLUMNS": "100"})
        assert result.exit_code == 0, result.output
        assert "<bool>" not in result.output and "<list[" not in result.output, f"{' '.join(path)}:\n{result.output}"
        seen.add(path)
    assert {("qpeft", "run"), ("qpeft", "generate"), ("qpeft", "merge"), ("qpeft", "bench", "run")} <= seen
    run_help = RUNNER.invoke(cli.app, ["run", "--help"], env={"COLUMNS": "200"}).output
    assert "KEY=VALUE" in run_help and "first 5,000 rows" in run_help and "Loads no weights" in run_help


def test_bench_help_documents_the_matrix_shorthand():
    out = RUNNER.invoke(cli.app, ["bench", "--help"], env={"COLUMNS": "120"}).output
    assert "qpeft bench MATRIX" in out and "resume" in out and "qpeft bench report DIR" in out


def test_plugins_table_keeps_capabilities_whole_at_80_columns():
    result = RUNNER.invoke(cli.app, ["plugins"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    info = json.loads(RUNNER.invoke(cli.app, ["plugins", "--json"]).stdout)
    for p in info["quantizer"]:
        if p["capabilities"]["grad_checkpointing"]:
            assert "grad_checkpointing" in result.output
        assert f"merge: {p['capabilities']['merge_source']}" in result.output


def test_config_schema_fields_are_described():
    result = RUNNER.invoke(cli.app, ["config", "schema"])
    schema = json.loads(result.stdout)
    missing = [
        f"{name}.{field}"
        for name, model in [("RunConfig", schema), *schema["$defs"].items()]
        for field, prop in model.get("properties", {}).items()
        if not prop.get("description")
    ]
    assert not missing, missing
    trainer = json.loads(RUNNER.invoke(cli.app, ["config", "schema", "trainer:hf"]).stdout)
    for field in ("lr", "batch_size", "grad_accum", "epochs", "max_steps", "save_steps"):
        assert trainer["properties"][field].get("description"), field


@pytest.mark.parametrize(
    "key,meant",
    [
        ("trainer.options.learning_rate", "lr"),
        ("trainer.options.per_device_train_batch_size", "batch_size"),
        ("trainer.options.gradient_accumulation_steps", "grad_accum"),
        ("trainer.options.num_train_epochs", "epochs"),
        ("peft.options.lora_r", "r"),
        ("peft.options.rank", "r"),
        ("peft.options.lora_alpha", "alpha"),
        ("data.max_seq_length", "max_length"),
        ("trainer.options.lrr", "lr"),  # a misspelling: the closest key, as backend names get
    ],
)
def test_unknown_key_suggests_qpeft_name(tmp_path, key, meant):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("quantizer: none\npeft: lora\ntrainer: hf\nmodel: {device: cpu}\n")
    result = RUNNER.invoke(cli.app, ["run", str(cfg), "--check", "--set", f"{key}=1"])
    assert result.exit_code == 2
    assert f"unknown key {key.rsplit('.', 1)[1]!r}" in result.output and f"(did you mean {meant!r}?)" in result.output, result.output


def test_default_prompt_on_own_data_is_noted(tmp_path):
    from qpeft.config import EMBEDDED_DATA_PROMPTS, resolve
    from qpeft.registry import load_registry

    quickstart = load_config("configs/quickstart.yaml")
    assert quickstart.generate.prompt in EMBEDDED_DATA_PROMPTS  # kept in step with the quickstart
    registry = load_registry()
    base = {"quantizer": "none", "peft": "lora", "trainer": "hf", "model": {"device": "cpu"}}
    own = resolve(load_config({**base, "data": {"path": "mine.jsonl"}}), registry)
    assert any("generate.prompt is the quickstart's" in n for n in own.notes)
    told = resolve(load_config({**base, "data": {"path": "mine.jsonl"}, "generate": {"prompt": "Hello"}}), registry)
    embedded = resolve(load_config(base), registry)
    assert not any("generate.prompt" in n for n in told.notes + embedded.notes)


def test_run_interrupt_mentions_resume_when_a_checkpoint_exists(tmp_path, capsys):
    from qpeft.checkpoint import checkpoint_dir, mark_complete

    cli._resume_hint(str(tmp_path), "cfg.yaml", ["data.path=a b.jsonl"])
    assert "--resume" not in capsys.readouterr().err  # no checkpoint: nothing to resume from
    step = checkpoint_dir(tmp_path, 4)
    step.mkdir(parents=True)
    mark_complete(step, step=4, trainer="hf", config_fingerprint="x")
    cli._resume_hint(str(tmp_path), "cfg.yaml", ["data.path=a b.jsonl"])
    err = capsys.readouterr().err
    assert "qpeft run cfg.yaml --set 'data.path=a b.jsonl' --resume" in " ".join(err.split()), err


def test_bench_interrupt_says_how_to_resume(tmp_path, monkeypatch):
    from qpeft import bench

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run_matrix", interrupted)
    monkeypatch.setattr("sys.argv", ["qpeft", "bench", "m.yaml", "--only", "peft=lora"])
    result = RUNNER.invoke(cli.app, ["bench", "m.yaml", "--only", "peft=lora"])
    assert result.exit_code == 130
    text = " ".join(result.output.split())
    assert "to resume, run the same command again: qpeft bench m.yaml --only peft=lora" in text, result.output
