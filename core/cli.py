"""``qpeft`` command line. Every user error exits 2 with one line on stderr, no traceback."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import typer
import typer.core
from rich.console import Console
from rich.table import Table

from .errors import QpeftError


def _untyped_flags(command) -> None:
    """Help shows a flag (``--check``, ``--help``) without a ``<bool>`` type: it takes no value."""
    for param in command.params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""


class _UntypedFlags:
    """Mixed into typer's command and group classes: flags and ``--help`` show no type."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _untyped_flags(self)

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class _Command(_UntypedFlags, typer.core.TyperCommand):
    pass


class _Group(_UntypedFlags, typer.core.TyperGroup):
    pass


app = typer.Typer(
    cls=_Group, add_completion=False, no_args_is_help=True, help="Fine-tune LLMs: any quantizer × any PEFT method × any trainer."
)
config_app = typer.Typer(cls=_Group, no_args_is_help=True, help="Inspect configuration.")
app.add_typer(config_app, name="config")
console = Console(stderr=True)
out = Console()

SET_HELP = "Override a config key: --set trainer.options.lr=1e-4 (repeatable)."
CHECK_HELP = (
    "Validate the config and the files it names, then exit: the model folder's config.json, tokenizer and "
    "safetensors headers, and the first 5,000 rows of each data file. Loads no weights, tokenizes nothing."
)


#: Errors reported as one line with exit status 2: qpeft's own, and the operating system's
#: (disk full, permission denied, a path that is a file), which the user can act on.
USER_ERRORS = (QpeftError, OSError)


