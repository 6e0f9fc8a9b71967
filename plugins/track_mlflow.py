"""MLflow tracker: one MLflow run per qpeft run, in a local SQLite store by default
(``OUTPUT_DIR/mlflow.db``, artifacts in ``OUTPUT_DIR/mlartifacts``), with the resolved config
as parameters, ``train/*`` metrics per step, ``eval/*`` and ``run/*`` metrics at the end
(:mod:`qpeft.tracking`) and the adapter, summary and config as artifacts. Needs
``mlflow-skinny`` with SQLAlchemy and Alembic (``pip install 'qpeft[mlflow]'``)."""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import Field

from qpeft import hookimpl
from qpeft.api import Options, TrackerPlugin
from qpeft.tracking import flatten, in_output_dir, step_metrics, summary_metrics

#: MLflow refuses longer parameter values (``MAX_PARAM_VAL_LENGTH``).
MAX_PARAM = 6000


class MlflowOptions(Options):
    #: Where runs are stored: a tracking URI (sqlite:///..., file:///..., http://...); null = a
    #: SQLite store OUTPUT_DIR/mlflow.db. (MLflow 3 refuses its file store unless
    #: MLFLOW_ALLOW_FILE_STORE=true is set.)
    tracking_uri: str | None = None
    #: Folder of the artifacts of a new experiment; a relative path is under output_dir.
    artifact_dir: str = Field("mlartifacts", min_length=1)
    #: The experiment the run belongs to (created when missing).
    experiment: str = Field("qpeft", min_length=1)
    #: The run's name; null = the output folder's name.
    run_name: str | None = None
    #: Upload the saved adapter folder as the run's artifact ``adapter``.
    log_adapter: bool = True


class _Session:
    def __init__(self, client, run_id: str, where: str):
        self.client, self.run_id, self.where = client, run_id, where

    @hookimpl
    def qpeft_on_step_end(self, step, max_steps, logs, ctx):
        from mlflow.entities import Metric

        now = _now_ms()
        metrics = [Metric(k, v, now, step) for k, v in step_metrics(logs).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)

    @hookimpl
    def qpeft_on_run_end(self, summary, ctx):
        from mlflow.entities import Metric

        now = _now_ms()
        metrics = [Metric(k, v, now, step) for k, v, step in summary_metrics(summary)]
        self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)
        out = Path(ctx.output_dir)
        for name in ("summary.json", "resolved_config.yaml"):
            if (out / name).is_file():
                self.client.log_artifact(self.run_id, str(out / name))
        if self.log_adapter and (out / "adapter").is_dir():
            self.client.log_artifacts(self.run_id, str(out / "adapter"), "adapter")

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


class MlflowTracker(TrackerPlugin):
    name = "mlflow"
    description = "An MLflow run (local SQLite store by default): config as params, per-step metrics, evaluation results, the adapter."
    Options = MlflowOptions
    requires = "mlflow"
    extra = "mlflow"

    def check(self, options, ctx):
        super().check(options, ctx)
        import importlib.util

        from qpeft.errors import ConfigError

        uri = options.tracking_uri or "sqlite:"
        if uri.startswith("sqlite:") and importlib.util.find_spec("sqlalchemy") is None:
            raise ConfigError("trackers", "tracker 'mlflow' with a SQLite store needs sqlalchemy and alembic: pip install 'qpeft[mlflow]'")

    def start(self, options, config, ctx):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        # MLflow logs each schema migration of a new SQLite store at INFO.
        for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
            logging.getLogger(name).setLevel(logging.WARNING)
        out = Path(ctx.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        uri = options.tracking_uri or f"sqlite:///{(out / 'mlflow.db').resolve()}"
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(options.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            artifacts = in_output_dir(options.artifact_dir, ctx).resolve()
            experiment_id = client.create_experiment(options.experiment, artifact_location=artifacts.as_uri())
        run = client.create_run(experiment_id, run_name=options.run_name or out.resolve().name, tags={"qpeft.output_dir": str(out)})
        params = [Param(k, str(v)[:MAX_PARAM]) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run.info.run_id, params=params[i : i + 100], synchronous=True)
        session = _Session(client, run.info.run_id, f"{uri} (experiment {options.experiment!r}, run {run.info.run_id})")
        session.log_adapter = options.log_adapter
        return session


@hookimpl
def qpeft_register_trackers(register):
    register(MlflowTracker())
