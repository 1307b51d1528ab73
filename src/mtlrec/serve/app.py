"""The FastAPI scoring service: ``POST /score``, ``GET /healthz``, ``GET /metadata``.

One request holds a user context and a list of candidate items (raw feature values); the
service broadcasts the context over the candidates, encodes all of them as one batch with the
run's encoders, scores the batch once and answers per-task predictions and the fused score per
candidate. Invalid input gets a 4xx naming the field (FastAPI's 422 format: ``loc`` is the path
of the field in the body); unseen categories are not errors (OOV id, counted in the response
and in ``/metadata``).

Example:
    >>> from mtlrec.serve import Scorer, create_app  # doctest: +SKIP
    >>> app = create_app(Scorer.load("runs/mmoe"), max_candidates=500)  # doctest: +SKIP
"""

import ctypes
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic_core import to_json
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import mtlrec
from mtlrec.errors import DataError
from mtlrec.export import SCORE_OUTPUT
from mtlrec.schema import DenseFeature, SequenceFeature
from mtlrec.serve.schemas import ErrorDetail, Health, ScoreResponse, request_models
from mtlrec.serve.scorer import Scorer

DEFAULT_MAX_CANDIDATES = 1000
DEFAULT_MAX_BODY_BYTES = 1 << 20
ECHO_MAX_CHARS = 200
"""A 422 answer echoes at most about this many characters of each offending input."""
MAX_ERRORS_SHOWN = 20
"""A 422 answer lists at most this many errors (then says how many more there were)."""


