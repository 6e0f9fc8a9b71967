"""Where a cell runs: the environment its record describes (versions, machine, qpeft commit, plugin
packages) and the variables a cell process is started with."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .matrix import Matrix


def qpeft_commit() -> str | None:
    """The commit of the qpeft that runs (not of the matrix file's repository): ``QPEFT_COMMIT``
    when set (a copy whose ``.git`` lags its files, such as a GPU machine's), else the HEAD of the
    git checkout holding qpeft's own package files (an editable install), marked ``+dirty`` when
    tracked files differ from it; None for an installed release (``qpeft_version`` names it)."""
    if os.environ.get("QPEFT_COMMIT"):
        return os.environ["QPEFT_COMMIT"]
    cwd = Path(__file__).resolve().parent

    def git(*args, **kw):
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False, **kw)

    try:
        if git("ls-files", "--error-unmatch", Path(__file__).name, timeout=10).returncode != 0:
            return None  # not a checkout of qpeft (e.g. site-packages inside some other repository)
        out = git("rev-parse", "--short", "HEAD", timeout=10)
        dirty = git("diff", "--quiet", "HEAD", timeout=30).returncode == 1
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() + ("+dirty" if dirty else "")) or None


def plugin_packages() -> str | None:
    """The installed packages that provide qpeft plugins (the distributions of the ``qpeft``
    entry points, qpeft's own built-ins aside) with their versions and those of the libraries
    they require, e.g. ``qpeft-torchao 0.1.0 (torchao 0.18.0)``; None when there are none."""
    found = {}
    for ep in importlib.metadata.entry_points(group="qpeft"):
        dist = getattr(ep, "dist", None)
        if dist is None or dist.metadata["Name"].lower() == "qpeft":
            continue
        libs = []
        for req in dist.requires or []:
            if "extra ==" in req:
                continue
            name = re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0]
            if name.lower() == "qpeft":
                continue
            try:
                libs.append(f"{name} {importlib.metadata.version(name)}")
            except importlib.metadata.PackageNotFoundError:
                libs.append(f"{name} (not installed)")
        found[dist.metadata["Name"]] = f"{dist.metadata['Name']} {dist.version}" + (f" ({', '.join(libs)})" if libs else "")
    return "; ".join(found[k] for k in sorted(found)) or None


def matrix_environment(matrix: Matrix) -> dict[str, str]:
    """The matrix's ``env`` variables that the environment of ``qpeft bench`` does not set itself."""
    return {k: str(v) for k, v in matrix.config.env.items() if k not in os.environ}


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a cell process runs with: offline, quiet, unbuffered (as ``qpeft run``),
    plus ``extra`` (e.g. the GPU a side-by-side cell may see)."""
    env = {**os.environ, **(extra or {})}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if env.get("QPEFT_ALLOW_HUB") != "1":
        env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def environment() -> dict:
    """Device, driver and library versions of this process's machine."""
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    for dist in ("qpeft", "transformers", "peft", "accelerate", "bitsandbytes", "gptqmodel", "optimum", "safetensors"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            env[dist] = importlib.metadata.version(dist)
    if plugins := plugin_packages():
        env["plugins"] = plugins
    threading_env = {
        k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES") if k in os.environ
    }
    if threading_env:
        env["env"] = threading_env
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            driver=_nvidia_driver(),
        )
    return env


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
