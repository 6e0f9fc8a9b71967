"""Plain-peft interop, for every PEFT method qpeft has: the saved adapter loads with
``peft.PeftModel.from_pretrained`` on the same base and gives the same logits. Each method names
the test that checks it; a new method without one fails here. (No model is loaded in this file:
the named tests do the loading.)"""

import importlib

import pytest

from qpeft.api import PeftPlugin
from qpeft.registry import load_registry

REGISTRY = load_registry()
KIT = "test_peft_method_kit::test_kit_accepts_method"  # check_peft_method: plain PeftModel.from_pretrained vs qpeft, logits
#: method -> the test comparing plain peft's logits with qpeft's on the saved adapter
INTEROP = {
    "lora": "test_run_tiny::test_qpeft_lora_loads_in_plain_peft",
    "prefix": "test_run_tiny::test_qpeft_prefix_loads_in_plain_peft",
    **dict.fromkeys(("ia3", "vera", "loha", "lokr", "oft", "prompt", "ptuning"), KIT),
}
#: methods plain peft cannot load by itself, and why
NOT_PLAIN = {
    "adapters": "a custom peft method (peft's register_peft_method): plain peft loads it once "
    "qpeft.plugins.peft_adapters.register_bottleneck() registered the type",
}


@pytest.mark.parametrize("name", sorted(REGISTRY.backends["peft"]))
def test_every_method_has_a_plain_peft_interop_test_or_a_reason(name):
    assert name in INTEROP or name in NOT_PLAIN, f"peft method {name!r}: no plain-peft interop test named here"
    if name in INTEROP:
        module, func = INTEROP[name].split("::")
        assert callable(getattr(importlib.import_module(module), func, None)), INTEROP[name]
    if INTEROP.get(name) == KIT:
        kit = importlib.import_module("test_peft_method_kit")
        assert name in kit.METHODS, f"{name} is not among the kit test's methods"


def test_lora_adapters_of_every_init_reload_through_plain_peft():
    """LoRA does not override ``load_adapter``: the reload check of every run (``qpeft run``'s
    ``reload_max_abs_logit_diff``, asserted by the loftq, eva, pissa/olora run tests) is
    ``PeftModel.from_pretrained`` on a fresh base, so those adapters are plain-peft loadable."""
    lora = REGISTRY.backends["peft"]["lora"]
    assert type(lora).load_adapter is PeftPlugin.load_adapter


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_perplexity_of_prompt_learning_matches_peft_own_loss(method, tiny_llama_path):
    """Found by the methods bench: peft returns logits for the virtual tokens too, and qpeft's
    held-out perplexity failed after training ("Expected input batch_size ... to match")."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qpeft.modeling import evaluate_perplexity

    tok = AutoTokenizer.from_pretrained(tiny_llama_path)
    plugin = REGISTRY.backends["peft"][method]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)

    class Ctx:
        tokenizer = tok
        notes: list = []

    pm = plugin.attach(model, plugin.Options(num_virtual_tokens=4), Ctx())
    ids = tok("The quick brown fox jumps over the lazy dog.")["input_ids"]
    row = {"input_ids": ids, "labels": ids}
    got = evaluate_perplexity(pm, [row], pad_id=tok.pad_token_id)
    pm.eval()
    with torch.no_grad():  # peft's loss with the first token masked (nothing real precedes it)
        want = pm(input_ids=torch.tensor([ids]), labels=torch.tensor([[-100, *ids[1:]]])).loss.item()
    assert got["tokens"] == len(ids) - 1
    assert math.isclose(got["loss"], want, rel_tol=1e-5), (got, want)
