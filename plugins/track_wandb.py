"""Weights & Biases tracker, offline only: the run is written under ``OUTPUT_DIR/wandb``
(``wandb sync`` uploads it later, if you wish); qpeft never reaches the network. Needs the
``wandb`` package, which neither the cpu nor the all extra installs (``pip install 'qpeft[wandb]'``)."""

from __future__ import annotations

from pydantic import Field

from qpeft import hookimpl
from qpeft.api import Options, TrackerPlugin
from qpeft.tracking import in_output_dir, step_metrics, summary_metrics


class WandbOptions(Options):
    #: The W&B project name recorded in the offline run.
    project: str = Field("qpeft", min_length=1)
    #: Folder that holds the ``wandb/`` run folder; a relative path is under output_dir.
    dir: str = Field(".", min_length=1)
    #: The run's name; null = W&B's default.
    run_name: str | None = None


class _Session:
    def __init__(self, run):
        self.run = run
        self.where = f"{run.dir} (offline)"

    @hookimpl
    def qpeft_on_step_end(self, step, max_steps, logs, ctx):
        self.run.log(step_metrics(logs), step=step)

    @hookimpl
    def qpeft_on_run_end(self, summary, ctx):
        for key, value, _ in summary_metrics(summary):
            self.run.summary[key] = value

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


class WandbTracker(TrackerPlugin):
    name = "wandb"
    description = "Weights & Biases in offline mode (OUTPUT_DIR/wandb); needs the wandb package."
    Options = WandbOptions
    requires = "wandb"
    extra = "wandb"

    def start(self, options, config, ctx):
        import wandb

        folder = in_output_dir(options.dir, ctx)
        folder.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=options.project, name=options.run_name, dir=str(folder), mode="offline", config=config, reinit="create_new"
        )
        return _Session(run)


@hookimpl
def qpeft_register_trackers(register):
    register(WandbTracker())
