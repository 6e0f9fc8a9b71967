"""The qpeft plugin contract. Each hook's docstring is its documentation.

A plugin is a module (or object) that implements some of these hooks with
``@qpeft.hookimpl`` and is named in the ``qpeft`` entry-point group of its package::

    [project.entry-points.qpeft]
    my_quantizer = "my_package.plugin"

Built-in backends (``qpeft.plugins.*``) register through the same entry points, so
nothing distinguishes them from third-party ones.

There are two sorts of hooks:

* **registration hooks** (``qpeft_register_*``) hand qpeft backend objects — subclasses of
  :class:`qpeft.api.QuantizerPlugin`, :class:`qpeft.api.PeftPlugin`,
  :class:`qpeft.api.TrainerPlugin`, :class:`qpeft.api.EvaluatorPlugin` — each with a ``name``, an ``Options`` model and
  ``capabilities``. The config chooses among them by name.
* **lifecycle hooks** (``qpeft_on_*``) let cross-cutting plugins (loggers, guards, metrics)
  observe a run without the orchestrator knowing them. Every implementation is called.
"""

from __future__ import annotations

import pluggy

PROJECT = "qpeft"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def qpeft_register_quantizers(register):
    """Call ``register(plugin)`` once for each quantizer you provide.

    ``plugin`` is an instance of a :class:`qpeft.api.QuantizerPlugin` subclass. Its ``name``
    is what users write as ``quantizer.name``; it must be unique across installed packages.
    """


@hookspec
def qpeft_register_peft_methods(register):
    """Call ``register(plugin)`` once for each PEFT method you provide.

    ``plugin`` is an instance of a :class:`qpeft.api.PeftPlugin` subclass, chosen by
    ``peft.name`` in the config.
    """


@hookspec
def qpeft_register_trainers(register):
    """Call ``register(plugin)`` once for each trainer you provide.

    ``plugin`` is an instance of a :class:`qpeft.api.TrainerPlugin` subclass, chosen by
    ``trainer.name`` in the config.
    """


@hookspec
def qpeft_register_evaluators(register):
    """Call ``register(plugin)`` once for each evaluator you provide.

    ``plugin`` is an instance of a :class:`qpeft.api.EvaluatorPlugin` subclass, chosen by
    ``name`` in an entry of the config's ``eval`` list (``eval: [{name: perplexity},
    {name: lm-eval, options: {tasks: [...]}}]``). Each listed evaluator runs on the quantized
    base before training and on the trained model (base + adapter, in memory) after it; its
    :class:`qpeft.api.EvalResult` goes into ``summary.json`` under ``eval.<label>``.
    """


@hookspec
def qpeft_on_model_loaded(model, ctx):
    """Called after the quantizer loaded the base model and before any adapter is attached.

    ``ctx`` is the :class:`qpeft.context.RunContext` of the run (config, device, output dir).
    """


@hookspec
def qpeft_on_step_end(step, max_steps, logs, ctx):
    """Called by trainers after each optimizer step.

    ``logs`` is a dict with at least ``loss`` (float) and ``tokens`` (tokens seen so far).
    """


@hookspec
def qpeft_on_run_end(summary, ctx):
    """Called once at the end of a successful ``qpeft run`` with the summary dict."""


@hookspec
def qpeft_register_trackers(register):
    """Call ``register(plugin)`` once for each experiment tracker you provide.

    ``plugin`` is an instance of a :class:`qpeft.api.TrackerPlugin` subclass, chosen by name in
    the config's ``trackers`` list. Its :meth:`~qpeft.api.TrackerPlugin.start` returns an object
    implementing the lifecycle hooks (``qpeft_on_step_end``, ``qpeft_on_run_end``), registered
    only for the runs that name the tracker.
    """
