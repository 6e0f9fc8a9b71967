"""Evaluator ``generation``: greedy completions of prompts read from a file, saved beside the
run, scored by exact match and by containment against each prompt's expected answer(s).

The prompts file is JSON Lines, one object per line::

    {"prompt": "Which keyword starts a loop over items?", "expected": ["for"]}

``expected`` (a string or a list of accepted strings) may be left out: the completion is then
saved but not scored. ``prompts: embedded:python-topics`` (the default) is qpeft's own small set
built from the embedded documents (``scripts/build_eval_data.py``): a smoke test, not a benchmark.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from qpeft import hookimpl
from qpeft.api import EvalResult, EvaluatorPlugin, Options
from qpeft.errors import ConfigError

EMBEDDED_PROMPTS = {"embedded:python-topics": "python_topics_generation.jsonl"}
#: A prompts file larger than this is refused (it is read whole, before any weight loads).
MAX_PROMPTS_BYTES = 16 << 20


def prompts_path(value: str) -> Path:
    """The file an option value names: an ``embedded:`` set shipped with qpeft, or a path."""
    if value in EMBEDDED_PROMPTS:
        import qpeft.data

        return Path(qpeft.data.__file__).parent / "evals" / EMBEDDED_PROMPTS[value]
    return Path(value).expanduser()


def read_prompts(value: str) -> list[dict]:
    """The prompts of a file, each ``{"prompt": str, "expected": [str, ...]}``; a ConfigError
    naming the file and line for anything else."""
    path = prompts_path(value)
    if not path.is_file():
        raise ConfigError("prompts", f"no such file: {path} (a JSON Lines file of {{'prompt': ..., 'expected': ...}} objects)")
    if path.stat().st_size > MAX_PROMPTS_BYTES:
        raise ConfigError("prompts", f"{path} is larger than {MAX_PROMPTS_BYTES >> 20} MiB")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="strict").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError("prompts", f"{path} line {n}: not JSON ({exc.msg})") from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError("prompts", f"{path} line {n}: expected an object with a non-empty 'prompt' string")
        expected = row.get("expected", [])
        expected = [expected] if isinstance(expected, str) else expected
        if not isinstance(expected, list) or not all(isinstance(e, str) and e.strip() for e in expected):
            raise ConfigError("prompts", f"{path} line {n}: 'expected' must be a non-empty string or a list of them")
        rows.append({"prompt": prompt, "expected": expected})
    if not rows:
        raise ConfigError("prompts", f"{path} holds no prompt")
    return rows


def normalize(text: str, case_sensitive: bool) -> str:
    """Whitespace collapsed, surrounding spaces, quotes and final punctuation dropped."""
    text = " ".join(text.split()).strip(" \"'`.!?:;,")
    return text if case_sensitive else text.casefold()


class GenerationOptions(Options):
    #: A JSON Lines file of {"prompt": ..., "expected": ...} objects, or embedded:python-topics
    #: (qpeft's own smoke set built from the embedded documents).
    prompts: str = Field("embedded:python-topics", min_length=1)
    #: Use the first this many prompts (null = all).
    limit: int | None = Field(None, ge=1)
    #: Generate at most this many tokens per prompt (greedy; stops at EOS).
    max_new_tokens: int = Field(32, ge=1, le=8192)
    #: Render each prompt with the tokenizer's chat template when it has one.
    chat_template: bool = True
    #: Compare case-sensitively (default: both sides case-folded).
    case_sensitive: bool = False


class Generation(EvaluatorPlugin):
    name = "generation"
    description = "Greedy completions of prompts from a file, saved; exact-match and contains scores"
    Options = GenerationOptions

    def check(self, options, ctx):
        read_prompts(options.prompts)

    def evaluate(self, model, tokenizer, options, ctx, *, stage, data, out_dir):
        from qpeft.io import atomic_write_text
        from qpeft.modeling import generate_text

        rows = read_prompts(options.prompts)[: options.limit]
        out, exact, contains, scored, new_tokens = [], 0, 0, 0, 0
        for row in rows:
            gen = generate_text(model, tokenizer, row["prompt"], options.max_new_tokens, options.chat_template)
            record = {
                "prompt": row["prompt"],
                "expected": row["expected"],
                "completion": gen["completion"],
                "new_tokens": gen["new_tokens"],
            }
            new_tokens += gen["new_tokens"]
            if row["expected"]:
                got = normalize(gen["completion"], options.case_sensitive)
                wanted = [normalize(e, options.case_sensitive) for e in row["expected"]]
                record["exact_match"] = got in wanted
                record["contains"] = any(w in got for w in wanted)
                scored += 1
                exact += record["exact_match"]
                contains += record["contains"]
            out.append(record)
        path = Path(out_dir) / f"generations_{stage}.jsonl"
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out))
        return EvalResult(
            metrics={
                "exact_match": exact / scored if scored else None,
                "contains": contains / scored if scored else None,
                "prompts": len(rows),
                "scored": scored,
                "mean_new_tokens": new_tokens / len(rows),
            },
            higher_is_better={"exact_match": True, "contains": True},
            primary="contains",
            files=[str(path)],
        )


@hookimpl
def qpeft_register_evaluators(register):
    register(Generation())
