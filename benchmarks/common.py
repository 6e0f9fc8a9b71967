"""Helpers shared by the benchmark scripts: environment capture and JSON + Markdown output."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    import torch
    import transformers

    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
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
