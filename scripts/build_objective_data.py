#!/usr/bin/env python3
"""Build qpeft's embedded data for the training objectives beyond SFT (stdlib only).

Reads the embedded instruct set (``core/data/embedded/instruct_{train,val}.jsonl``, built from
CPython's help topics by ``scripts/build_default_data.py``) and writes, beside it:

* ``preference_{train,val}.jsonl``: ``{"prompt", "chosen", "rejected"}`` -- chosen = the
  topic's documented answer (its first sentences, <= 200 characters), rejected = an evasive
  non-answer naming the topic (one of four templates, by record index);
* ``feedback_{train,val}.jsonl``: ``{"prompt", "completion", "label"}`` for KTO -- each topic
  once with its answer (label true) and once with an evasive one (label false);
* ``prompts_{train,val}.jsonl``: ``{"prompt", "answer"}`` for GRPO -- repeat a topic's title
  (answer: the title) or, for "The X statement" topics, name the statement's keyword (answer: X).

Train and validation come from the instruct set's own train and val splits, so no topic is
in both. Output is deterministic: re-running produces byte-identical files.

Usage::

    python scripts/build_objective_data.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = REPO_ROOT / "core" / "data" / "embedded"
MAX_CHOSEN_CHARS = 200

EVASIVE = (
    'I am not sure what "{title}" is. You could search the web for it.',
    'Sorry, I cannot help with questions about "{title}".',
    "That is a complicated topic. Please read a book about it.",
    '"{title}" is not something I know about.',
)


def title_of(prompt: str) -> str:
    return re.search(r'"([^"]+)"', prompt).group(1)


def first_sentences(text: str, limit: int = MAX_CHOSEN_CHARS) -> str:
    """The first paragraph's leading sentences, at most ``limit`` characters (at least one sentence)."""
    para = text.split("\n\n")[0].strip()
    sentences = re.split(r"(?<=[.!?])\s+", para)
    out = sentences[0]
    for s in sentences[1:]:
        if len(out) + 1 + len(s) > limit:
            break
        out += " " + s
    return out


def build(records: list[dict]) -> dict[str, list[dict]]:
    pref, feedback, prompts = [], [], []
    for i, r in enumerate(records):
        title = title_of(r["prompt"])
        chosen = first_sentences(r["response"])
        rejected = EVASIVE[i % len(EVASIVE)].format(title=title)
        pref.append({"prompt": r["prompt"], "chosen": chosen, "rejected": rejected})
        feedback.append({"prompt": r["prompt"], "completion": chosen, "label": True})
        feedback.append({"prompt": r["prompt"], "completion": rejected, "label": False})
        keyword = re.fullmatch(r"The (\w+) statement", title)
        if keyword:
            prompts.append({"prompt": f'Which Python keyword starts "{title}"? Answer with the keyword only.', "answer": keyword.group(1)})
        else:
            prompts.append({"prompt": f"Repeat this title exactly, and nothing else: {title}", "answer": title})
    return {"preference": pref, "feedback": feedback, "prompts": prompts}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=EMBEDDED)
    args = parser.parse_args(argv)
    for split in ("train", "val"):
        records = [json.loads(line) for line in (EMBEDDED / f"instruct_{split}.jsonl").read_text(encoding="utf-8").splitlines() if line]
        for name, rows in build(records).items():
            write_jsonl(args.out / f"{name}_{split}.jsonl", rows)
            print(f"{args.out / f'{name}_{split}.jsonl'}: {len(rows)} rows")


if __name__ == "__main__":
    main()
