"""Synthetic data sets.

* :mod:`~mtlrec.data.synthetic.mmoe` — the MMoE paper's two regression tasks whose relatedness
  is set by one number (Ma et al., KDD 2018, Section 3.2): :func:`make_mmoe_synthetic`.
* :mod:`~mtlrec.data.synthetic.ctr` — a click-log-like table (Zipf ids, skewed numeric columns,
  click and conversion from a hidden logistic model): :func:`make_ctr_table`.
* :mod:`~mtlrec.data.synthetic.funnel` — an impression -> click -> action -> purchase funnel
  with the true CVR of every row, clicked or not: :func:`make_funnel_table`.
* :mod:`~mtlrec.data.synthetic.position` — a click log whose clicks are biased by position,
  with the true relevance of every row: :func:`make_position_bias_table`.

Seeding (:mod:`~mtlrec.data.synthetic._common`): every generator takes ``seed`` and draws from
independent streams ``numpy.random.default_rng(numpy.random.SeedSequence(seed, spawn_key=(k,)))``,
one stream per ingredient. Rows are drawn sequentially, so a call with ``n`` rows returns the
first ``n`` rows of any larger call with the same arguments.
"""

from __future__ import annotations

from mtlrec.data.synthetic.ctr import (
    ctr_dense_is_nonnegative,
    ctr_schema,
    ctr_vocab_sizes,
    make_ctr_table,
)
from mtlrec.data.synthetic.funnel import funnel_schema, make_funnel_table
from mtlrec.data.synthetic.mmoe import (
    MMOE_PRESETS,
    MMoESyntheticConfig,
    make_mmoe_synthetic,
    mmoe_label_correlation,
    mmoe_synthetic_schema,
    mmoe_weight_vectors,
)
from mtlrec.data.synthetic.position import make_position_bias_table, position_bias_schema

__all__ = [
    "MMOE_PRESETS",
    "MMoESyntheticConfig",
    "ctr_dense_is_nonnegative",
    "ctr_schema",
    "ctr_vocab_sizes",
    "funnel_schema",
    "make_ctr_table",
    "make_funnel_table",
    "make_mmoe_synthetic",
    "make_position_bias_table",
    "mmoe_label_correlation",
    "mmoe_synthetic_schema",
    "mmoe_weight_vectors",
    "position_bias_schema",
]
