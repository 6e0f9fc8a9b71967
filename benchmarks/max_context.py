"""Max trainable context: the longest single row (batch 1) that trains on one GPU, per path.

    python benchmarks/max_context.py --model DIR [--paths qpeft-nf4,unsloth-nf4,recipe-loop-nf4] \\
        [--mem-cap-gib 24] [--time-budget 150] [--out benchmarks/results]

A path is one of benchmarks/seed_recipe.py's (``qpeft-nf4``: qpeft's native trainer with NF4,
LoRA r16 on all linear layers, gradient checkpointing and its CUDA defaults, the memory options of
configs/qlora_7b.yaml; ``qpeft-nf4@activation_offload=true`` a variant; ``unsloth-nf4`` when unsloth
imports; ``recipe-loop-nf4`` the seed's recipe under bf16 autocast). Each attempt trains
``--steps`` optimizer steps (AdamW; from the second on, its state is allocated) on one random row
of T tokens **in its own process** (``seed_recipe.py --worker``): an out-of-memory error ends only
that process, and no attempt inherits another's allocator state.

Search, per path: exponential (T = ``--start``, 2T, 4T, ... while it trains; once two rows
trained, straight to the memory line's guess below, when that is nearer), then within the
bracket [longest that trained, shortest that ran out of memory] until their ratio is at most
1 + ``--resolution`` (5%): the next T is where a straight line through the peak memory of the
two longest rows that trained reaches the memory limit (peak memory grows linearly with T under
checkpointing), or the bracket's geometric middle after a guess that failed. T is a multiple of
``--multiple``. ``--time-budget`` seconds per path: no attempt starts that the budget cannot
hold (judged by the previous attempt's length); the result then says the resolution was not
reached. ``--max-tokens`` bounds the search: longer rows are recorded as failed without running
(a stand-in memory limit for a CPU smoke test of this script on a tiny model).

``--mem-cap-gib``: each attempt limits PyTorch's CUDA allocator to this many GiB
(``torch.cuda.set_per_process_memory_fraction``), emulating a smaller card, so that the search
stays short on an 80-141 GB GPU; the comparison between paths holds for a card of that size.
Writes ``OUT/max_context_<tag>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass
class Attempt:
    seq: int
    ok: bool
    #: "oom" (ran out of memory), "capped" (longer than --max-tokens, not run), "error", "timeout"
    failure: str | None = None
    seconds: float = 0.0
    peak_mem_gib: float | None = None
    step_seconds: float | None = None
    detail: str = ""


@dataclass
class Search:
    path: str
    attempts: list[Attempt] = field(default_factory=list)
    #: Longest T that trained and shortest that did not (None: none such).
    longest_ok: int | None = None
    shortest_failed: int | None = None
    #: The bracket is within the resolution (False: the budget or an error stopped the search).
    resolved: bool = False
    stopped: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["max_tokens"] = self.longest_ok
        return d


def _round(t: float, multiple: int) -> int:
    return max(multiple, int(t // multiple) * multiple)


def _linear_guess(attempts: list[Attempt], mem_limit_gib: float | None) -> float | None:
    """T at which a line through the peak memory of the two longest rows that trained reaches
    ``mem_limit_gib`` (None without a limit or two such rows, or with a non-increasing line)."""
    ok = sorted((a for a in attempts if a.ok and a.peak_mem_gib), key=lambda a: a.seq)[-2:]
    if mem_limit_gib is None or len(ok) < 2 or ok[1].seq == ok[0].seq:
        return None
    slope = (ok[1].peak_mem_gib - ok[0].peak_mem_gib) / (ok[1].seq - ok[0].seq)
    if slope <= 0:
        return None
    return ok[1].seq + (mem_limit_gib - ok[1].peak_mem_gib) / slope


def search(
    attempt: Callable[[int], Attempt],
    path: str,
    *,
    start: int,
    multiple: int = 64,
    resolution: float = 0.05,
    max_tokens: int | None = None,
    time_budget: float = math.inf,
    mem_limit_gib: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Search:
    """Find the longest T (a multiple of ``multiple``) for which ``attempt(T).ok``; see the
    module's docstring. ``attempt`` runs one row length (rows over ``max_tokens`` are not
    passed to it but recorded as failed)."""
    result = Search(path)
    t0, last = clock(), 0.0

    def run(seq: int) -> Attempt | None:
        nonlocal last
        if max_tokens is not None and seq > max_tokens:
            a = Attempt(seq, False, "capped", detail=f"longer than --max-tokens {max_tokens}")
        else:
            if clock() - t0 + last > time_budget:
                result.stopped = f"time budget of {time_budget:.0f} s reached"
                return None
            began = clock()
            a = attempt(seq)
            last = clock() - began
        result.attempts.append(a)
        if a.ok:
            result.longest_ok = max(result.longest_ok or 0, seq)
        elif a.failure in ("oom", "capped"):
            result.shortest_failed = seq if result.shortest_failed is None else min(result.shortest_failed, seq)
        else:
            result.stopped = f"attempt at {seq} tokens failed: {a.failure}: {a.detail}"
            return None
        return a

    # Exponential phase: up from `start` while rows train; down from it while they do not.
    seq = _round(start, multiple)
    while True:
        a = run(seq)
        if a is None:
            return result
        if a.ok and result.shortest_failed is None:
            # double, or go straight to where the memory line says the limit is, if nearer
            guess = _linear_guess(result.attempts, mem_limit_gib)
            nearer = guess is not None and guess < 2 * seq  # at or below seq: one resolution step up
            seq = max(_round(max(guess, seq * (1 + resolution)), multiple), seq + multiple) if nearer else seq * 2
        elif not a.ok and result.longest_ok is None:
            if seq <= multiple:
                result.stopped = f"not even {multiple} tokens train"
                return result
            seq = _round(seq / 2, multiple)
        else:
            break
    # Refinement within the bracket.
    guessed_wrong = False
    while result.shortest_failed / result.longest_ok > 1 + resolution:
        lo, hi = result.longest_ok, result.shortest_failed
        guess = None if guessed_wrong else _linear_guess(result.attempts, mem_limit_gib)
        if guess is not None and lo < guess < hi:
            # at least a resolution step above lo, so every success narrows the bracket by it
            target = max(guess, lo * (1 + resolution))
        else:
            target = math.sqrt(lo * hi)
        seq = _round(target, multiple)
        if seq >= hi:
            seq = _round((lo + hi) / 2, multiple)
        if not lo < seq < hi:
            break  # no multiple of `multiple` left between them
        a = run(seq)
        if a is None:
            return result
        guessed_wrong = guess is not None and not a.ok
    result.resolved = True
    return result


def _worker_attempt(args, path: str, seq: int, deadline: float) -> Attempt:
    """One row length of one path in its own process (benchmarks/seed_recipe.py --worker)."""
    with tempfile.TemporaryDirectory(prefix="max-context-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(HERE / "seed_recipe.py"), "--model", args.model, "--steps", str(args.steps)]
        cmd += ["--worker", path, "--result", str(result), "--batch", "1", "--seq", str(seq), "--lora-dropout", str(args.lora_dropout)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if args.mem_cap_gib:
            env["QPEFT_MEM_CAP_GIB"] = str(args.mem_cap_gib)
        if args.device == "cpu":
            env["SEED_RECIPE_DEVICE"] = "cpu"
        t0 = time.perf_counter()
        print(f"   {path} T={seq:,}: ", end="", flush=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            print("timeout", flush=True)
            return Attempt(seq, False, "timeout", time.perf_counter() - t0, detail="the path's time budget ran out during the attempt")
        seconds = time.perf_counter() - t0
        if proc.returncode == 0 and result.is_file():
            res = json.loads(result.read_text())
            marks = res["marks"]
            step = (marks[-1] - marks[0]) / (len(marks) - 1) if len(marks) > 1 else None
            print(f"trained, peak {res['peak_mem_gib']:.2f} GiB, {seconds:.0f} s", flush=True)
            return Attempt(seq, True, None, seconds, round(res["peak_mem_gib"], 3), step and round(step, 3))
        text = (proc.stderr or "") + (proc.stdout or "")
        oom = "out of memory" in text.lower() or "OutOfMemoryError" in text
        tail = next((line for line in reversed(text.strip().splitlines()) if line.strip()), f"exit {proc.returncode}")[-300:]
        print("out of memory" if oom else f"failed: {tail}", flush=True)
        return Attempt(seq, False, "oom" if oom else "error", seconds, detail=tail)


def _device_memory_gib(device: str) -> tuple[str, float | None]:
    if device == "cpu":
        return "cpu", None
    import torch

    return torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory / 2**30


def _write(report: dict, out: Path, tag: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"max_context_{tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    cap = f"{report['mem_limit_gib']:.1f} GiB" if report["mem_limit_gib"] else "none"
    lines = [
        f"# Max trainable context (batch 1) on {report['device']}",
        "",
        f"Command: `{report['command']}`. Memory limit: {cap}"
        + (" (PyTorch's allocator capped: a smaller card emulated)" if report["mem_cap_gib"] else "")
        + f"; {report['steps']} optimizer steps per attempt, each attempt in its own process; resolution {report['resolution']:.0%}.",
        "",
        "| path | longest row that trained | shortest that failed | vs unsloth | peak GiB at the longest | s/step there | attempts | resolved |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = report["paths"].get("unsloth-nf4", {}).get("max_tokens")
    for name, s in report["paths"].items():
        best = next((a for a in s["attempts"] if a["ok"] and a["seq"] == s["longest_ok"]), {})
        vs = f"{s['longest_ok'] / base:.2f}×" if base and s["longest_ok"] and name != "unsloth-nf4" else ""
        peak = f"{best['peak_mem_gib']:.2f}" if best.get("peak_mem_gib") is not None else ""
        step = f"{best['step_seconds']:.2f}" if best.get("step_seconds") is not None else ""
        failed = f"{s['shortest_failed']:,}" if s["shortest_failed"] else ""
        longest = f"{s['longest_ok']:,}" if s["longest_ok"] else s.get("skipped", "none")
        resolved = "yes" if s["resolved"] else s["stopped"] or "no"
        lines.append(f"| {name} | {longest} | {failed} | {vs} | {peak} | {step} | {len(s['attempts'])} | {resolved} |")
    (out / f"max_context_{tag}.md").write_text("\n".join(lines) + "\n")


def _unsloth_available() -> bool:
    sys.path.insert(0, str(HERE))
    from seed_recipe import _unsloth_available as available

    return available()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a model folder (benchmarks/make_random_model.py --shape llama-2-7b)")
    ap.add_argument("--paths", default="qpeft-nf4,unsloth-nf4")
    ap.add_argument("--start", type=int, default=4096, help="first row length tried")
    ap.add_argument("--multiple", type=int, default=256, help="row lengths are multiples of this")
    ap.add_argument("--resolution", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per attempt (from the 2nd, AdamW's state is held)")
    ap.add_argument("--max-tokens", type=int, help="rows longer than this count as failed without running")
    ap.add_argument("--mem-cap-gib", type=float, help="cap PyTorch's CUDA allocator at this many GiB in each attempt")
    ap.add_argument("--time-budget", type=float, default=600.0, help="seconds per path")
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a smoke test of the search on a tiny model")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", help="file name tag (default: from the device name and the cap)")
    args = ap.parse_args()

    device, total = _device_memory_gib(args.device)
    limit = args.mem_cap_gib or total
    tag = args.tag or "".join(c for c in device.lower() if c.isalnum())[:16] + (f"_cap{args.mem_cap_gib:g}gib" if args.mem_cap_gib else "")
    report = {
        "device": device,
        "device_memory_gib": total and round(total, 1),
        "mem_cap_gib": args.mem_cap_gib,
        "mem_limit_gib": limit,
        "command": "python benchmarks/max_context.py " + " ".join(sys.argv[1:]),
        "steps": args.steps,
        "resolution": args.resolution,
        "lora_dropout": args.lora_dropout,
        "paths": {},
    }
    for path in args.paths.split(","):
        print(f"== {path}", flush=True)
        if path.startswith("unsloth") and not _unsloth_available():
            report["paths"][path] = {
                **Search(path, stopped="unsloth is not installed (QPEFT_UNSLOTH_PATH)").to_dict(),
                "skipped": "unsloth not installed",
            }
            _write(report, Path(args.out), tag)
            continue
        deadline = time.monotonic() + args.time_budget
        found = search(
            lambda seq, path=path, deadline=deadline: _worker_attempt(args, path, seq, deadline),
            path,
            start=args.start,
            multiple=args.multiple,
            resolution=args.resolution,
            max_tokens=args.max_tokens,
            time_budget=args.time_budget,
            # the allocator's peak allocated stays a little under the limit (fragmentation, reserve)
            mem_limit_gib=limit and 0.97 * limit,
        )
        report["paths"][path] = found.to_dict()
        print(f"== {path}: longest row that trained {found.longest_ok}, shortest that failed {found.shortest_failed}", flush=True)
        _write(report, Path(args.out), tag)  # after every path: a run cut off keeps what ran
    base = report["paths"].get("unsloth-nf4", {}).get("max_tokens")
    # every qpeft path (variants included) against unsloth's longest row
    report["ratios_vs_unsloth"] = {
        name: round(s["max_tokens"] / base, 3) if base and s.get("max_tokens") else None
        for name, s in report["paths"].items()
        if name.startswith("qpeft")
    }
    _write(report, Path(args.out), tag)
    print((Path(args.out) / f"max_context_{tag}.md").read_text())


if __name__ == "__main__":
    main()
