"""The command line's live display: timestamped lines, a spinner while a phase runs, training progress.

* Every line (:meth:`Display.say`) starts with the seconds since the command started and is
  printed with soft wrapping: a long line is never broken at the console's width, piped or not.
* On a terminal, a transient spinner runs between lines, naming the time since the last one
  (loading the base, the perplexity passes, the first training step and its compile, reload and
  generation all take seconds to minutes), and training draws a progress bar.
* Piped (not a terminal), training prints a plain line at the first and the last step, at
  every tenth of the run, and whenever :data:`LINE_EVERY_S` seconds passed since the last one::

      12.3s step 10/200 loss 2.3100, 1,234 tok/s, eta 3m05s
"""

from __future__ import annotations

import atexit
import math
import os
import time
import weakref

from rich.console import Console

from .hookspecs import hookimpl

_OPEN: weakref.WeakSet = weakref.WeakSet()


def close_displays() -> None:
    """Stop every live display: before a command prints its result (or an error)."""
    for display in list(_OPEN):
        display.close()


atexit.register(close_displays)  # a live display hides the cursor: never leave it hidden

#: Piped output: the longest wait between two training lines, in seconds
#: (``QPEFT_PROGRESS_SECONDS`` overrides it; 0 prints every step).
LINE_EVERY_S = 15.0


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


class Display:
    """The lines, spinner and training progress of one command; ``say`` is its line printer."""

    def __init__(self, console: Console, start: float | None = None):
        self.console = console
        self.start = time.perf_counter() if start is None else start
        self.live = console.is_terminal and not console.is_dumb_terminal
        every = os.environ.get("QPEFT_PROGRESS_SECONDS")
        try:
            self.every_s = LINE_EVERY_S if every is None else max(0.0, float(every))
        except ValueError:
            self.every_s = LINE_EVERY_S
        self._status = None  # the spinner between lines (terminal only)
        self._last_line = self.start
        _OPEN.add(self)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def say(self, msg: str) -> None:
        """Print one timestamped line (rich markup allowed), never wrapped; then spin."""
        self.console.print(f"[dim]{self.elapsed():6.1f}s[/] {msg}", highlight=False, soft_wrap=True)
        self._last_line = time.perf_counter()
        self._spin()

    # ------------------------------------------------------------------ spinner (terminal)

    def _spin(self) -> None:
        if not self.live:
            return
        if self._status is None:
            from rich.live import Live
            from rich.spinner import Spinner

            self._spinner = Spinner("dots", style="dim")
            self._status = Live(console=self.console, transient=True, refresh_per_second=8, get_renderable=self._spinner_frame)
            self._status.start()

    def _spinner_frame(self):
        since = _duration(time.perf_counter() - self._last_line)
        self._spinner.update(text=f"[dim]working… {since}[/]")
        return self._spinner

    def _stop_spinner(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def close(self) -> None:
        """Stop every live display (idempotent)."""
        self._stop_spinner()


def _metrics(logs: dict) -> str:
    """A trainer's objective metrics (``logs["metrics"]``: reward accuracy, margin, reward, ...)
    as text shown after the loss."""
    return "".join(f" {k} {float(v):.3f}" for k, v in (logs.get("metrics") or {}).items())


class TrainingProgress(Display):
    """:class:`Display` plus the lifecycle hooks that show training: registered in-process by
    ``qpeft run``."""

    def __init__(self, console: Console, start: float | None = None):
        super().__init__(console, start)
        self.progress = None
        self.task = None
        self._train_start: float | None = None
        self._last_step_line: tuple[float, int, int] | None = None  # (time, step, tokens)

    @staticmethod
    def _is_main() -> bool:
        return os.environ.get("RANK", "0") in ("0", "")

    @hookimpl
    def qpeft_on_step_end(self, step, max_steps, logs, ctx):
        if not self._is_main():
            return
        now = time.perf_counter()
        if self._train_start is None:
            self._train_start = now
            self._last_step_line = (now, 0, 0)
        if self.live:
            self._bar(step, max_steps, logs)
        else:
            self._line(now, step, max_steps, logs)
        if step >= max_steps:
            self._close_bar()

    def _bar(self, step, max_steps, logs) -> None:
        if self.progress is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._stop_spinner()  # one live display at a time
            self.progress = Progress(
                TextColumn("[bold]training"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}{task.fields[metrics]}  {task.fields[tokens]:,} tok"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
                redirect_stdout=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=max_steps, loss=logs["loss"], tokens=logs["tokens"], metrics="")
        self.progress.update(self.task, completed=step, loss=logs["loss"], tokens=logs["tokens"], metrics=_metrics(logs))

    def _line(self, now, step, max_steps, logs) -> None:
        """A plain line at the first and last step, every tenth of the run, and every
        ``every_s`` seconds."""
        last_t, last_step, last_tokens = self._last_step_line
        tenth = max(1, math.ceil(max_steps / 10))
        if not (step == 1 or step >= max_steps or step % tenth == 0 or now - last_t >= self.every_s):
            return
        tokens = int(logs.get("tokens", 0))
        dt = now - last_t
        rate = f", {(tokens - last_tokens) / dt:,.0f} tok/s" if dt > 0 and tokens > last_tokens and step > last_step else ""
        eta = ""
        if 1 < step < max_steps:  # the first step (compile, warm-up) is left out of the estimate
            eta = f", eta {_duration((now - self._train_start) / (step - 1) * (max_steps - step))}"
        self.console.print(
            f"{self.elapsed():6.1f}s step {step}/{max_steps} loss {float(logs['loss']):.4f}{_metrics(logs)}{rate}{eta}",
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
        self._last_step_line = (now, step, tokens)

    def _close_bar(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
            self._last_line = time.perf_counter()
            self._spin()  # validation after training, saving, reload: spin until the next line

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        super().close()

    @hookimpl
    def qpeft_on_run_end(self, summary, ctx):
        self.close()
