"""Run the config fuzzers (tests/test_fuzz_config.py) with more examples and print how many
configs each property tried and how they ended.

    python scripts/fuzz_counts.py            # 10x the examples the test suite runs
    python scripts/fuzz_counts.py --scale 1  # exactly what `python -m pytest` runs

Hypothesis is derandomized there, so a given scale always tries the same configs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    """Run the fuzz tests at ``--scale`` and print a Markdown table of counts per property."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=10.0, help="examples per property = the suite's x this (default 10)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        counts_file = Path(d) / "counts.json"
        env = {**os.environ, "QPEFT_FUZZ_SCALE": str(args.scale), "QPEFT_FUZZ_COUNTS_FILE": str(counts_file)}
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fuzz_config.py"], cwd=REPO, env=env
        )
        seconds = time.perf_counter() - t0
        counts = json.loads(counts_file.read_text()) if counts_file.is_file() else {}
    total = {"exit 2": 0, "ok": 0}
    print(f"\nscale {args.scale:g}, pytest exit status {proc.returncode}, {seconds:.0f} s\n")
    print("| property | configs tried | exit 2, one line | accepted (--check ok) |")
    print("|---|---:|---:|---:|")
    for prop, c in counts.items():
        n2, ok = c.get("exit 2", 0), c.get("ok", 0)
        total["exit 2"] += n2
        total["ok"] += ok
        print(f"| {prop} | {n2 + ok} | {n2} | {ok} |")
    print(f"| **all** | **{total['exit 2'] + total['ok']}** | **{total['exit 2']}** | **{total['ok']}** |")
    print(
        "\nNo config ended in a traceback, another exit status, more than one error line, or weight loading"
        if proc.returncode == 0
        else "\nFAILURES: see the pytest output above"
    )
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