def _fail(exc: BaseException) -> None:
    """Print ``exc`` as one line on stderr (its text is never read as markup) and exit 2."""
    from rich.text import Text

    msg = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.strerror and exc.filename else str(exc)
    msg = " ".join(msg.split()) or type(exc).__name__
    _close_displays()
    # a Text, not markup: rich.markup.escape leaves a backslash before "[" alone, and markup then
    # ate it (a config key "\[" was named as "[", found by tests/test_fuzz_config.py)
    console.print(Text.assemble(("error:", "bold red"), " ", msg), highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _registry(extra=()):
    from .registry import load_registry

    return load_registry(extra)


def _say_factory():
    """A line printer for a command's progress (timestamped, never wrapped, a spinner between
    lines on a terminal): :class:`qpeft.progress.Display`."""
    from .progress import Display

    return Display(console).say


def _close_displays() -> None:
    """Stop the spinner and progress bars before a command prints its result or an error."""
    if "qpeft.progress" in sys.modules:
        sys.modules["qpeft.progress"].close_displays()


@app.command()
def plugins(as_json: bool = typer.Option(False, "--json", help="Machine-readable listing with capabilities.")):
    """List installed backends, their capabilities, and broken plugins."""
    try:
        info = _registry().describe()
    except USER_ERRORS as exc:
        _fail(exc)
    if as_json:
        out.print_json(json.dumps(info))
        return
    for kind in ("quantizer", "peft", "trainer", "evaluator", "tracker"):
        # Capabilities are never cut (one a line, the column as wide as the longest); the
        # plugin's source is shown under its name; descriptions wrap.
        from rich.markup import escape

        table = Table(title=f"{kind} backends", title_justify="left")
        table.add_column("name (source)", overflow="fold", ratio=1)
        table.add_column("description", overflow="fold", ratio=2)
        table.add_column("devices", no_wrap=True)
        table.add_column("capabilities", no_wrap=True)
        for p in info[kind]:
            caps = p["capabilities"]
            flags = [k for k in ("trainable", "mergeable", "grad_checkpointing", "fsdp") if caps.get(k) and kind != "evaluator"]
            if kind == "quantizer":
                flags.append(f"merge: {caps['merge_source']}")
            name = f"[bold]{escape(p['name'])}[/]\n[dim]{escape(p['source'])}[/]"
            table.add_row(name, escape(p["description"]), ",".join(caps["devices"]), "\n".join(flags))
        out.print(table)
    for b in info["broken"]:
        out.print(f"[red]broken plugin[/] {b['name']} ({b['source']}): {b['reason']}")


@app.command()
def run(
    config: str = typer.Argument(..., metavar="CONFIG", help="YAML config file."),
    set_: list[str] | None = typer.Option(None, "--set", metavar="KEY=VALUE", help=SET_HELP),
    check: bool = typer.Option(False, "--check", help=CHECK_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest complete checkpoint in output_dir."),
):
    """Fine-tune, save, reload and generate as the config says."""
    from .orchestrator import prepare
    from .progress import TrainingProgress

    progress = TrainingProgress(console)
    try:
        resolved, registry = prepare(config, set_ or [], _registry([progress]))
    except USER_ERRORS as exc:
        _fail(exc)
    if check:
        from .preflight import check_files

        try:
            checked = check_files(resolved.config, getattr(resolved.trainer, "data_kind", "lm"))
        except USER_ERRORS as exc:
            _fail(exc)
        out.print(
            f"config ok: quantizer {resolved.quantizer.name}, peft {resolved.peft.name}, trainer {resolved.trainer.name} on {resolved.device}"
        )
        for note in [*checked, *resolved.notes]:
            out.print(f"note: {note}", highlight=False, soft_wrap=True)
        return
    from . import orchestrator

    try:
        summary = orchestrator.run(resolved, registry, say=progress.say, resume=resume)
        if "rank" in summary:  # a data-parallel worker; rank 0 prints the summary
            return
    except USER_ERRORS as exc:
        progress.close()
        _fail(exc)
    except KeyboardInterrupt:
        progress.close()
        _resume_hint(resolved.config.output_dir, config, set_ or [])
        raise
    _close_displays()
    _print_summary(summary, resolved.config.output_dir)


def _resume_hint(output_dir: str, config: str, overrides: list[str]) -> None:
    """After Ctrl-C: say how to continue when a complete checkpoint was written."""
    from .checkpoint import latest_complete

    try:
        path = latest_complete(output_dir)
    except OSError:
        return
    if path is not None:
        import shlex

        command = shlex.join(["qpeft", "run", config, *(a for o in overrides for a in ("--set", o)), "--resume"])
        console.print(f"checkpoint {path} is complete; to continue from it: {command}", highlight=False, soft_wrap=True, markup=False)


def _print_summary(s: dict, output_dir: str) -> None:
    table = Table(title="qpeft run summary", title_justify="left", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    mem = ", ".join(f"{k.removeprefix('peak_').removesuffix('_gib')} {s[k]:.2f} GiB" for k in s if k.startswith("peak_"))
    rows = [
        ("backends", f"{s['quantizer']} + {s['peft']} + {s['trainer']} on {s['device']} ({s['device_name']}, {s['dtype']})"),
        ("base weights", f"{s['weight_memory_gib']:.3f} GiB, loaded in {s['load_seconds']:.1f} s"),
        ("trainable", f"{s['trainable_params']:,} / {s['total_params']:,} ({s['trainable_percent']:.3f}%)"),
        (
            "training",
            f"{s['train_steps']} steps, {s['train_tokens']:,} tokens in {s['train_seconds']:.1f} s = {s['tokens_per_s']:.1f} tokens/s",
        ),
        ("train loss", f"{s['train_loss']:.4f}"),
        ("peak memory", mem),
        ("val perplexity", f"{s['val_perplexity_before']} → {s['val_perplexity_after']} ({s['val_tokens']} tokens)")
        if s.get("objective", "lm") == "lm"
        else (f"held-out {s['objective']}", _objective_text(s.get("objective_metrics") or {})),
        ("reload check", f"max |Δlogit| = {s['reload_max_abs_logit_diff']:.2e}"),
        ("prompt", s["generation"]["prompt"]),
        ("generation", s["generation"]["completion"] + ("  [dim]<eos>[/]" if s["generation"]["stopped_at_eos"] else "")),
        ("outputs", f"{output_dir}/adapter, {output_dir}/summary.json, {output_dir}/resolved_config.yaml"),
    ]
    for label, entry in (s.get("eval") or {}).items():
        key = entry.get("primary")
        if key and entry["evaluator"] != "perplexity":  # perplexity has its row above
            values = [(entry.get(stage) or {}).get(key) for stage in ("before", "after")]
            rows.insert(-3, (f"eval {label}", f"{key}: " + " → ".join("–" if v is None else f"{v:.4g}" for v in values)))
    for note in s["notes"]:
        rows.append(("note", note))
    for k, v in rows:
        table.add_row(k, v)
    out.print(table)


@app.command()
def generate(
    adapter: str = typer.Option(..., "--adapter", metavar="DIR", help="Adapter folder written by qpeft."),
    prompt: str = typer.Option(
        ..., "--prompt", metavar="TEXT", help="Text to continue; rendered with the tokenizer's chat template when it has one (as in a run)."
    ),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, max=8192, help="1 to 8192 (as generate.max_new_tokens)."),
    set_: list[str] | None = typer.Option(
        None, "--set", metavar="KEY=VALUE", help="Override the base, e.g. --set quantizer=bnb-8bit (repeatable)."
    ),
):
    """Rebuild the quantized base from the adapter's metadata, load the adapter, generate."""
    from . import orchestrator

    try:
        result = orchestrator.generate(adapter, prompt, _registry(), set_ or [], max_new_tokens, say=_say_factory())
    except USER_ERRORS as exc:
        _fail(exc)
    _close_displays()
    out.print(result["completion"], highlight=False)
    console.print(
        f"[dim]{result['new_tokens']} tokens, {result['tokens_per_s']:.1f} tokens/s, stopped at EOS: {result['stopped_at_eos']}[/]"
    )


@app.command()
def quantize(
    config: str = typer.Argument(..., metavar="CONFIG", help="Run config whose model and quantizer sections to use."),
    out_dir: str = typer.Option(..., "--out", metavar="DIR", help="Folder for the quantized model (model.name_or_path can name it)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if qpeft wrote it."),
    set_: list[str] | None = typer.Option(None, "--set", metavar="KEY=VALUE", help="Override a config key (repeatable)."),
):
    """Quantize the config's base model once and save it; loaded back and verified by logits."""
    from . import orchestrator

    try:
        result = orchestrator.quantize(config, _merge_out(out_dir), _registry(), overrides=set_ or [], force=force, say=_say_factory())
    except USER_ERRORS as exc:
        _fail(exc)
    _close_displays()
    out.print_json(json.dumps(result))


@app.command()
def merge(
    adapter: str = typer.Option(..., "--adapter", metavar="DIR", help="Adapter folder written by qpeft."),
    out_dir: str = typer.Option(..., "--out", metavar="DIR", help="Folder for the merged full-precision model."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    dtype: str = typer.Option("float32", "--dtype", help="Saved dtype: float32, bfloat16 or float16 (the merge runs in float32)."),
    requantize: str | None = typer.Option(
        None,
        "--requantize",
        metavar="NAME|CONFIG",
        help="Also save the merged model quantized with this quantizer (e.g. bnb-nf4), or with the quantizer section of "
        "this YAML config, as OUT-NAME; it is loaded back from disk and verified by logits.",
    ),
    requantize_set: list[str] | None = typer.Option(
        None,
        "--requantize-set",
        metavar="KEY=VALUE",
        help="An option of the --requantize quantizer, e.g. --requantize-set bits=8 (repeatable; default: the config's, "
        "or the adapter's own options when it is the quantizer the adapter was trained with).",
    ),
    set_: list[str] | None = typer.Option(
        None, "--set", metavar="KEY=VALUE", help="Override the base, e.g. --set model.name_or_path=/models/base (repeatable)."
    ),
):
    """Merge the adapter into full-precision weights; write a plain transformers model."""
    from . import orchestrator

    try:
        if dtype not in ("float32", "bfloat16", "float16"):
            raise QpeftError(f"--dtype: expected float32, bfloat16 or float16, got {dtype!r}")
        out_dir = _merge_out(out_dir)
        result = orchestrator.merge(
            adapter,
            out_dir,
            _registry(),
            force=force,
            overrides=set_ or [],
            dtype=dtype,
            requantize=requantize,
            requantize_options=requantize_set or [],
            say=_say_factory(),
        )
    except USER_ERRORS as exc:
        _fail(exc)
    _close_displays()
    out.print_json(json.dumps(result))


def _merge_out(out_dir: str) -> str:
    """``--out`` as an absolute path (``~`` and ``$VARS`` expanded, as in a config), so that
    ``.``, ``..`` and trailing slashes name a folder (and ``OUT-QUANTIZER`` a sibling of it)."""
    from .config import expand_path
    from .outputs import system_folder

    if not out_dir.strip():
        raise QpeftError("--out: empty; name the folder for the merged model")
    try:
        path = os.path.abspath(expand_path(out_dir))
    except ValueError as exc:
        raise QpeftError(f"--out: {exc}") from None
    where = system_folder(path)
    if where:
        raise QpeftError(f"--out: {out_dir} is {where}; name a folder of its own")
    return path


@config_app.command("schema")
def config_schema(backend: str | None = typer.Argument(None, metavar="KIND:NAME", help="kind:name, e.g. quantizer:bnb-nf4")):
    """Print the JSON schema of the run config, or of one backend's options."""
    from .config import RunConfig

    try:
        if backend is None:
            out.print_json(json.dumps(RunConfig.model_json_schema()))
            return
        kind, _, name = backend.partition(":")
        if kind not in ("quantizer", "peft", "trainer", "evaluator", "tracker") or not name:
            raise QpeftError(f"expected kind:name with kind in quantizer, peft, trainer, evaluator, tracker; got {backend!r}")
        out.print_json(json.dumps(_registry().get(kind, name).Options.model_json_schema()))
    except USER_ERRORS as exc:
        _fail(exc)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        out.print(f"qpeft {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print qpeft's version and exit."),
) -> None:
    """Fine-tune LLMs: any quantizer × any PEFT method × any trainer."""


# ---------------------------------------------------------------------------- qpeft bench


class _BenchGroup(_Group):
    """``qpeft bench MATRIX.yaml`` is ``qpeft bench run MATRIX.yaml``; ``qpeft bench report DIR`` reports."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


BENCH_HELP = (
    "Benchmark matrices: quantizer × PEFT method × trainer × any config key.\n\n"
    "qpeft bench MATRIX [OPTIONS] runs the cells of a matrix YAML file (configs/bench/) and writes the report; it is "
    "short for qpeft bench run MATRIX [OPTIONS] (options: qpeft bench run --help).\n\n"
    "Run the same command again to resume: finished cells are kept, the others run.\n\n"
    "qpeft bench report DIR writes the report of a results folder again."
)

bench_app = typer.Typer(cls=_BenchGroup, no_args_is_help=True, subcommand_metavar="MATRIX | COMMAND [ARGS]...", help=BENCH_HELP)
app.add_typer(bench_app, name="bench")


class _BenchDisplay:
    """Live display of ``qpeft bench``: a bar over the cells to run, one for the running cell,
    and a line per finished cell."""

    def __init__(self, console: Console):
        self.console = console
        self.progress = None
        self.matrix_task = None
        self.cells: dict[str, tuple] = {}  # running cell -> (progress task, its line's prefix); several with --gpus

    @staticmethod
    def _name(labels: dict) -> str:
        return " · ".join(labels.values())

    def __call__(self, event: dict) -> None:
        from rich.markup import escape

        kind, say = event["type"], self.console.print
        if kind == "plan":
            actions = [c["action"] for c in event["cells"]]
            n_run = actions.count("run")
            say(
                f"matrix [bold]{escape(event['matrix'])}[/]: {len(actions)} cells — {n_run} to run, {actions.count('done')} "
                f"finished before, {actions.count('unsupported')} not supported; results in {escape(event['directory'])}",
                highlight=False,
            )
            first = next((c for c in event["cells"] if c.get("timeout")), None)
            if first is not None:
                setting = event.get("timeout_s", "auto")
                later = "; later cells' defaults follow what similar cells measured" if setting == "auto" and n_run > 1 else ""
                say(f"timeout per cell: {escape(first['timeout'])}{later}", highlight=False)
            if n_run and self.progress is None:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

                self.progress = Progress(
                    SpinnerColumn(),
                    TextColumn("{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    console=self.console,
                    transient=True,
                )
                self.progress.start()
                self.matrix_task = self.progress.add_task("cells", total=n_run)
        elif kind == "unsupported":
            say(f"  [yellow]–[/] {escape(self._name(event['labels']))}: not supported: {escape(event['reason'])}", highlight=False)
        elif kind == "done":
            status = event["record"].get("status")
            say(
                f"  [dim]{'✓' if status == 'ok' else '✗'} {escape(self._name(event['labels']))}: finished before ({status})[/]",
                highlight=False,
            )
        elif kind == "start" and self.progress is not None:
            gpu = f" (GPU {event['gpu']})" if "gpu" in event else ""
            prefix = f"[{event['index']}/{event['total']}] {escape(self._name(event['labels']))}{gpu}"
            self.cells[event["cell"]] = (self.progress.add_task(f"{prefix}: starting", total=None), prefix)
        elif kind == "progress" and event["cell"] in self.cells:
            task, prefix = self.cells[event["cell"]]
            if event.get("kind") == "step":
                self.progress.update(
                    task, total=event["max_steps"], completed=event["step"], description=f"{prefix}: training, loss {event['loss']:.3f}"
                )
            elif event.get("kind") == "message":
                self.progress.update(task, description=f"{prefix}: {escape(event['text'][:70])}")
        elif kind == "end":
            if event["cell"] in self.cells:
                task, _ = self.cells.pop(event["cell"])
                self.progress.remove_task(task)
                self.progress.advance(self.matrix_task)
            r, name = event["record"], escape(self._name(event["labels"]))
            if r["status"] == "ok":
                m = r["metrics"]
                peak = m.get("peak_reserved_gib", m.get("peak_rss_gib"))
                tps = m.get("tokens_per_s_after_warmup") or m.get("tokens_per_s")

                def num(x, spec):
                    return "–" if x is None else format(x, spec)

                say(
                    f"  [green]✓[/] {name}: {num(tps, '.1f')} tok/s, peak {num(peak, '.2f')} GiB, val ppl "
                    f"{num(m.get('val_perplexity_before'), '.5g')} → {num(m.get('val_perplexity_after'), '.5g')} "
                    f"({r['wall_seconds']:.0f} s)",
                    highlight=False,
                )
            else:
                say(f"  [red]✗[/] {name}: {escape(r['error'])} (log: {escape(r['log'])})", highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@bench_app.command("run")
def bench_run(
    matrix: str = typer.Argument(..., metavar="MATRIX", help="Matrix YAML file (see configs/bench/)."),
    out_dir: str | None = typer.Option(
        None, "--out", metavar="DIR", help="Results folder (default: the matrix's output_dir, else runs/bench/NAME)."
    ),
    set_: list[str] | None = typer.Option(
        None, "--set", metavar="KEY=VALUE", help="Override a run-config key in every cell: --set trainer.options.max_steps=2 (repeatable)."
    ),
    only: list[str] | None = typer.Option(
        None, "--only", metavar="SEL", help="Run only matching cells: 'quantizer=bnb-nf4,peft=lora' or a glob on the cell id (repeatable)."
    ),
    rerun: list[str] | None = typer.Option(
        None, "--rerun", metavar="SEL", help="Run matching cells again even if finished (same syntax; '*' for all)."
    ),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Run the cells that failed before again."),
    list_cells: bool = typer.Option(False, "--list", help="List the cells and what a run would do; run nothing."),
    stop_after: float | None = typer.Option(None, "--stop-after", help="Start no new cell after this many seconds (run again to resume)."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write the report (Markdown, CSV, plots) at the end."),
    gpus: str | None = typer.Option(
        None, "--gpus", help="Run cells side by side, one per GPU of this comma-separated list (CUDA_VISIBLE_DEVICES), e.g. 0,1,2,3."
    ),
    isolation: str | None = typer.Option(
        None,
        "--isolation",
        help="process: a fresh process per cell; worker: one process (per GPU) runs cell after cell. Default: the matrix's (process).",
    ),
):
    """Run every cell of a matrix, each in its own process (or --isolation worker); resume where an earlier run stopped."""
    import shlex
    import signal

    from . import bench

    display = _BenchDisplay(console)
    signal.signal(signal.SIGTERM, _interrupt)  # e.g. `timeout`: stop the running cell, record nothing for it
    try:
        result = bench.run_matrix(
            matrix,
            out_dir=out_dir,
            overrides=set_ or [],
            only=only or [],
            rerun=rerun or [],
            retry_failed=retry_failed,
            dry_run=list_cells,
            stop_after_s=stop_after,
            on_event=display if not list_cells else bench._no_event,
            command="qpeft " + shlex.join(sys.argv[1:]),
            gpus=[g.strip() for g in gpus.split(",") if g.strip()] if gpus else (),
            isolation=isolation,
        )
    except USER_ERRORS as exc:
        display.close()
        _fail(exc)
    except KeyboardInterrupt:
        display.close()
        if not list_cells:
            console.print(
                f"to resume, run the same command again: {' '.join(['qpeft', *map(shlex.quote, sys.argv[1:])])} "
                "(finished cells are kept; the interrupted one runs again)",
                highlight=False,
                soft_wrap=True,
                markup=False,
            )
        raise
    display.close()
    if list_cells:
        table = Table(title=f"cells of {matrix} (results in {result['directory']})", title_justify="left")
        for col in ("cell", "would", "reason / timeout"):
            table.add_column(col)
        for cell_id, action, reason in result["actions"]:
            table.add_row(cell_id, action, reason or result["timeouts"].get(cell_id, ""))
        out.print(table)
        return
    out.print(
        f"{result['ok']} ok, {result['failed']} failed, {result['unsupported']} not supported, "
        f"{result['done']} finished before, {result['not_started']} not started; results in {result['directory']}",
        highlight=False,
    )
    if report and (Path(result["directory"]) / bench.RESULTS_FILE).is_file():
        _bench_report(result["directory"])


def _bench_report(directory: str) -> None:
    from .bench.report import write_report

    try:
        written = write_report(directory)
    except USER_ERRORS as exc:
        _fail(exc)
    out.print(
        f"report: {written['markdown']}, {written['csv']}" + "".join(f", {p}" for p in written["plots"]) + f", {written['html']}",
        highlight=False,
    )
    if written["note"]:
        console.print(written["note"], highlight=False)


@bench_app.command("report")
def bench_report(directory: str = typer.Argument(..., metavar="DIR", help="Results folder of a qpeft bench run.")):
    """Write report.md, results.csv, the PNG plots and report.html of a results folder."""
    _bench_report(directory)


@app.command("report")
def run_report(run_dir: str = typer.Argument(..., metavar="RUN_DIR", help="Output folder of a qpeft run.")):
    """Write RUN_DIR/report.html: loss curve, evaluation results, memory, notes, config."""
    from .html_report import write_run_html

    try:
        path = write_run_html(run_dir)
    except USER_ERRORS as exc:
        _fail(exc)
    out.print(f"report: {path}", highlight=False)


INTERRUPTED = "interrupted: finished outputs are intact; partial ones were not written"


_interrupted = False


def _exit_after_interrupt(code: int) -> None:
    """Leave at once after an interrupt was reported: the exit handlers run and output is
    flushed, but the interpreter's teardown (seconds with torch, transformers and gptqmodel
    loaded) is skipped, and so is Python 3.11's own exit through SIGINT when a library's C code
    saw the KeyboardInterrupt first (``_Py_UnhandledKeyboardInterrupt``: exit status -2, not 130)."""
    import atexit

    try:
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001 - a second Ctrl-C, or a failing handler: leave anyway
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            pass
    os._exit(code)


def _report_interrupts(command):
    """Typer turns a KeyboardInterrupt into a silent exit 130 before it leaves ``app()``: each
    command says what an interrupt left behind itself, then exits 130."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            global _interrupted
            _interrupted = True
            console.print(INTERRUPTED, style="red", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None

    return wrapper


for _typer in (app, bench_app, config_app):
    for _command in _typer.registered_commands:
        _command.callback = _report_interrupts(_command.callback)
        _command.cls = _Command


def main() -> None:
    """Console-script entry point."""
    from . import timeline

    timeline.mark_command_start()
    from .quiet import defer_gptqmodel, install_log_filters, set_omp_wait_policy

    set_omp_wait_policy()  # before torch loads OpenMP; see qpeft.quiet
    install_log_filters()
    defer_gptqmodel()  # imported by the gptq quantizer only, not by peft behind its back
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # No network at run time: hub ids work only when QPEFT_ALLOW_HUB=1 (or if already cached).
    if os.environ.get("QPEFT_ALLOW_HUB") != "1":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # transformers 5.x deprecation chatter triggered inside peft; not actionable for users.
    warnings.filterwarnings("ignore", message=r".*deprecated and will be removed in v6", category=FutureWarning)
    # torchao (pulled in by gptqmodel) logs missing optional CUDA extensions on every import.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    try:
        app()
    except SystemExit as exc:
        if exc.code == 130:  # an interrupt: reported by the command, or (while typer parses) not yet
            if not _interrupted:
                console.print(INTERRUPTED, style="red", highlight=False, soft_wrap=True)
            _exit_after_interrupt(130)
        raise


if __name__ == "__main__":
    main()


def _objective_text(metrics: dict) -> str:
    """A non-SFT run's held-out metrics before → after training, as the bench report shows them."""
    from .bench.report import objective_text

    return objective_text(metrics.get("eval_before") or {}, metrics.get("eval_after") or {})
