"""Time to first step: how long qpeft takes before it trains, each measurement in a fresh process.

    python benchmarks/startup.py                                   # CLI, import and registry times
    python benchmarks/startup.py --config configs/qlora_7b.yaml --set model.name_or_path=/m ...

Measured (the best and the median of ``--repeat`` fresh processes, wall and CPU seconds):
``python -m qpeft --help``, ``import qpeft``, the plugin registry (``load_registry()``), and
``qpeft run CONFIG --check``; the heavy libraries (torch, transformers, peft, bitsandbytes,
accelerate) each of the first three imported (they must import none). With ``--config``, one
real ``qpeft run`` of it: its summary's ``timeline`` (command start → run start → model loaded →
first optimizer step done; :mod:`qpeft.timeline`). Writes ``OUT/startup_<tag>.json`` and ``.md``
(``--tag``, default the CPU or GPU name) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")

#: Run in a fresh interpreter: the measured code, then one JSON line (CPU seconds, heavy modules).
PROBES = {
    "import qpeft": "import qpeft",
    "plugin registry": "from qpeft.registry import load_registry; load_registry()",
}
_WRAP = """import json, sys, time
c0, t0 = time.process_time(), time.perf_counter()
{code}
print(json.dumps({{"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "heavy": [m for m in {heavy!r} if m in sys.modules]}}))
"""


def _stats(values: list[float]) -> dict:
    return {"best": round(min(values), 3), "median": round(statistics.median(values), 3)}


def _command(cmd: list[str], repeat: int, env: dict) -> dict:
    """Wall and CPU (children's user + system) seconds of ``cmd`` as a whole process."""
    walls, cpus = [], []
    for _ in range(repeat):
        before = os.times()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        walls.append(time.perf_counter() - t0)
        after = os.times()
        cpus.append((after.children_user - before.children_user) + (after.children_system - before.children_system))
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return {"wall_s": _stats(walls), "cpu_s": _stats(cpus)}


def _probe(code: str, repeat: int, env: dict) -> dict:
    """Wall and CPU seconds of ``code`` inside a fresh interpreter (its own start-up excluded)."""
    walls, cpus, heavy = [], [], set()
    for _ in range(repeat):
        proc = subprocess.run([sys.executable, "-c", _WRAP.format(code=code, heavy=HEAVY)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{code!r} failed: {proc.stderr.strip()[-500:]}")
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        walls.append(got["wall"])
        cpus.append(got["cpu"])
        heavy |= set(got["heavy"])
    return {"wall_s": _stats(walls), "cpu_s": _stats(cpus), "heavy_imported": sorted(heavy)}


def _help_imports(env: dict) -> list[str]:
    """Heavy modules loaded by ``qpeft --help`` (its -X importtime listing, in a fresh process)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "qpeft", "--help"], capture_output=True, text=True, env=env)
    loaded = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return [m for m in HEAVY if m in loaded]


def _device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except ImportError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def measure(args) -> dict:
    # As an installed package runs: from compiled bytecode (the first process writes it).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONUNBUFFERED"] = "1"
    subprocess.run(
        [sys.executable, "-c", "import qpeft.cli, qpeft.orchestrator, qpeft.registry; qpeft.registry.load_registry()"],
        env=env,
        capture_output=True,
    )
    qpeft = [sys.executable, "-m", "qpeft"]
    report: dict = {"device": _device_name(), "cpus": os.cpu_count(), "repeat": args.repeat, "python": platform.python_version()}
    rows = {"qpeft --help": {**_command([*qpeft, "--help"], args.repeat, env), "heavy_imported": _help_imports(env)}}
    for name, code in PROBES.items():
        rows[name] = _probe(code, args.repeat, env)
    if args.config:
        sets = [a for s in args.set for a in ("--set", s)]
        rows["qpeft run --check"] = _command([*qpeft, "run", args.config, *sets, "--check"], args.repeat, env)
        with tempfile.TemporaryDirectory(prefix="qpeft-startup-") as tmp:
            out = args.output_dir or tmp
            cmd = [*qpeft, "run", args.config, *sets, "--set", f"output_dir={out}"]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
            summary = json.loads((Path(out) / "summary.json").read_text())
        report["run"] = {
            "command": " ".join(["qpeft", "run", args.config, *sets]),
            "wall_s": round(wall, 2),
            "timeline": summary["timeline"],
            "train_steps": summary["train_steps"],
            "trainer": summary["trainer"],
            "quantizer": summary["quantizer"],
            "notes": [n for n in summary["notes"] if n.startswith("native:")],
        }
    report["rows"] = rows
    return report


def markdown(report: dict) -> str:
    lines = [
        f"# qpeft start-up on {report['device']} ({report['cpus']} CPUs, Python {report['python']})",
        "",
        f"Each row: best and median of {report['repeat']} fresh processes (compiled bytecode, as an installed package runs).",
        "",
        "| what | wall s (best / median) | CPU s (best / median) | heavy libraries imported |",
        "|---|---|---|---|",
    ]
    for name, r in report["rows"].items():
        heavy = ", ".join(r.get("heavy_imported", [])) or ("none" if "heavy_imported" in r else "")
        lines.append(
            f"| `{name}` | {r['wall_s']['best']:.2f} / {r['wall_s']['median']:.2f} | {r['cpu_s']['best']:.2f} / {r['cpu_s']['median']:.2f} | {heavy} |"
        )
    if "run" in report:
        run, t = report["run"], report["run"]["timeline"]
        lines += [
            "",
            f"`{run['command']}` ({run['quantizer']}, trainer {run['trainer']}, {run['train_steps']} steps, {run['wall_s']:.1f} s in all):",
            "",
            "| command start → run start | → libraries imported | → model load starts | model load | → training starts | → first optimizer step done | command start → first step |",
            "|---|---|---|---|---|---|---|",
            "| "
            + " | ".join(
                f"{t[k]:.2f} s" if t.get(k) is not None else ""
                for k in ("startup_s", "imports_s", "data_s", "load_s", "setup_s", "first_step_s", "to_first_step_s")
            )
            + " |",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="a run config: also time `qpeft run CONFIG --check` and one real run of it")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides for --config (repeatable)")
    ap.add_argument("--output-dir", help="keep the run's output here (default: a temporary folder)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", help="file name tag (default: from the device name)")
    args = ap.parse_args()
    report = measure(args)
    tag = args.tag or "".join(c for c in report["device"].lower() if c.isalnum())[:24]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"startup_{tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (out / f"startup_{tag}.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
