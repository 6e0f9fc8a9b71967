"""Build a Llama with random weights locally (no hub): Llama-2-7B's shape, or a tiny one with
the same layout for CPU tests, saved as a safetensors model folder with a tokenizer.

    python benchmarks/make_random_model.py --shape llama-2-7b --out runs/bench-assets/random-llama-2-7b
    python benchmarks/make_random_model.py --shape tiny --out /tmp/random-tiny --dtype float32

Shape of ``llama-2-7b``: hidden 4096, 32 layers, 32 attention heads (no grouped KV), MLP 11008,
vocabulary 32,000, untied output head, 4096 positions — 6.74 B parameters, 13.5 GB in bfloat16.
Weights are drawn N(0, 0.02) tensor by tensor from a seeded generator (norms are ones), the
initialisation transformers itself uses, and written in shards without ever instantiating the
model, so building takes about a minute and the model's size in memory once.

The tokenizer: Llama-2's own needs the hub. The embedded SmolLM2 tokenizer is a byte-level BPE
of 49,152 tokens whose ids follow merge order (ids 0-16 special tokens, then the 256 bytes, then
one id per merge, each merge made of earlier tokens). Keeping the ids below 32,000 and the merges
that produce them gives a consistent 32,000-token BPE: every id it emits exists in the model, the
embedding and head keep Llama-2-7B's shape, and the special tokens and chat template stay. The
folder is skipped when it already holds the same build (``random_model.json``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

SHAPES = {
    "llama-2-7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
        "vocab_size": 32000,
    },
    # Widths are multiples of 128 (bitsandbytes' 4-bit CPU kernels need it); same vocabulary.
    "tiny": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
        "vocab_size": 32000,
    },
}
INIT_STD = 0.02
SHARD_BYTES = 4 * 2**30
MARKER = "random_model.json"


def truncated_tokenizer_json(tokenizer_json: dict, vocab_size: int) -> dict:
    """A byte-level BPE ``tokenizer.json`` cut to its first ``vocab_size`` ids (see module doc)."""
    data = json.loads(json.dumps(tokenizer_json))
    model = data["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"expected a BPE tokenizer, got {model.get('type')}")
    vocab = {tok: i for tok, i in model["vocab"].items() if i < vocab_size}
    merges = []
    for merge in model["merges"]:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        if left in vocab and right in vocab and (left + right) in vocab:
            merges.append(merge)
    model["vocab"], model["merges"] = vocab, merges
    data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["id"] < vocab_size]
    if sorted(vocab.values()) != list(range(vocab_size)):
        raise ValueError("the kept ids are not 0..vocab_size-1")
    return data


def save_tokenizer(source_dir: Path, out: Path, vocab_size: int):
    """Write the cut tokenizer into ``out``; return it loaded with transformers."""
    from transformers import AutoTokenizer

    data = truncated_tokenizer_json(json.loads((source_dir / "tokenizer.json").read_text(encoding="utf-8")), vocab_size)
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (source_dir / name).is_file():
            shutil.copy(source_dir / name, out / name)
    tok = AutoTokenizer.from_pretrained(out)
    if len(tok) != vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} tokens, expected {vocab_size}")
    return tok


def write_weights(config, out: Path, dtype: str, seed: int, device: str) -> int:
    """Draw every tensor of ``config``'s model and write safetensors shards; return the byte count."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        shapes = {k: (tuple(v.shape)) for k, v in LlamaForCausalLM(config).state_dict().items()}
    torch_dtype = getattr(torch, dtype)
    shards: list[dict] = [{}]
    size = total = 0
    for i, (name, shape) in enumerate(shapes.items()):
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch_dtype)
        else:
            gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + i)
            tensor = torch.empty(shape, dtype=torch_dtype, device=device).normal_(0.0, INIT_STD, generator=gen).cpu()
        nbytes = tensor.numel() * tensor.element_size()
        if size and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
        total += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return total
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        filename = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / filename), metadata={"format": "pt"})
        weight_map.update({name: filename for name in shard})
        shard.clear()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2), encoding="utf-8"
    )
    return total


def build(
    shape: str,
    out: str | Path,
    *,
    dtype: str = "bfloat16",
    seed: int = 0,
    device: str = "auto",
    force: bool = False,
    tokenizer_source: str | None = None,
) -> str:
    """Build (or find already built) the random model of ``shape`` in ``out``; return the folder.
    ``tokenizer_source``: a folder holding the embedded SmolLM2's tokenizer files (default: the
    embedded model itself, converted on first use) — lets a machine without the GGUF build it."""
    import torch
    from transformers import LlamaConfig

    from qpeft.io import atomic_dir
    from qpeft.model_source import resolve_model_path

    out = Path(out)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # The same seed draws other numbers on a GPU than on the CPU: the device is part of the build.
    spec = {
        "shape": shape,
        **SHAPES[shape],
        "dtype": dtype,
        "seed": seed,
        "init_std": INIT_STD,
        "drawn_on": device,
        "tokenizer": "embedded SmolLM2 byte-level BPE cut to the first vocab_size ids",
    }
    if not force and (out / MARKER).is_file() and json.loads((out / MARKER).read_text()) == spec:
        return str(out)
    with atomic_dir(out, replace=True) as tmp:
        source = Path(tokenizer_source) if tokenizer_source else Path(resolve_model_path("smollm2"))
        tok = save_tokenizer(source, tmp, SHAPES[shape]["vocab_size"])
        config = LlamaConfig(
            **SHAPES[shape],
            rms_norm_eps=1e-5,
            initializer_range=INIT_STD,
            tie_word_embeddings=False,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=None,
            dtype=dtype,
        )
        config.save_pretrained(tmp)
        spec["bytes"] = write_weights(config, tmp, dtype, seed, device)
        (tmp / MARKER).write_text(json.dumps({k: v for k, v in spec.items() if k != "bytes"}, indent=2), encoding="utf-8")
    return str(out)


def main() -> None:
    """Command line: build one random model folder."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-2-7b")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="where to draw the weights: auto, cpu or cuda")
    ap.add_argument("--force", action="store_true", help="rebuild even if the folder holds this build")
    ap.add_argument("--tokenizer-source", help="folder with the embedded SmolLM2's tokenizer.json (default: the embedded model)")
    args = ap.parse_args()
    path = build(
        args.shape, args.out, dtype=args.dtype, seed=args.seed, device=args.device, force=args.force, tokenizer_source=args.tokenizer_source
    )
    print(path, file=sys.stdout)


if __name__ == "__main__":
    main()
