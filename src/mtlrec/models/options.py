"""Options shared by several architectures (no model is registered here)."""

from __future__ import annotations

from pydantic import Field

from mtlrec.models.base import ModelParams


class ChainParams(ModelParams):
    """Task chaining: a task's tower also reads another task's prediction.

    ``chain: {conversion: click}`` feeds ``P(click)`` to the conversion tower; with
    ``chain_detach`` (default) the conversion loss does not train the click network through it.
    """

    chain: dict[str, str] = Field(default_factory=dict, description="task -> source task")
    chain_detach: bool = True


def heads_kwargs(p: ModelParams) -> dict:
    """Keyword arguments of :class:`~mtlrec.nn.heads.TaskHeads` from a model's options."""
    kw: dict = {"activation": p.activation, "dropout": p.dropout}
    if isinstance(p, ChainParams):
        kw |= {"chain": p.chain, "chain_detach": p.chain_detach}
    return kw
