"""Loss-balancing strategies. Importing this package registers every one in WEIGHTINGS."""

from mtlrec.weighting import static
from mtlrec.weighting.base import Weighting
from mtlrec.weighting.build import build_weighting

__all__ = ["Weighting", "build_weighting", "static"]
