"""What the command line does about its libraries' console noise, each with its reason.

Installed by :func:`qpeft.cli.main` (not on ``import qpeft``: a program that uses qpeft as a
library keeps its own logging). Every library line a qpeft command can print is either left
alone because it tells the user something, shown once, or dropped here with the reason below;
README.md ("What the run prints") lists the ones left.
"""

from __future__ import annotations

import logging
import os
import sys

#: OpenMP's idle policy for CPU runs. libgomp's default lets each idle worker thread spin for a
#: while before sleeping; on a machine whose cores are shared with other processes that spinning
#: took the cores from the threads doing work (the end-to-end test: 122 s with the default, 41 s
#: with PASSIVE on 2 shared cores). Read once, when torch loads its OpenMP runtime.
OMP_WAIT_POLICY = "PASSIVE"


def set_omp_wait_policy(environ=os.environ) -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a policy, torch (and with it the
    OpenMP runtime) is already loaded, or the machine has an NVIDIA GPU (whose runs keep
    OpenMP's default). True when it was set."""
    if "OMP_WAIT_POLICY" in environ or "torch" in sys.modules or os.path.exists("/dev/nvidiactl"):
        return False
    environ["OMP_WAIT_POLICY"] = OMP_WAIT_POLICY
    return True


class _Drop(logging.Filter):
    """Drops records whose message template contains ``text``."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in str(record.msg)


class _Once(logging.Filter):
    """Lets each distinct message (template and arguments) through once."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            key = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record: let logging report it
            return True
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


#: (logger, filter, reason). Filters sit on the emitting logger, so they hold whatever handlers
#: the library or the user installs, and they work before the library is imported.
FILTERS = (
    (
        # torchao registers its enums with torch's pytree at import, which torch 2.13 deprecates
        # (two lines on every command: transformers imports torchao whenever it is installed).
        # A note to torchao's authors, not to users.
        "torch.utils._pytree",
        lambda: _Drop("is an Enum subclass and is now natively supported"),
        "torchao's deprecated pytree registration",
    ),
    (
        # On AVX512-BF16 CPUs bitsandbytes tries to fetch an optional 4-bit inference kernel
        # from the Hugging Face hub through the `kernels` package, which qpeft does not install
        # (it runs offline and downloads no code); bitsandbytes falls back to its own kernel.
        "bitsandbytes.backends.cpu.ops",
        lambda: _Drop("from kernels-community"),
        "optional hub kernel that qpeft never fetches",
    ),
    (
        # transformers' bitsandbytes dequantize() names the dtype it dequantized to; qpeft's merge
        # always dequantizes to float32 on purpose and says so itself.
        "transformers.integrations.bitsandbytes",
        lambda: _Drop("The modules are dequantized in"),
        "qpeft's merge dequantizes to float32 on purpose",
    ),
    (
        # LLM.int8 casts float32/bfloat16 activations to float16 in every 8-bit matmul, and says so
        # on every call: 10,003 lines in a 5-step CPU run. Expected for bnb-8bit; once is enough.
        "bitsandbytes.autograd._functions",
        _Once,
        "bnb-8bit's per-matmul cast notice, shown once",
    ),
)


def install_log_filters() -> None:
    """Attach :data:`FILTERS` to their loggers (once per process)."""
    for name, make, _reason in FILTERS:
        logger = logging.getLogger(name)
        if not any(getattr(f, "_qpeft", False) for f in logger.filters):
            f = make()
            f._qpeft = True
            logger.addFilter(f)


# ---------------------------------------------------------------------------- gptqmodel

#: gptqmodel is imported only by the ``gptq`` quantizer. Without this, peft imports it whenever
#: it is installed (its LoRA dispatchers check every layer for GPT-QModel types), which on a run
#: that never uses GPTQ costs ~1 s, prints gptqmodel's banner and INFO lines, and sets
#: PYTORCH_ALLOC_CONF and CUDA_DEVICE_ORDER in the process's environment.
_DEFERRED = "gptqmodel"


def defer_gptqmodel() -> bool:
    """Until :func:`allow_gptqmodel`, make gptqmodel look not installed (``sys.modules`` holds
    ``None`` for it: ``find_spec`` answers None and an import fails), so that no library
    imports it behind qpeft's back. A model can hold GPT-QModel layers only after gptqmodel was
    imported, so the libraries' "is this a GPT-QModel layer?" checks keep their answer. True
    when deferred; False when it is already imported or not installed."""
    import importlib.util

    if _DEFERRED in sys.modules:
        return False
    try:
        if importlib.util.find_spec(_DEFERRED) is None:
            return False
    except (ImportError, ValueError):
        return False
    sys.modules[_DEFERRED] = None
    return True


def allow_gptqmodel() -> None:
    """Undo :func:`defer_gptqmodel` (the ``gptq`` quantizer calls it before it needs gptqmodel),
    and forget what the libraries cached while it was deferred."""
    if _DEFERRED not in sys.modules or sys.modules[_DEFERRED] is not None:
        return
    del sys.modules[_DEFERRED]
    for module, names in (
        ("peft.import_utils", ("is_gptqmodel_available", "is_optimum_available")),
        ("transformers.utils.import_utils", ("is_gptqmodel_available", "is_optimum_available")),
        ("optimum.utils.import_utils", ("is_gptqmodel_available",)),
    ):
        mod = sys.modules.get(module)
        for name in names:
            clear = getattr(getattr(mod, name, None), "cache_clear", None)
            if clear is not None:
                clear()
    optimum = sys.modules.get("optimum.utils.import_utils")
    if optimum is not None and hasattr(optimum, "_gptqmodel_available"):  # computed at its import
        optimum._gptqmodel_available = optimum._is_package_available("gptqmodel")
