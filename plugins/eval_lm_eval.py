"""Evaluator ``lm-eval``: EleutherAI's lm-evaluation-harness (``lm_eval.simple_evaluate``) on the
model in memory -- before training the quantized base, after it the base with the trained
adapter, not merged -- wrapped in the harness's ``HFLM``, which accepts a model object.

Tasks are the harness's own (when their data is already on this machine: evaluation runs
offline) or defined over local files in custom-task YAML files (``include_path``). qpeft ships
``python_topics_mc``, a 74-question multiple-choice smoke task built from the embedded documents
(``scripts/build_eval_data.py``): an accuracy number without network, not a benchmark.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from pathlib import Path

from pydantic import Field

from qpeft import hookimpl
from qpeft.api import EvalResult, EvaluatorPlugin, Options
from qpeft.errors import ConfigError, QpeftError

SHIPPED_TASKS = {"python_topics_mc": "python_topics_mc.yaml"}
INSTALL_HINT = "pip install 'qpeft[lm-eval]' (lm-eval)"


def shipped_task(name: str) -> dict:
    """The config of a task qpeft ships, its data file made absolute (a dict the harness loads)."""
    import yaml

    import qpeft.data

    folder = Path(qpeft.data.__file__).parent / "evals"
    config = yaml.safe_load((folder / SHIPPED_TASKS[name]).read_text(encoding="utf-8"))
    files = config["dataset_kwargs"]["data_files"]
    config["dataset_kwargs"]["data_files"] = {split: str(folder / f) for split, f in files.items()}
    return config


class LmEvalOptions(Options):
    #: Task names: python_topics_mc (shipped), tasks in include_path's YAML files, or the
    #: harness's own tasks whose data is already on this machine.
    tasks: list[str] = Field(default_factory=lambda: ["python_topics_mc"], min_length=1)
    #: A folder (or YAML file) of custom task configs over local files.
    include_path: str | None = None
    #: Evaluate the first this many examples of each task (null = all).
    limit: int | None = Field(None, ge=1)
    #: Few-shot examples per question (null = the task's default).
    num_fewshot: int | None = Field(None, ge=0)
    #: Requests per forward pass.
    batch_size: int = Field(8, ge=1, le=4096)


def _offline():
    """The harness and its libraries in offline mode (their flags are read at import time, so
    the module constants are set too); qpeft's network guard closes sockets as well."""
    stack = contextlib.ExitStack()
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_EVALUATE_OFFLINE"):
        old = os.environ.get(key)
        os.environ[key] = "1"
        stack.callback(lambda k=key, v=old: os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v))
    for module, attr in (
        ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_DATASETS_OFFLINE"),
    ):
        with contextlib.suppress(ImportError, AttributeError):
            mod = __import__(module, fromlist=[attr])
            if hasattr(mod, attr):
                old = getattr(mod, attr)
                setattr(mod, attr, True)
                stack.callback(setattr, mod, attr, old)
    return stack


def task_manager(options):
    """A TaskManager knowing qpeft's tasks and ``include_path``'s; the harness's own ~15k task
    configs are indexed (~10-25 s) only when a task is found in neither."""
    from lm_eval.tasks import TaskManager

    local = [t for t in options.tasks if t not in SHIPPED_TASKS]
    include = [options.include_path] if options.include_path else None
    manager = TaskManager(include_path=include, include_defaults=False)
    if any(t not in manager.all_tasks for t in local):
        manager = TaskManager(include_path=include, include_defaults=True)
    return manager


class LmEval(EvaluatorPlugin):
    name = "lm-eval"
    description = "EleutherAI lm-evaluation-harness tasks on the model in memory (offline; custom tasks from local files)"
    Options = LmEvalOptions

    def check(self, options, ctx):
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise ConfigError("tasks", f"the lm-eval evaluator needs the lm-evaluation-harness: {INSTALL_HINT}") from None
        if options.include_path and not Path(options.include_path).expanduser().exists():
            raise ConfigError("include_path", f"no such file or folder: {options.include_path}")
        manager = task_manager(options)
        known = set(manager.all_tasks) | set(SHIPPED_TASKS)
        for task in options.tasks:
            if task not in known:
                hint = difflib.get_close_matches(task, sorted(known), n=1)
                raise ConfigError("tasks", f"unknown lm-eval task {task!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))

    def evaluate(self, model, tokenizer, options, ctx, *, stage, data, out_dir):
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        tasks = [shipped_task(t) if t in SHIPPED_TASKS else t for t in options.tasks]
        with _offline():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size)
            try:
                out = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=tasks,
                    task_manager=task_manager(options),
                    limit=options.limit,
                    num_fewshot=options.num_fewshot,
                    log_samples=False,
                    bootstrap_iters=0,
                    random_seed=ctx.config.seed,
                    numpy_random_seed=ctx.config.seed,
                    torch_random_seed=ctx.config.seed,
                    fewshot_random_seed=ctx.config.seed,
                )
            except (ConnectionError, OSError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise QpeftError(
                    f"an lm-eval task needs data or a metric that is not on this machine (evaluation runs offline): {first}"
                ) from exc
        return results_to_eval(out)


def results_to_eval(out: dict) -> EvalResult:
    """The harness's results as ``{task}/{metric}`` numbers (filter ``none`` dropped; other
    filters as ``{metric}@{filter}``), with the harness's higher-is-better flags."""
    metrics, better, primary = {}, {}, None
    for task, values in out["results"].items():
        flags = out.get("higher_is_better", {}).get(task, {})
        for key, value in values.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filt = key.split(",", 1)
            name = f"{task}/{metric}" + ("" if filt == "none" else f"@{filt}")
            metrics[name] = value
            base = metric.removesuffix("_stderr")
            if base == metric and isinstance(flags.get(base), bool):
                better[name] = flags[base]
                if primary is None and flags[base]:
                    primary = name
        if "n-samples" in out and task in out["n-samples"]:
            metrics[f"{task}/samples"] = out["n-samples"][task].get("effective")
    return EvalResult(metrics=metrics, higher_is_better=better, primary=primary)


@hookimpl
def qpeft_register_evaluators(register):
    register(LmEval())
