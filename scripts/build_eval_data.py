#!/usr/bin/env python3
"""Build qpeft's small offline evaluation sets from the embedded documents (stdlib only).

Writes, under ``--out`` (default: ``<repo>/core/data/evals``):

* ``python_topics_mc.jsonl`` -- a 4-way multiple-choice task for EleutherAI's lm-evaluation-harness
  (``python_topics_mc.yaml`` is its task config): each of the embedded instruct records (CPython's
  help topics, ``core/data/embedded/instruct_*.jsonl``) gives one question: the first paragraph
  of the topic's text, and as choices its own title and three other titles drawn with a fixed
  seed; the answer's position is drawn too.
* ``python_topics_generation.jsonl`` -- the same passages as prompts for the ``generation``
  evaluator, the title as the expected answer.

A smoke test, not a benchmark: 74 questions, whose passages a model fine-tuned on the embedded
instruct data has seen (the titles are not in its training text). It gives an accuracy number
without network access; a random model scores about 0.25.

Output is byte-identical across re-runs.

Usage::

    python scripts/build_eval_data.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = REPO_ROOT / "core" / "data" / "embedded"
DEFAULT_OUT = REPO_ROOT / "core" / "data" / "evals"
SEED = 24
CHOICES = 4
MAX_PASSAGE_CHARS = 320
QUESTION = "Which Python topic does this passage from the Python documentation describe?"


def records() -> list[dict]:
    rows = []
    for name in ("instruct_train.jsonl", "instruct_val.jsonl"):
        for line in (EMBEDDED / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                rows.append(json.loads(line))
    return rows


def title_of(prompt: str) -> str:
    found = re.search(r'"([^"]+)"', prompt)
    if not found:
        raise SystemExit(f"no quoted title in prompt {prompt!r}")
    return found.group(1)


def passage_of(response: str) -> str:
    """The first paragraph, cut at a sentence end within MAX_PASSAGE_CHARS."""
    text = " ".join(response.split("\n\n")[0].split())
    if len(text) <= MAX_PASSAGE_CHARS:
        return text
    cut = text[:MAX_PASSAGE_CHARS]
    end = max(cut.rfind(". "), cut.rfind("? "), cut.rfind("! "))
    return cut[: end + 1] if end > 80 else cut.rsplit(" ", 1)[0] + " ..."


def build(out: Path) -> dict:
    rows = records()
    titles = [title_of(r["prompt"]) for r in rows]
    if len(set(titles)) != len(titles):
        raise SystemExit("two embedded records share a title")
    rng = random.Random(SEED)
    mc, gen = [], []
    for i, (row, title) in enumerate(zip(rows, titles)):
        passage = passage_of(row["response"])
        others = rng.sample([t for t in titles if t != title], CHOICES - 1)
        label = rng.randrange(CHOICES)
        choices = others[:label] + [title] + others[label:]
        mc.append({"id": i, "passage": passage, "question": QUESTION, "choices": choices, "label": label})
        gen.append({"prompt": f'{QUESTION} Answer with its title only.\n\n"{passage}"', "expected": [title]})
    out.mkdir(parents=True, exist_ok=True)
    for name, items in (("python_topics_mc.jsonl", mc), ("python_topics_generation.jsonl", gen)):
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items), encoding="utf-8")
    return {"questions": len(mc), "out": str(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    print(json.dumps(build(parser.parse_args().out)))


if __name__ == "__main__":
    main()
