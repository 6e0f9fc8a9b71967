"""Evaluator ``perplexity``: token-weighted perplexity of the run's validation split (the label
tokens of ``data.val_path``, or the part of ``data.path`` held out), before and after training."""

from __future__ import annotations

from pydantic import Field

from qpeft import hookimpl
from qpeft.api import EvalResult, EvaluatorPlugin, Options


class PerplexityOptions(Options):
    #: Validation examples per forward pass.
    batch_size: int = Field(4, ge=1, le=4096)


class Perplexity(EvaluatorPlugin):
    name = "perplexity"
    description = "Perplexity and mean loss on the run's validation split (its label tokens)"
    Options = PerplexityOptions

    def evaluate(self, model, tokenizer, options, ctx, *, stage, data, out_dir):
        from qpeft.modeling import evaluate_perplexity

        r = evaluate_perplexity(model, data, tokenizer.pad_token_id, batch_size=options.batch_size)
        return EvalResult(
            metrics={"perplexity": r["perplexity"], "loss": r["loss"], "tokens": r["tokens"]},
            higher_is_better={"perplexity": False, "loss": False},
            primary="perplexity",
        )


@hookimpl
def qpeft_register_evaluators(register):
    register(Perplexity())
