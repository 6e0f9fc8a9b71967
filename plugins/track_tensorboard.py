"""TensorBoard tracker: event files (torch's ``SummaryWriter``) with the resolved config as
text, ``train/*`` scalars per step, ``eval/*`` and ``run/*`` scalars at the end
(:mod:`qpeft.tracking`). Needs the ``tensorboard`` package (``pip install 'qpeft[tensorboard]'``)."""

from __future__ import annotations

import json

from pydantic import Field

from qpeft import hookimpl
from qpeft.api import Options, TrackerPlugin
from qpeft.config import dump_yaml
from qpeft.tracking import in_output_dir, step_metrics, summary_metrics


class TensorBoardOptions(Options):
    #: Folder of the event files; a relative path is under the run's output_dir.
    log_dir: str = Field("tensorboard", min_length=1)
    #: Seconds between writes of buffered events to disk (everything is flushed at the end).
    flush_secs: int = Field(10, ge=1, le=3600)


class _Session:
    def __init__(self, writer, where: str):
        self.writer = writer
        self.where = where

    @hookimpl
    def qpeft_on_step_end(self, step, max_steps, logs, ctx):
        for key, value in step_metrics(logs).items():
            self.writer.add_scalar(key, value, step)

    @hookimpl
    def qpeft_on_run_end(self, summary, ctx):
        for key, value, step in summary_metrics(summary):
            self.writer.add_scalar(key, value, step)
        # Markdown in TensorBoard's text tab: indented lines are shown as code.
        text = json.dumps({k: v for k, v in summary.items() if k != "loss_history"}, indent=2, default=str)
        self.writer.add_text("summary", "    " + text.replace("\n", "\n    "), int(summary.get("train_steps") or 0))

    def finish(self, status: str) -> None:
        self.writer.add_text("status", status)
        self.writer.close()


class TensorBoardTracker(TrackerPlugin):
    name = "tensorboard"
    description = "TensorBoard event files under OUTPUT_DIR/tensorboard: config, per-step metrics, evaluation results."
    Options = TensorBoardOptions
    requires = "tensorboard"
    extra = "tensorboard"

    def start(self, options, config, ctx):
        from torch.utils.tensorboard import SummaryWriter

        log_dir = in_output_dir(options.log_dir, ctx)
        writer = SummaryWriter(log_dir=str(log_dir), flush_secs=options.flush_secs)
        writer.add_text("config", "    " + dump_yaml(config).replace("\n", "\n    "), 0)
        return _Session(writer, str(log_dir))


@hookimpl
def qpeft_register_trackers(register):
    register(TensorBoardTracker())
