"""The CLI's live display: a lifecycle plugin that draws a training progress bar."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .hookspecs import hookimpl


class TrainingProgress:
    """Shows steps, loss and tokens seen; registered in-process by ``qpeft run``."""

    def __init__(self, console: Console):
        self.console = console
        self.progress: Progress | None = None
        self.task = None

    @hookimpl
    def qpeft_on_step_end(self, step, max_steps, logs, ctx):
        if self.progress is None:
            self.progress = Progress(
                TextColumn("[bold]training"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tokens]:,} tok"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=max_steps, loss=logs["loss"], tokens=logs["tokens"])
        self.progress.update(self.task, completed=step, loss=logs["loss"], tokens=logs["tokens"])
        if step >= max_steps:
            self.close()

    def close(self):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    @hookimpl
    def qpeft_on_run_end(self, summary, ctx):
        self.close()
