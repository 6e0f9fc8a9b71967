"""Helpers shared by the benchmark scripts: environment capture and JSON + Markdown output."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (e.g. "AMD EPYC"), else the platform's."""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa() -> str:
    """The CPU family as it matters to bitsandbytes' CPU kernels: "amx" (Intel AMX and
    AVX512-BF16), "avx512bf16" (e.g. AMD Zen 4) or "avx2"."""
    try:
        flags = next((l.split(":", 1)[1].split() for l in open("/proc/cpuinfo", encoding="utf-8") if l.startswith("flags")), [])
    except OSError:
        flags = []
    return "amx" if "amx_tile" in flags else "avx512bf16" if "avx512_bf16" in flags else "avx2"


def environment() -> dict:
    import torch
    import transformers

    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_isa": cpu_isa(),
        "cpu_threads": torch.get_num_threads(),
    }
    for mod in ("peft", "bitsandbytes", "gptqmodel", "accelerate"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            pass
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def write(name: str, payload: dict, table: list[dict], columns: list[str], out_dir: Path | None = None) -> Path:
    """Write ``name``.json (payload + rows) and ``name``.md (a table of ``columns``)."""
    from qpeft.io import atomic_write_json, atomic_write_text

    out = Path(out_dir or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "rows": table}
    atomic_write_json(out / f"{name}.json", payload)
    lines = [
        f"# {name}",
        "",
        f"command: `{payload.get('command', '')}`",
        "",
        f"environment: `{json.dumps(payload.get('environment', {}))}`",
        "",
    ]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for row in table:
        cells = []
        for c in columns:
            v = row.get(c, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write_text(out / f"{name}.md", "\n".join(lines) + "\n")
    return out / f"{name}.json"
