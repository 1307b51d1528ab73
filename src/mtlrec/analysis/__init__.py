"""Analysis: model comparison over seeds (MTL gain, seesaw), gate analysis, task relationships,
the MMoE paper's synthetic study with vectorised repeated runs, and HTML reports.

Heavy parts (matplotlib for reports) are imported inside the functions that need them.
"""

from mtlrec.analysis.compare import CompareResult, mtl_gain, run_compare, seesaw
from mtlrec.analysis.gates import (
    GateEntropyLogger,
    expert_utilisation,
    flag_experts,
    gate_entropy,
)
from mtlrec.analysis.relations import label_correlation

__all__ = [
    "CompareResult",
    "GateEntropyLogger",
    "expert_utilisation",
    "flag_experts",
    "gate_entropy",
    "label_correlation",
    "mtl_gain",
    "run_compare",
    "seesaw",
]
