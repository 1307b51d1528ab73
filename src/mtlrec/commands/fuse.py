"""``mtlrec fuse``: search or learn a score fusion on a run's held-out predictions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

FORMULAS = ("weighted_sum", "weighted_product", "extended_product", "rank")
LEARNED = ("lgbm", "neural")


def parse_task_values(text: str, what: str) -> dict[str, float]:
    """``"click:1,conv:2"`` -> ``{"click": 1.0, "conv": 2.0}`` (a bare name means 1)."""
    from mtlrec.errors import ConfigError

    out: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, value = part.partition(":")
        try:
            out[name.strip()] = float(value) if value else 1.0
        except ValueError:
            raise ConfigError(f"{what} {part!r}: expected TASK:NUMBER") from None
    return out


def _start_fusion(formula: str, tasks: list[str], transform: str, buckets: int) -> Any:
    from mtlrec.fusion import (
        ExtendedParams,
        ExtendedProduct,
        ProductParams,
        RankFusion,
        RankParams,
        SumParams,
        WeightedProduct,
        WeightedSum,
    )

    ones = dict.fromkeys(tasks, 1.0)
    if formula == "weighted_sum":
        return WeightedSum(SumParams(weights=ones, transform=transform))  # type: ignore[arg-type]
    if formula == "weighted_product":
        return WeightedProduct(ProductParams(exponents=ones))
    if formula == "extended_product":
        return ExtendedProduct(ExtendedParams(exponents=ones))
    return RankFusion(RankParams(weights=ones, buckets=buckets))


def register(app: typer.Typer) -> None:
    from mtlrec.cli import friendly

    @app.command()
    @friendly
    def fuse(
        run: Annotated[Path, typer.Argument(help="run folder")],
        output: Annotated[Path, typer.Option(help="fusion JSON file to write")],
        method: Annotated[
            str, typer.Option(help="grid, random, cem, es, tpe, cmaes (search) or lgbm, neural")
        ] = "cem",
        formula: Annotated[
            str, typer.Option(help="weighted_sum, weighted_product, extended_product or rank")
        ] = "weighted_product",
        objective: Annotated[
            str, typer.Option(help="TASK:COEF,... weights of the per-task AUCs (default: 1 each)")
        ] = "",
        tasks: Annotated[str, typer.Option(help="tasks to fuse (default: the objective's)")] = "",
        floor: Annotated[str, typer.Option(help="TASK:AUC,... lowest acceptable AUCs")] = "",
        split: Annotated[str, typer.Option(help="split to fit on: valid or test")] = "valid",
        eval_split: Annotated[
            str | None, typer.Option(help="also report start vs chosen on this split (test)")
        ] = None,
        allow_in_sample: Annotated[
            bool,
            typer.Option(
                help="allow --eval-split to be the fit split; every output then labels that "
                "report in-sample (optimistic)"
            ),
        ] = False,
        budget: Annotated[int, typer.Option(min=1, help="parameter vectors to evaluate")] = 200,
        seed: Annotated[int, typer.Option()] = 0,
        high: Annotated[float | None, typer.Option(help="upper bound of every weight")] = None,
        transform: Annotated[str, typer.Option(help="weighted_sum: identity, log, logit")] = (
            "identity"
        ),
        buckets: Annotated[int, typer.Option(min=2, help="rank: percentile buckets")] = 100,
        calibrate: Annotated[str, typer.Option(help="none, platt or isotonic per task")] = "none",
        downsample: Annotated[
            str, typer.Option(help="TASK:RATE,... negative down-sampling rates in training")
        ] = "",
        label: Annotated[
            str | None, typer.Option(help="lgbm/neural business label, e.g. 'click + 4*conv'")
        ] = None,
        gauc: Annotated[bool, typer.Option(help="GAUC per request when there are requests")] = True,
        plot: Annotated[Path | None, typer.Option(help="Pareto-front PNG (plot extra)")] = None,
        show: Annotated[int, typer.Option(help="Pareto rows to print")] = 10,
        as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    ) -> None:
        """Search (grid/random/CEM/ES/TPE/CMA-ES) or learn (LightGBM/neural) a fusion of the
        task scores on a held-out split; write it as JSON for `mtlrec predict --fusion`."""
        import numpy as np
        from rich.table import Table

        from mtlrec.cli import out
        from mtlrec.errors import ConfigError
        from mtlrec.fusion import (
            SEARCHERS,
            Calibration,
            FusionObjective,
            business_label,
            fit_lgbm,
            fit_neural,
            save_fusion,
            search_fusion,
        )
        from mtlrec.fusion.heldout import run_predictions
        from mtlrec.train.run import load_run

        if method not in SEARCHERS + LEARNED:
            raise ConfigError(f"--method {method!r}: choose from {', '.join(SEARCHERS + LEARNED)}")
        if formula not in FORMULAS:
            raise ConfigError(f"--formula {formula!r}: choose from {', '.join(FORMULAS)}")
        if transform not in ("identity", "log", "logit"):
            raise ConfigError(f"--transform {transform!r}: choose identity, log or logit")
        if calibrate not in ("none", "platt", "isotonic"):
            raise ConfigError(f"--calibrate {calibrate!r}: choose none, platt or isotonic")
        if output.suffix != ".json":
            raise ConfigError(f"--output {output}: the fusion file must end in .json")
        in_sample = eval_split is not None and eval_split == split
        if in_sample and not allow_in_sample:
            raise ConfigError(
                f"--eval-split {eval_split} is the split the fusion is fitted on (--split "
                f"{split}): a figure measured there is in-sample and overstates the fusion. "
                "Fit on valid and report on test (--split valid --eval-split test), or pass "
                "--allow-in-sample to report it labelled as in-sample"
            )
        loaded = load_run(run)
        held = run_predictions(loaded, split)
        coefs = parse_task_values(objective, "--objective") or dict.fromkeys(held.binary_tasks, 1.0)
        for name, given in (("--objective", coefs), ("--floor", parse_task_values(floor, ""))):
            bad = [t for t in given if t not in held.binary_tasks]
            if bad:
                raise ConfigError(
                    f"{name} names tasks {bad} that are not binary tasks of the run "
                    f"(binary tasks: {', '.join(held.binary_tasks)})"
                )
        floors = parse_task_values(floor, "--floor")
        fused = [t for t in tasks.split(",") if t] or list(coefs)
        bad = [t for t in fused if t not in held.probs]
        if bad:
            raise ConfigError(
                f"--tasks names tasks {bad} that the run does not predict "
                f"(tasks: {', '.join(held.probs)})"
            )
        rates = parse_task_values(downsample, "--downsample")
        bad = [t for t in rates if t not in fused]
        if bad:
            raise ConfigError(f"--downsample names tasks {bad} that are not fused ({fused})")
        calib: dict[str, Calibration] = {}
        for t in fused:
            if calibrate != "none" or t in rates:
                if calibrate != "none" and t not in held.binary_tasks:
                    raise ConfigError(f"--calibrate: task {t!r} is not binary")
                m = held.masks[t]
                calib[t] = Calibration.fit(
                    held.probs[t][m],
                    held.labels[t][m],
                    calibrate,
                    rates.get(t),  # type: ignore[arg-type]
                )
        obj_kw: dict[str, Any] = {
            "coefficients": coefs,
            "masks": held.masks,
            "groups": held.groups,
            "grouped": gauc,
            "floors": floors,
        }
        target = FusionObjective(held.labels, **obj_kw)
        start = _start_fusion(formula, fused, transform, buckets)
        start.calibration = calib
        probs = {t: held.probs[t] for t in fused}
        result = None
        if method in SEARCHERS:
            bounds = None
            if high is not None:
                lo, hi = start.bounds()
                bounds = (lo, np.full_like(hi, high))
            result = search_fusion(
                start,
                probs,
                target,
                method=method,
                budget=budget,
                seed=seed,
                groups=held.groups,
                bounds=bounds,
            )
            chosen = result.fusion
        else:
            expr = label or " + ".join(f"{c:g}*{t}" for t, c in coefs.items())
            y = business_label(expr, held.labels)
            p = start.matrix(probs)
            if method == "lgbm":
                chosen = fit_lgbm(
                    p,
                    y,
                    fused,
                    groups=held.groups,
                    seed=seed,
                    model_file=output.with_suffix(".lgbm.txt").name,
                )
            else:
                chosen = fit_neural(p, y, fused, groups=held.groups, seed=seed)
            chosen.calibration = calib
            chosen.meta.update({"method": method, "label": expr, "seed": seed})
        assert chosen is not None

        def measure(f: Any, h: Any, obj: Any) -> tuple[np.ndarray, float]:
            m = obj.per_task(np.asarray(f({t: h.probs[t] for t in fused}, h.groups)))
            return m, obj.value(m)[0]

        # (name, per-task metric, objective, parameters, measured on the split it was fit on)
        rows: list[tuple[str, np.ndarray, float, str, bool]] = []
        m0, v0 = measure(start, held, target)
        m1, v1 = measure(chosen, held, target)
        chosen.meta.update(
            {
                "split": held.name,
                "metric": target.metric,
                "objective": v1,
                "per_task": dict(zip(target.tasks, m1.tolist(), strict=True)),
                "start_objective": v0,
            }
        )
        rows += [
            (f"start ({split})", m0, v0, _params(start), False),
            (f"chosen ({split})", m1, v1, _params(chosen), True),
        ]
        # the report on another split; on the fit split itself (--allow-in-sample) every
        # output names it in-sample: table rows and title, JSON rows, the fusion file's meta
        tag = f"{eval_split}, in-sample" if in_sample else f"{eval_split}"
        key = f"{eval_split}_in_sample" if in_sample else f"{eval_split}"
        if eval_split is not None:
            other = held if in_sample else run_predictions(loaded, eval_split)
            obj2 = FusionObjective(
                other.labels, **{**obj_kw, "masks": other.masks, "groups": other.groups}
            )
            e0, w0 = measure(start, other, obj2)
            e1, w1 = measure(chosen, other, obj2)
            rows += [
                (f"start ({tag})", e0, w0, "", False),
                (f"chosen ({tag})", e1, w1, "", in_sample),
            ]
            chosen.meta[f"{key}_objective"] = w1
            chosen.meta[f"{key}_per_task"] = dict(zip(target.tasks, e1.tolist(), strict=True))
            if in_sample:
                chosen.meta["in_sample_eval"] = True
        save_fusion(chosen, output)
        front = result.pareto() if result is not None else []
        if plot is not None and result is not None:
            from mtlrec.fusion.plot import plot_pareto

            plot_pareto(result, plot)
        if as_json:
            out.print_json(
                json.dumps(
                    {
                        "fusion": chosen.to_dict(),
                        "in_sample_eval": in_sample,
                        "rows": [
                            {
                                "name": n,
                                "per_task": dict(zip(target.tasks, m.tolist(), strict=True)),
                                "objective": v,
                                "in_sample": fitted_here,
                            }
                            for n, m, v, _, fitted_here in rows
                        ],
                        "pareto": [
                            {
                                "params": dict(
                                    zip(result.dimension_names, t.x.tolist(), strict=True)
                                ),
                                "per_task": dict(
                                    zip(target.tasks, t.metrics.tolist(), strict=True)
                                ),
                                "objective": t.objective,
                            }
                            for t in front
                        ]
                        if result
                        else [],
                    }
                )
            )
            return
        metric = target.metric.upper()
        table = Table(
            title=f"fusion {method} on {held.name}: objective = "
            + " + ".join(f"{c:g}*{metric}({t})" for t, c in coefs.items())
            + (
                f"; the {eval_split} rows are IN-SAMPLE (fitted on that split: optimistic)"
                if in_sample
                else ""
            )
        )
        table.add_column("fusion")
        for t in target.tasks:
            table.add_column(f"{t} {metric}", justify="right")
        table.add_column("objective", justify="right")
        table.add_column("parameters")
        for name, m, v, params, _ in rows:
            table.add_row(name, *[f"{x:.5f}" for x in m], f"{v:.5f}", params)
        out.print(table)
        if in_sample:
            out.print(
                f"note: the {eval_split} figures are in-sample (the fusion was fitted on "
                f"{eval_split}); they overstate how it does on new data"
            )
        if result is not None:
            pt = Table(
                title=f"Pareto front of the per-task {metric}s: {len(front)} of "
                f"{len(result.trials)} explored points ({result.seconds:.1f} s)"
            )
            for t in target.tasks:
                pt.add_column(f"{t} {metric}", justify="right")
            pt.add_column("objective", justify="right")
            pt.add_column("parameters")
            for tr in front[:show]:
                pt.add_row(
                    *[f"{x:.5f}" for x in tr.metrics],
                    f"{tr.objective:.5f}",
                    ", ".join(
                        f"{n}={x:.3g}" for n, x in zip(result.dimension_names, tr.x, strict=True)
                    ),
                )
            out.print(pt)
        out.print(f"wrote {output}")


def _params(f: Any) -> str:
    from mtlrec.fusion import ParametricFusion

    if isinstance(f, ParametricFusion):
        return ", ".join(
            f"{n}={x:.3g}" for n, x in zip(f.dimension_names(), f.vector(), strict=True)
        )
    return f.kind
