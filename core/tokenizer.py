"""Tokenizer loading with a pad token that is safe for training and generation.

If pad == EOS, a collator that masks pad tokens out of the labels also masks every EOS, and
the model never learns to stop (unsloth#416). qpeft therefore: keeps a pad token that differs
from EOS; else reuses a special token the model has but does not need as pad (its unknown
token or an extra special token); only as a last resort adds ``<|pad|>`` and the caller must
resize embeddings. Independently of that, labels are masked by the attention mask, never by
token id, so EOS stays in the labels whatever the pad token is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class PadDecision:
    """What was done to the tokenizer's pad token, for the run summary."""

    action: str  # "kept" | "reused" | "added"
    token: str
    token_id: int

    @property
    def needs_resize(self) -> bool:
        return self.action == "added"


def load_tokenizer(model_path: str, *, trust_remote_code: bool = False):
    """Load the tokenizer of ``model_path`` and make its pad token safe."""
    from transformers import AutoTokenizer

    from .errors import ConfigError, QpeftError
    from .model_source import check_tokenizer_files

    check_tokenizer_files(model_path)
    try:
        tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        if "trust_remote_code" in str(exc):
            raise ConfigError(
                "model.trust_remote_code",
                f"the tokenizer of {model_path} needs its own Python code; set model.trust_remote_code: true only if you trust its author",
            ) from None
        hint = "" if Path(model_path).is_dir() else " (qpeft runs offline; for a hub id set QPEFT_ALLOW_HUB=1)"
        raise QpeftError(f"cannot load the tokenizer of {model_path}: {reason}{hint}") from None
    decision = make_pad_token_safe(tok)
    return tok, decision


def make_pad_token_safe(tok) -> PadDecision:
    """Give ``tok`` a pad token different from EOS (see module docstring); report what was done."""
    eos, pad = tok.eos_token_id, tok.pad_token_id
    if pad is not None and pad != eos:
        return PadDecision("kept", tok.pad_token, pad)
    taken = {eos, tok.bos_token_id}
    extra = list(getattr(tok, "additional_special_tokens", None) or [])
    # Prefer an extra token named like a pad, then the unknown token, then any extra token.
    candidates = [t for t in extra if "pad" in t.lower()] + [tok.unk_token] + extra
    for token in candidates:
        tid = tok.convert_tokens_to_ids(token) if token else None
        if tid is not None and tid not in taken:
            tok.pad_token = token
            return PadDecision("reused", token, tok.pad_token_id)
    tok.add_special_tokens({"pad_token": "<|pad|>"})
    return PadDecision("added", tok.pad_token, tok.pad_token_id)


def chat_turn_end_id(tok) -> int | None:
    """The special token the chat template puts right after an assistant message, if any."""
    if not getattr(tok, "chat_template", None):
        return None
    marker = "qpeftmarker"
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False)
    except Exception:
        return None
    tail = text.split(marker, 1)[-1]
    ids = tok(tail, add_special_tokens=False)["input_ids"]
    # Added tokens flagged special count too: transformers 5.17 leaves <|im_end|> out of
    # all_special_ids once EOS points elsewhere.
    special = set(tok.all_special_ids)
    special |= {i for i, t in (getattr(tok, "added_tokens_decoder", None) or {}).items() if getattr(t, "special", False)}
    return ids[0] if ids and ids[0] in special else None


def align_eos_with_chat_template(tok) -> str | None:
    """Make EOS the token that ends an assistant turn when the two disagree.

    transformers 5.17's GGUF tokenizer conversion gives SmolLM2 ``eos = <|im_start|>`` (id 1)
    while its chat template ends turns with ``<|im_end|>`` (id 2); 5.23 gets it right. With the
    wrong EOS, generation never stops at the end of a turn. Returns what was changed, or None.
    """
    end = chat_turn_end_id(tok)
    if end is None or end == tok.eos_token_id:
        return None
    old = tok.eos_token
    tok.eos_token = tok.convert_ids_to_tokens(end)
    return f"eos {old!r} -> {tok.eos_token!r} (the chat template's end of turn)"
