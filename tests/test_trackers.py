"""Trackers (``trackers: [tensorboard, mlflow]``): a run on the tiny random Llama recorded by
both, read back with the trackers' own readers (TensorBoard's EventAccumulator, MLflow's
client); both trainers report through them; bad tracker configs fail before any weight loads."""

from __future__ import annotations

import json

import pytest

from qpeft import orchestrator
from qpeft.errors import ConfigError
from qpeft.registry import load_registry

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
pytest.importorskip("sqlalchemy")


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def _event_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc, {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize("trainer", ["hf", "native"])
def test_run_logged_to_tensorboard_and_mlflow(trainer, tiny_config, registry, tmp_path):
    cfg = tiny_config(trackers=["tensorboard", {"name": "mlflow", "options": {"experiment": "tiny"}}])
    cfg["trainer"]["name"] = trainer
    cfg["trainer"]["options"]["max_steps"] = 4
    resolved, reg = orchestrator.prepare(cfg, registry=registry)
    summary = orchestrator.run(resolved, reg)
    out = tmp_path / "run"
    losses = [(h["step"], h["loss"]) for h in summary["loss_history"]]
    assert [s for s, _ in losses] == [1, 2, 3, 4]

    # TensorBoard: read back with tensorboard's own reader.
    acc, scalars = _event_scalars(out / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([v for _, v in losses], rel=1e-6)
    assert scalars["eval/val_perplexity"] == [
        (0, pytest.approx(summary["val_perplexity_before"], rel=1e-6)),
        (4, pytest.approx(summary["val_perplexity_after"], rel=1e-6)),
    ]
    assert scalars["run/tokens_per_s"][0][1] == pytest.approx(summary["tokens_per_s"], rel=1e-6)
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f"name: {trainer}" in text and "max_steps: 4" in text

    # MLflow: the run, read back with MLflow's client from the SQLite store.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.name"] == trainer and run.data.params["trainer.options.max_steps"] == "4"
    assert run.data.params["quantizer.name"] == "bnb-nf4"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    history = sorted((m.step, m.value) for m in history)
    assert [s for s, _ in history] == [1, 2, 3, 4]
    assert [v for _, v in history] == pytest.approx([v for _, v in losses], rel=1e-6)
    assert run.data.metrics["eval/val_perplexity"] == pytest.approx(summary["val_perplexity_after"], rel=1e-6)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "summary.json", "resolved_config.yaml"} <= artifacts
    adapter = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in adapter
    local = client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))
    assert json.loads(open(local).read())["run_id"] == summary["run_id"]

    # qpeft report RUN_DIR on this real run: its losses, perplexities and trackers are on the page.
    from qpeft.html_report import write_run_html

    page = open(write_run_html(out)).read()
    assert f"<td>{summary['val_perplexity_after']:.6g}</td>" in page and f"<td>{losses[-1][1]:.6g}</td>" in page
    assert str(out / "tensorboard") in page and str(out / "mlflow.db") in page


def test_failed_run_is_marked_failed(tiny_config, registry, tmp_path):
    cfg = tiny_config(trackers=["mlflow"])
    cfg["data"]["max_length"] = 8  # every example loses its targets: the run stops before loading
    resolved, reg = orchestrator.prepare(cfg, registry=registry)
    with pytest.raises(Exception, match="max_length"):
        orchestrator.run(resolved, reg)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("qpeft").experiment_id])
    assert run.info.status == "FAILED"


@pytest.mark.parametrize(
    ("trackers", "key", "message"),
    [
        (["tensorbord"], "trackers.0.name", "valid: mlflow, tensorboard, wandb (did you mean 'tensorboard'?)"),
        (["mlflow", "mlflow"], "trackers.1.name", "named twice"),
        ([{"name": "mlflow", "options": {"experment": "x"}}], "trackers.0.options", "unknown key 'experment'"),
    ],
)
def test_bad_tracker_config_names_the_key(trackers, key, message, tiny_config, registry):
    with pytest.raises(ConfigError) as err:
        orchestrator.prepare(tiny_config(trackers=trackers), registry=registry)
    assert err.value.key.startswith(key) and message in str(err.value)


def test_missing_tracker_package_is_refused_before_loading(tiny_config, registry):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(ConfigError, match=r"tracker 'wandb' needs the wandb package: pip install 'qpeft\[wandb\]'"):
        orchestrator.prepare(tiny_config(trackers=["wandb"]), registry=registry)
