"""Reward functions for the ``grpo`` trainer, and how a config names them.

``trainer.options.rewards`` lists rewards by name: a shipped one (:data:`SHIPPED`) or a Python
entry point ``module:function``. A reward function takes the generated ``completions`` (strings,
or chat messages whose last ``content`` is the text) as a keyword argument, plus every other
column of the data as keyword arguments holding one value per completion (the embedded prompts
set has ``answer``), and returns one float per completion (TRL's reward-function convention)::

    def my_reward(completions, answer, **kwargs) -> list[float]:
        return [1.0 if a.lower() in text_of(c).lower() else 0.0 for c, a in zip(completions, answer)]
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from .errors import ConfigError


def text_of(completion) -> str:
    """The text of one completion: a string, or a list of chat messages (the last one's content)."""
    if isinstance(completion, list):
        return str(completion[-1].get("content", "")) if completion else ""
    return str(completion)


def _normal(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().strip(".!?\"'`").lower())


def exact_answer(completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion is the ``answer`` column (case, surrounding space, quotes and a final
    full stop ignored), 0.5 when it contains the answer among other words, else 0.0."""
    out = []
    for c, a in zip(completions, answer):
        text, want = _normal(text_of(c)), _normal(str(a))
        out.append(1.0 if text == want else 0.5 if want and want in text else 0.0)
    return out


#: ``short_answer``: full reward up to this many words, none from :data:`SHORT_MAX_WORDS` on.
SHORT_WORDS = 8
SHORT_MAX_WORDS = 32


def short_answer(completions, **kwargs) -> list[float]:
    """A format reward: 1.0 for a one-line answer of at most 8 words, falling linearly to 0.0
    at 32 words; a completion over several lines gets half of that."""
    out = []
    for c in completions:
        text = text_of(c).strip()
        words = len(text.split())
        score = 1.0 if words <= SHORT_WORDS else max(0.0, 1.0 - (words - SHORT_WORDS) / (SHORT_MAX_WORDS - SHORT_WORDS))
        out.append(score * (0.5 if "\n" in text else 1.0) if text else 0.0)
    return out


#: Rewards a config may name without a module.
SHIPPED: dict[str, Callable] = {"exact_answer": exact_answer, "short_answer": short_answer}


def check_reward_name(name: str, key: str) -> None:
    """Refuse (before any weight loads) a name that is neither shipped nor ``module:function``."""
    if name in SHIPPED:
        return
    if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", name):
        raise ConfigError(key, f"unknown reward {name!r}; valid: {', '.join(SHIPPED)}, or a Python entry point module:function")


def load_reward(name: str, key: str) -> Callable:
    """The function a reward name stands for; a module that does not import or lacks the
    function is a :class:`ConfigError` naming ``key``."""
    check_reward_name(name, key)
    if name in SHIPPED:
        return SHIPPED[name]
    module_name, func_name = name.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(key, f"reward {name!r}: module {module_name!r} does not import ({exc})") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ConfigError(key, f"reward {name!r}: {module_name!r} has no function {func_name!r}")
    return func
