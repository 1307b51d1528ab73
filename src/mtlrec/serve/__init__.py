"""Scoring service (the ``serve`` extra: fastapi, uvicorn): see :mod:`mtlrec.serve.app`."""

from mtlrec.serve.app import create_app
from mtlrec.serve.scorer import Scorer

__all__ = ["Scorer", "create_app"]