class BodyLimit:
    """Refuse request bodies above ``max_bytes`` with 413 (by Content-Length, and by counting
    the bytes received when the length is not announced)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        for k, v in scope.get("headers", []):
            if k == b"content-length" and (not v.isdigit() or int(v) > limit):
                await _send_json(send, 413, _too_large(limit))
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, _too_large(limit)["detail"])
            return msg

        await self.app(scope, limited, send)


def _too_large(limit: int) -> dict[str, Any]:
    return {"detail": f"request body: larger than the limit of {limit} bytes"}


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


def _unprocessable(loc: tuple[Any, ...], msg: str, kind: str = "value_error") -> HTTPException:
    return RequestValidationError([{"type": kind, "loc": loc, "msg": msg, "input": None}])  # type: ignore[return-value]


def create_app(
    scorer: Scorer,
    *,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    context_features: list[str] | None = None,
) -> FastAPI:
    """The service for one loaded model.

    Args:
        scorer: the model, encoders and fusion.
        max_candidates: the most candidates per request (more: 422 on ``candidates``).
        max_body_bytes: the largest request body (more: 413).
        context_features: feature columns given once in ``context`` (the others in every
            candidate); ``None`` lets any column be given in either place.
    """
    schema = scorer.schema
    columns = schema.scoring_columns()  # bias features (role: bias) are not asked for
    if context_features is not None:
        unknown = sorted(set(context_features) - set(columns))
        if unknown:
            from mtlrec.errors import ConfigError

            raise ConfigError(f"--context {','.join(unknown)}: not feature columns ({columns})")
    fused = scorer.fusion is not None
    ScoreRequest, _, _ = request_models(
        schema, context_features=context_features, max_candidates=max_candidates, fused=fused
    )
    by_source = {f.source: f for f in schema.features}
    tasks = schema.primary_tasks  # auxiliary tasks are trained, never served
    task_names = list(schema.primary_task_names)
    responses: dict[int | str, dict[str, Any]] = {
        400: {"model": ErrorDetail, "description": "malformed request"},
        413: {"model": ErrorDetail, "description": "request body too large"},
    }

    app = FastAPI(
        title="mtlrec scoring service",
        version=mtlrec.__version__,
        description=f"Multi-task model {scorer.model_name!r}: tasks {', '.join(task_names)}.",
    )
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.state.scorer = scorer

    @app.get("/healthz", response_model=Health)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metadata")
    async def metadata() -> dict[str, Any]:
        def where(c: str) -> str:
            if context_features is None:
                return "context or candidate"
            return "context" if c in context_features else "candidate"

        return {
            "mtlrec_version": mtlrec.__version__,
            "model": scorer.model_name,
            "backend": scorer.backend,
            "source": scorer.source,
            "tasks": [{"name": t.name, "kind": t.kind, "output_dim": t.output_dim} for t in tasks],
            "features": [{"name": c, "type": by_source[c].type, "in": where(c)} for c in columns],
            "fusion": None
            if scorer.fusion is None
            else {"kind": getattr(scorer.fusion, "kind", ""), "tasks": list(scorer.fusion.tasks)},
            "max_candidates": max_candidates,
            "max_body_bytes": max_body_bytes,
            "schema_fingerprint": schema.fingerprint(),
            "requests": scorer.requests,
            "unknown_categories": dict(scorer.unknown_total),
        }

    @app.post(
        "/score",
        response_model=ScoreResponse,
        response_model_exclude_none=True,
        responses=responses,  # type: ignore[arg-type]
    )
    async def score(body: ScoreRequest) -> Response:  # type: ignore[valid-type]
        req: Any = body
        cands = req.candidates
        n = len(cands)
        ctx = req.context
        ctx_set = ctx.model_fields_set
        cols: dict[str, list[Any]] = {}
        given = set().union(*(x.model_fields_set for x in cands))
        broadcast: set[str] = set()
        for c in columns:
            f = by_source[c]
            if (context_features is not None and c in context_features) or (
                context_features is None and c in ctx_set and c not in given
            ):
                vals = [getattr(ctx, c)]  # one value, encoded once and broadcast
                broadcast.add(c)
            elif context_features is not None:
                vals = [getattr(x, c) for x in cands]
            else:  # either place: a candidate's value wins over the context's
                default = getattr(ctx, c) if c in ctx_set else _MISSING
                vals = [getattr(x, c) if c in x.model_fields_set else default for x in cands]
                if default is _MISSING:
                    for i, v in enumerate(vals):
                        if v is _MISSING:
                            raise _unprocessable(
                                ("body", "candidates", i, c),
                                f"Field required: {c!r} is neither in the context nor in "
                                "this candidate",
                                "missing",
                            )
            if not isinstance(f, DenseFeature | SequenceFeature):
                vals = [v if v is None or isinstance(v, str) else str(v) for v in vals]
            elif isinstance(f, SequenceFeature):
                vals = [
                    v if v is None else [s if isinstance(s, str) else str(s) for s in v]
                    for v in vals
                ]
            cols[c] = vals
        try:
            out, unknown = scorer.score_columns(cols, n)
        except DataError as e:
            field = e.column or "request"
            loc: tuple[Any, ...] = ("body", "candidates", field)
            if field in broadcast:
                loc = ("body", "context", field)
            elif e.row is not None:
                loc = ("body", "candidates", e.row - 1, field)
            raise _unprocessable(loc, e.detail) from None
        for k, v in out.items():
            bad = ~np.isfinite(v)
            if bad.any():
                i = int(np.flatnonzero(bad.reshape(n, -1).any(1))[0])
                raise _unprocessable(
                    ("body", "candidates", i),
                    f"the model's output {k!r} is not a finite number for this candidate "
                    "(input values outside the range the model can score)",
                )
        preds = [out[t].tolist() for t in task_names]
        fused_scores = out[SCORE_OUTPUT].tolist() if fused else None
        order = range(n)
        if req.sort_by is not None:
            key = out[req.sort_by.value]
            order = np.argsort(-key, kind="stable").tolist()
        results = []
        for i in order:
            r: dict[str, Any] = {
                "index": i,
                "predictions": {t: p[i] for t, p in zip(task_names, preds, strict=True)},
            }
            if fused_scores is not None:
                r["score"] = fused_scores[i]
            results.append(r)
        payload = {
            "model": scorer.model_name,
            "tasks": task_names,
            "results": results,
            "unknown": unknown,
        }
        # every output was checked finite above; pydantic_core's encoder is ~7x json.dumps
        return Response(to_json(payload), media_type="application/json")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # the offending input is echoed back, cut to a few hundred characters (a bad request
        # of megabytes must not come back whole); JSON has no NaN / Infinity (the request may
        # hold them: Python's JSON parser accepts the literals), so those are sent as text
        return JSONResponse({"detail": _capped_errors(exc.errors())}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    return app


SERVE_OPTIONS_ENV = "MTLREC_SERVE_OPTIONS"
"""Environment variable holding the JSON options of :func:`app_from_env`."""


def app_from_env() -> FastAPI:
    """The service built from the JSON options in ``$MTLREC_SERVE_OPTIONS`` (``run``,
    ``fusion``, ``threads``, ``max_candidates``, ``max_body_bytes``, ``context_features``).

    The app factory of ``mtlrec serve --workers N``: every worker process loads the model
    itself (uvicorn starts workers by spawning, so nothing is shared or pickled). With
    ``parent_pid`` the worker ends when that process (``mtlrec serve``) ends, however it ends.
    """
    import torch

    opts = json.loads(os.environ[SERVE_OPTIONS_ENV])
    exit_with_parent(opts.get("parent_pid"))
    torch.set_num_threads(int(opts["threads"]))
    scorer = Scorer.load(
        opts["run"], fusion=opts.get("fusion"), precision=opts.get("precision", "fp32")
    )
    app = create_app(
        scorer,
        max_candidates=int(opts["max_candidates"]),
        max_body_bytes=int(opts["max_body_bytes"]),
        context_features=opts.get("context_features"),
    )
    freeze_heap()
    return app


_PR_SET_PDEATHSIG = 1


def exit_with_parent(parent_pid: int | None) -> None:
    """End this process when its parent ``parent_pid`` ends, even when the parent is killed
    with SIGKILL (then nobody is left to stop the workers, which would keep the port open).

    On Linux the kernel does it: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``. Elsewhere (or if that
    call fails) a daemon thread checks twice a second whether the parent changed, and then
    sends this process SIGTERM (uvicorn's graceful stop), and exits 5 s later at the latest.
    A parent already gone when this is called ends the process at once.
    """
    if not parent_pid:
        return
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent_pid:  # gone before the guard was armed
        os._exit(1)
    if armed:
        return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5.0)
        os._exit(1)

    threading.Thread(target=watch, name="mtlrec-exit-with-parent", daemon=True).start()


def freeze_heap() -> None:
    """Move every object alive now (torch, the model, the app) out of the garbage
    collector's reach: a full collection then scans only what requests create, instead of
    stalling one request for ~100 ms every few hundred requests (measured: 113 ms for the
    ~210,000 objects of a loaded service; 0.003 ms after the freeze)."""
    import gc

    gc.collect()
    gc.freeze()


def _capped_errors(errors: Any) -> list[dict[str, Any]]:
    """FastAPI's validation errors, the first :data:`MAX_ERRORS_SHOWN` of them, with every
    echoed ``input`` (and any long string in ``loc``, ``msg`` or ``ctx``) cut to about
    :data:`ECHO_MAX_CHARS` characters."""
    errors = list(errors)
    out = []
    for e in errors[:MAX_ERRORS_SHOWN]:
        e = dict(e)
        if "input" in e:
            e["input"] = _echo(e["input"], [ECHO_MAX_CHARS])
        for k in ("loc", "msg", "ctx"):
            if k in e:
                e[k] = _echo(e[k], [4 * ECHO_MAX_CHARS])
        out.append(_json_safe(e))
    if len(errors) > MAX_ERRORS_SHOWN:
        more = len(errors) - MAX_ERRORS_SHOWN
        out.append(
            {
                "type": "too_many_errors",
                "loc": ["body"],
                "msg": f"and {more} more errors (the first {MAX_ERRORS_SHOWN} are shown)",
                "input": None,
            }
        )
    return out


def _echo(x: Any, budget: list[int]) -> Any:
    """``x`` cut to roughly ``budget[0]`` characters of JSON: long strings end in ``...``,
    long lists and mappings keep their first items and say how many there were."""
    if budget[0] <= 0:
        return "..."
    if isinstance(x, str):
        n = len(x)
        cut = x if n <= budget[0] else x[: max(budget[0], 16)] + f"... ({n} characters)"
        budget[0] -= len(cut) + 2
        return cut
    if isinstance(x, dict):
        out: dict[str, Any] = {}
        for i, (k, v) in enumerate(x.items()):
            if budget[0] <= 0:
                out["..."] = f"({len(x) - i} more keys)"
                break
            key = str(k)[:64]
            budget[0] -= len(key) + 4
            out[key] = _echo(v, budget)
        return out
    if isinstance(x, list | tuple):
        items: list[Any] = []
        for i, v in enumerate(x):
            if budget[0] <= 0:
                items.append(f"... ({len(x) - i} more items)")
                break
            items.append(_echo(v, budget))
        return items
    if x is None or isinstance(x, bool | int | float):
        budget[0] -= 8
        return x
    return _echo(str(x), budget)


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x is None or isinstance(x, str | int | float | bool):
        return x
    return str(x)


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()
