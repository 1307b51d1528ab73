"""Score fusion: turn per-task probabilities into one ranking score.

Formulas (:mod:`.formulas`), rank transforms (:mod:`.rank`), per-task calibration
(:mod:`.calibration`), offline search of a formula's parameters (:mod:`.search`), learned
fusion (:mod:`.ltr`) and the JSON files that ``mtlrec predict --fusion`` and a scoring service
apply (:mod:`.io`). Every fusion registers itself in :data:`mtlrec.registry.FUSIONS`.

Example:
    >>> import numpy as np
    >>> from mtlrec.fusion import WeightedSum, SumParams
    >>> f = WeightedSum(SumParams(weights={"click": 1.0, "conv": 3.0}))
    >>> f({"click": np.array([0.2, 0.4]), "conv": np.array([0.1, 0.0])}).round(2).tolist()
    [0.5, 0.4]
"""

from mtlrec.fusion.base import Fusion, ParametricFusion
from mtlrec.fusion.calibration import Calibration, downsample_correction
from mtlrec.fusion.formulas import (
    ExtendedParams,
    ExtendedProduct,
    ProductParams,
    RankFusion,
    RankParams,
    SumParams,
    WeightedProduct,
    WeightedSum,
)
from mtlrec.fusion.io import fusion_from_dict, load_fusion, save_fusion
from mtlrec.fusion.ltr import LGBMFusion, NeuralFusion, business_label, fit_lgbm, fit_neural
from mtlrec.fusion.search import SEARCHERS, FusionObjective, SearchResult, search_fusion

__all__ = [
    "SEARCHERS",
    "Calibration",
    "ExtendedParams",
    "ExtendedProduct",
    "Fusion",
    "FusionObjective",
    "LGBMFusion",
    "NeuralFusion",
    "ParametricFusion",
    "ProductParams",
    "RankFusion",
    "RankParams",
    "SearchResult",
    "SumParams",
    "WeightedProduct",
    "WeightedSum",
    "business_label",
    "downsample_correction",
    "fit_lgbm",
    "fit_neural",
    "fusion_from_dict",
    "load_fusion",
    "save_fusion",
    "search_fusion",
]
