"""Shared fixtures: a tiny random Llama (layer widths multiples of 128, as bitsandbytes'
4-bit CPU kernels need; built by :func:`qpeft.testing.save_tiny_llama`) with the embedded
SmolLM2 tokenizer, and config helpers."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from qpeft import hookimpl
from qpeft.testing import save_tiny_llama  # noqa: F401  (the builder lives in the conformance kit)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# A suite started in the background by a non-interactive shell (`make test &`, nohup) inherits
# SIGINT ignored, and so would every `qpeft` process the interrupt tests start (Python keeps an
# ignored SIGINT ignored): handle it here, so that the children start with the default again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parents[1]


class WeightWatch:
    """A lifecycle plugin that counts the base models a quantizer loaded."""

    def __init__(self):
        self.loaded = 0

    @hookimpl
    def qpeft_on_model_loaded(self, model, ctx):
        """Count a loaded base model."""
        self.loaded += 1


def pytest_configure(config):
    """Convert the embedded model once, before pytest-xdist's workers start (each would
    otherwise convert it at the same time on a fresh machine)."""
    if hasattr(config, "workerinput"):
        return
    try:
        from qpeft.model_source import resolve_model_path

        resolve_model_path("smollm2")
    except Exception:  # noqa: BLE001 - the tests that need it fail with the real error
        pass


def pytest_collection_modifyitems(config, items):
    # The end-to-end tests (marked slow) go first, so that with several workers the longest
    # tests do not start last and leave the other workers idle.
    items.sort(key=lambda item: "slow" not in item.keywords)
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def embedded_model_path() -> str:
    """The embedded SmolLM2 as a cached safetensors folder (converted once, ~45 s)."""
    from qpeft.model_source import resolve_model_path

    return resolve_model_path("smollm2")


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory, request) -> str:
    """A 2-layer random Llama (hidden 128, MLP 256) saved with SmolLM2's tokenizer.

    ``QPEFT_TINY_MODEL`` names a prepared one instead (e.g. ``benchmarks/make_random_model.py
    --shape tiny`` on a GPU machine that lacks the embedded model's GGUF file)."""
    from transformers import AutoTokenizer

    if os.environ.get("QPEFT_TINY_MODEL"):
        return os.environ["QPEFT_TINY_MODEL"]
    tok = AutoTokenizer.from_pretrained(request.getfixturevalue("embedded_model_path"))
    return save_tiny_llama(tok, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture()
def tiny_config(tiny_llama_path, tmp_path):
    """A run config dict for the tiny model: bnb-nf4 + LoRA + HF Trainer, a few steps."""

    def make(**overrides) -> dict:
        cfg = {
            "model": {"name_or_path": tiny_llama_path},
            "quantizer": {"name": "bnb-nf4"},
            "peft": {"name": "lora", "options": {"r": 8, "alpha": 16}},
            "trainer": {"name": "hf", "options": {"batch_size": 4, "max_steps": 6, "lr": 3e-3, "scheduler": "constant"}},
            "data": {"path": "embedded:instruct", "max_length": 96, "max_train_examples": 24, "max_val_examples": 4},
            "output_dir": str(tmp_path / "run"),
            "seed": 0,
            "generate": {"max_new_tokens": 8},
        }
        cfg.update(overrides)
        return cfg

    return make


def tol(dtype: str, fp32: float, low_precision: float) -> float:
    """A logit tolerance for a run's dtype: float32 on CPU is exact to float error, while
    bfloat16/float16 on a GPU carries ~2^-8 relative rounding through every layer."""
    return fp32 if dtype == "float32" else low_precision
