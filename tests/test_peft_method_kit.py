"""The conformance kit's PEFT-method checks (``qpeft.testing.check_peft_method``) on every method
issue 23 added: registration, light import, options, gradients, save in PEFT format, reload in
plain ``peft.PeftModel.from_pretrained`` (interop) and through the plugin, merge or refusal."""

import pytest
import torch

from qpeft.testing import ConformanceError, check_peft_method

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

METHODS = {
    "ia3": {},
    "vera": {"r": 64},
    "loha": {},
    "lokr": {},
    "oft": {"block_size": 32},
    "prompt": {"num_virtual_tokens": 4},
    "ptuning": {"num_virtual_tokens": 4},
}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_kit_accepts_method(name):
    result = check_peft_method(name, METHODS[name])
    assert result["max_abs_logit_diff"]["peft"] < 1e-4
    assert result["trainable_tensors"] > 0


def test_kit_rejects_a_merge_that_changes_the_model():
    from qpeft import hookimpl
    from qpeft.plugins.peft_methods import Loha

    class BadMerge(Loha):
        name = "loha-bad-merge"

        def merge(self, model):
            merged = model.merge_and_unload()
            with torch.no_grad():
                merged.get_output_embeddings().weight.mul_(1.5)
            return merged

    class Plugin:
        @hookimpl
        def qpeft_register_peft_methods(self, register):
            register(BadMerge())

    with pytest.raises(ConformanceError, match="merged model's logits"):
        check_peft_method("loha-bad-merge", plugins=[Plugin()])
