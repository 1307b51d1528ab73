"""Searching expert count, gate depth and width, widths, learning rate and balancing strategy.

:func:`run_tune` is ``mtlrec tune``: optuna's TPE sampler (Bergstra et al., NeurIPS 2011), or a
grid, over a search space written in YAML, each trial a :func:`~mtlrec.train.run.train_run`
in ``OUT/trials/<number>`` whose validation metric is reported to the pruner after every
epoch (median or Hyperband pruning, Li et al., JMLR 2018). The study lives in
``OUT/study.db`` (SQLite), so a stopped search resumes where it stopped: finished trials stay,
and a trial cut short is tried again from its run folder's last checkpoint.

After training, every trial's inference latency is measured the same way (:func:`latency_ms`:
the trained model on a fixed batch of 1,000 test rows, one thread, warm-up, then the median of
timed runs) and its parameter count recorded. The output: ``tune.json`` (every trial),
``pareto.md`` (the quality / latency Pareto front, :func:`pareto_front`) and, per latency
budget, the best configuration under it, ``best_under_<ms>ms.yaml``. Trials are compared on
the validation metric (``training.monitor``) only; test metrics are recorded beside it.

The space (``docs/tuning.md``): a mapping from a name to a list of values (categorical, and the
grid's values), to ``{low, high, log, step}`` (integers when ``low`` and ``high`` are), or to
one value (fixed). Names are dotted config keys (``training.batch_size``,
``model.params.dropout``, ``model.name``) or these shortcuts: ``num_experts`` (MMoE's
``num_experts``; CGC's and PLE's ``experts_per_task`` and ``shared_experts`` both),
``gate_depth`` and ``gate_width`` (``gate_hidden = [width] * depth``), ``expert_width`` and
``tower_width`` (every hidden layer that wide), ``lr`` and ``balancing`` (the strategy's name).
"""

from mtlrec.analysis.tuning.results import (
    LATENCY_ROWS,
    load_tune,
    pareto_figure,
    pareto_front,
    table_rows,
    write_outputs,
)
from mtlrec.analysis.tuning.search import (
    PruningCallback,
    TuneSettings,
    latency_ms,
    make_pruner,
    remeasure_latency,
    run_tune,
)
from mtlrec.analysis.tuning.space import (
    DEFAULT_SPACE,
    Dimension,
    apply_values,
    default_space,
    parse_space,
)

__all__ = [
    "DEFAULT_SPACE",
    "LATENCY_ROWS",
    "Dimension",
    "PruningCallback",
    "TuneSettings",
    "apply_values",
    "default_space",
    "latency_ms",
    "load_tune",
    "make_pruner",
    "pareto_figure",
    "pareto_front",
    "parse_space",
    "remeasure_latency",
    "run_tune",
    "table_rows",
    "write_outputs",
]
