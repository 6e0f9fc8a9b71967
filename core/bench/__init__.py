"""``qpeft bench``: a matrix of quantizer × PEFT method × trainer (× any config key) cells, each
run in its own process, one comparable record per cell.

A matrix file names a base run config and the axes to vary::

    name: cpu-smoke
    base: ../quickstart.yaml          # a run config (path relative to this file) or a mapping
    set: [trainer.options.max_steps=4]  # overrides applied to every cell
    axes:                             # config key -> values (a mapping gives each value a label)
      quantizer: [none, bnb-nf4]
      peft: [lora, prefix]
      trainer.options.batch_size: {b2: 2, b4: 4}
    exclude: [{quantizer: none, peft: prefix}]   # cells to leave out of the matrix
    merge: true                       # also merge mergeable cells and measure max |Δlogit|

Expansion reuses the run config's own machinery: a cell's config is the base with ``set`` and
the cell's values applied as ``--set`` overrides (:func:`qpeft.config.apply_overrides`), and it
is resolved with :func:`qpeft.config.resolve`, so a combination that capabilities rule out is
listed as "not supported" with resolve's own reason, without a second copy of the rules.
A value that is wrong whatever it is combined with (an unknown key, a backend that does not
exist) is an error in the matrix: exit 2, naming ``axes.<key>``.

Each supported cell runs ``python -m qpeft.bench CELL.json`` (:func:`cell_main`), which calls
:func:`qpeft.orchestrator.run` (and ``merge``) and writes the cell's metrics; a crash or an
out-of-memory in one cell is recorded and the others go on. With ``isolation: worker`` one
``python -m qpeft.bench --worker`` process (:func:`worker_main`; one per GPU with ``--gpus``)
runs the cells one after another instead, its imports done once and CPU base loads after the
first copied from :class:`qpeft.modeling.BaseModelCache`; a cell that fails, dies or times out
takes its worker with it and the next cell starts a fresh one. Records are appended atomically
to ``DIR/results.jsonl``; running the same command again skips finished cells.

The package, in the order a cell passes through it: :mod:`.matrix` (the matrix file and its
cells), :mod:`.timeouts`, :mod:`.runner` (:func:`run_matrix`, processes and workers),
:mod:`.cell` (the cell and worker processes), :mod:`.environment` (what a record says about
where it ran), :mod:`.records` (``results.jsonl``), then :mod:`.report` and :mod:`.quality`
(the report of a results folder).
"""

from .cell import EVENT_PREFIX, SUMMARY_METRICS, cell_main, cell_metrics, worker_main
from .environment import child_environment, environment, matrix_environment, plugin_packages, qpeft_commit
from .matrix import Cell, Matrix, MatrixConfig, axis_title, axis_values, expand, load_matrix, select
from .records import MATRIX_FILE, RESULTS_FILE, append_record, latest_records, read_records
from .runner import Worker, _failure, _is_oom, _no_event, output_directory, plan, remove_empty_checkpoints, run_cell, run_matrix
from .timeouts import (
    FIRST_CELL_FIXED_S,
    FIRST_CELL_STEP_S,
    TIMEOUT_FACTOR,
    TIMEOUT_MIN_S,
    CellTimeout,
    Timeouts,
    cell_budget,
)

__all__ = [
    "EVENT_PREFIX",
    "FIRST_CELL_FIXED_S",
    "FIRST_CELL_STEP_S",
    "MATRIX_FILE",
    "RESULTS_FILE",
    "SUMMARY_METRICS",
    "TIMEOUT_FACTOR",
    "TIMEOUT_MIN_S",
    "Cell",
    "CellTimeout",
    "Matrix",
    "MatrixConfig",
    "Timeouts",
    "Worker",
    "_failure",
    "_is_oom",
    "_no_event",
    "append_record",
    "axis_title",
    "axis_values",
    "cell_budget",
    "cell_main",
    "cell_metrics",
    "child_environment",
    "environment",
    "expand",
    "latest_records",
    "load_matrix",
    "matrix_environment",
    "output_directory",
    "plan",
    "plugin_packages",
    "qpeft_commit",
    "read_records",
    "remove_empty_checkpoints",
    "run_cell",
    "run_matrix",
    "select",
    "worker_main",
]
