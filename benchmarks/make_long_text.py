"""Long texts for benchmarks at a fixed sequence length: each record joins embedded text
documents (qpeft's ``embedded:text`` set, drawn in a seeded order) until it has at least
``--min-tokens`` tokens under ``--tokenizer``, so with ``data.max_length`` = that many tokens
every training row is full (no padding) and tokens/s measures sequences of exactly that length.

    python benchmarks/make_long_text.py --tokenizer runs/bench-assets/random-llama-2-7b \\
        --min-tokens 1024 --out runs/bench-assets/long_text

Writes ``train.jsonl`` and ``val.jsonl`` (``{"text": ...}`` per line) into ``--out``; train
records come from the embedded train split, validation records from its val split.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def _docs(split: str) -> list[str]:
    from qpeft.data import EMBEDDED_DATA

    path = EMBEDDED_DATA / f"text_{split}.jsonl"
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def long_records(docs: list[str], tok, n: int, min_tokens: int, seed: int) -> list[dict]:
    """``n`` records, each documents joined by a blank line until it has ``min_tokens`` tokens."""
    rng = random.Random(seed)
    order: list[str] = []
    records = []
    for _ in range(n):
        parts: list[str] = []
        while not parts or len(tok("\n\n".join(parts), add_special_tokens=False)["input_ids"]) < min_tokens:
            if not order:
                order = docs[:]
                rng.shuffle(order)
            parts.append(order.pop())
        records.append({"text": "\n\n".join(parts)})
    return records


def build(tokenizer: str, out: str | Path, *, min_tokens: int = 1024, n_train: int = 64, n_val: int = 8, seed: int = 0) -> str:
    """Write ``train.jsonl`` and ``val.jsonl`` into ``out`` (skipped when already built alike)."""
    from transformers import AutoTokenizer

    from qpeft.io import atomic_write_text

    out = Path(out)
    marker = {"tokenizer": str(Path(tokenizer).resolve()), "min_tokens": min_tokens, "train": n_train, "val": n_val, "seed": seed}
    if (out / "long_text.json").is_file() and json.loads((out / "long_text.json").read_text()) == marker:
        return str(out)
    tok = AutoTokenizer.from_pretrained(tokenizer)
    for split, n in (("train", n_train), ("val", n_val)):
        rows = long_records(_docs(split), tok, n, min_tokens, seed)
        atomic_write_text(out / f"{split}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    atomic_write_text(out / "long_text.json", json.dumps(marker, indent=2))
    return str(out)


def main() -> None:
    """Command line: write the long-text files."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, help="model folder whose tokenizer counts the tokens")
    ap.add_argument("--out", required=True)
    ap.add_argument("--min-tokens", type=int, default=1024)
    ap.add_argument("--train", type=int, default=64)
    ap.add_argument("--val", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(build(args.tokenizer, args.out, min_tokens=args.min_tokens, n_train=args.train, n_val=args.val, seed=args.seed))


if __name__ == "__main__":
    main()
