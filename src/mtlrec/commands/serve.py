"""``mtlrec serve``: the scoring service of a run (or of an export folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    from mtlrec.cli import friendly

    @app.command("serve")
    @friendly
    def serve(
        run: Annotated[
            Path,
            typer.Argument(help="run folder (eager PyTorch) or export folder (ONNX/TorchScript)"),
        ],
        fusion: Annotated[
            Path | None, typer.Option(help="fusion JSON file: adds the fused score")
        ] = None,
        host: Annotated[str, typer.Option(help="address to bind (loopback by default)")] = (
            "127.0.0.1"
        ),
        port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
        max_candidates: Annotated[int, typer.Option(min=1, help="candidates per request")] = 1000,
        max_body_bytes: Annotated[int, typer.Option(min=1024, help="largest request body")] = (
            1 << 20
        ),
        context: Annotated[
            str,
            typer.Option(
                help="feature columns given once per request in 'context', comma-separated "
                "(default: any column may be in the context or in the candidates)"
            ),
        ] = "",
        threads: Annotated[
            int, typer.Option(min=1, help="threads of the model in each worker")
        ] = 1,
        workers: Annotated[
            int,
            typer.Option(
                min=1,
                help="worker processes, each with its own copy of the model (one per core "
                "serves concurrent requests in parallel)",
            ),
        ] = 1,
        precision: Annotated[
            str,
            typer.Option(
                help="fp32, or bf16 (autocast; a run folder, not an export) when it keeps every "
                "task's validation AUC within 0.001 of fp32's (mtlrec predict --help)"
            ),
        ] = "fp32",
    ) -> None:
        """Serve POST /score, GET /healthz, GET /metadata (OpenAPI at /docs, /openapi.json).

        With ``--workers N`` the counters of ``/metadata`` (requests, unknown categories)
        are those of the worker that answers.
        """
        try:
            import fastapi  # noqa: F401
            import uvicorn
        except ImportError as e:
            from mtlrec.errors import ConfigError

            raise ConfigError(
                f"serve needs the 'serve' extra (pip install 'mtlrec[serve]'): {e}"
            ) from None
        import json
        import os

        import torch

        from mtlrec.cli import err
        from mtlrec.serve import Scorer, create_app
        from mtlrec.serve.app import SERVE_OPTIONS_ENV, freeze_heap

        torch.set_num_threads(threads)
        # loaded here also with several workers: a bad run folder, fusion file or --context
        # fails once, with one message, before any worker starts
        scorer = Scorer.load(run, fusion=fusion, precision=precision)
        ctx = [c for c in context.split(",") if c] or None
        api = create_app(
            scorer,
            max_candidates=max_candidates,
            max_body_bytes=max_body_bytes,
            context_features=ctx,
        )
        if host not in ("127.0.0.1", "localhost", "::1"):
            err.print(f"warning: binding {host}: the service has no authentication")
        err.print(
            f"serving {scorer.model_name} ({scorer.backend}) from {run} on http://{host}:{port}"
            + (f" with {workers} workers" if workers > 1 else "")
        )
        opts = {
            "log_level": "warning",
            "access_log": False,
            "host": host,
            "port": port,
            "http": "mtlrec.serve.protocol:NoDelayProtocol",
        }
        if workers == 1:
            freeze_heap()
            uvicorn.run(api, **opts)  # type: ignore[arg-type]
            return
        del api, scorer
        os.environ[SERVE_OPTIONS_ENV] = json.dumps(
            {
                "run": str(run.resolve()),
                "fusion": None if fusion is None else str(fusion.resolve()),
                "precision": precision,
                "threads": threads,
                "max_candidates": max_candidates,
                "max_body_bytes": max_body_bytes,
                "context_features": ctx,
                # every worker ends with this process, even when it is killed (SIGKILL)
                "parent_pid": os.getpid(),
            }
        )
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        uvicorn.run(
            "mtlrec.serve.app:app_from_env",
            factory=True,
            workers=workers,
            **opts,  # type: ignore[arg-type]
        )
