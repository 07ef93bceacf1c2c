"""`slmforge route train|eval|calibrate`: routers between a small and a large model (see slmforge/route.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slmforge.errors import SlmforgeError
from slmforge.route import CalibrationTarget, EvalConfig, OutcomeFormat, RouterConfig
from slmforge.stage_config import options_from

route_app = typer.Typer(no_args_is_help=True, help="Route prompts between a small and a large model: train a "
                                                   "router on evaluation outcomes, evaluate it (APGR, CPT), "
                                                   "calibrate its threshold.")

Data = Annotated[Path, typer.Option(help="Outcomes: JSONL (prompt, small, large, optional group), a CSV, or a "
                                         "folder of RouteLLM's MMLU responses (mmlu_responses/*.csv).")]


@route_app.command("train")
@options_from(CalibrationTarget, name="cal")
@options_from(OutcomeFormat, name="fmt")
@options_from(RouterConfig)
def route_train(
    cfg: RouterConfig,
    fmt: OutcomeFormat,
    cal: CalibrationTarget,
    data: Data,
    out: Annotated[Path, typer.Option(help="Router folder to write (router.json, arrays.safetensors).")],
    val: Annotated[Path | None, typer.Option(help="Validation outcomes for the threshold (--share, --quality "
                                                  "or --pgr); never the training data.")] = None,
) -> None:
    """Train a router on evaluation outcomes; with --val and a target, also choose its threshold there."""
    from slmforge.io import check_out_dir
    from slmforge.route import calibrate, describe, load_outcomes, save_router, train_router

    if cal.target() and val is None:
        raise SlmforgeError("a threshold target (--share, --quality, --pgr) needs --val: thresholds are chosen "
                            "on validation data, not on the training data")
    check_out_dir(out)
    # every input read and checked before the training
    train = load_outcomes(data, fmt, signal=cfg.signal)
    valdata = load_outcomes(val, fmt, signal=cfg.signal) if val is not None else None
    router = train_router(train, cfg)
    if valdata is not None and cal.target():
        router = calibrate(router, valdata, **cal.target())
    save_router(router, out)
    left_out = f" ({train.excluded} contaminated prompts left out)" if train.excluded else ""
    typer.echo(f"wrote {out} · {describe(router)}{left_out}")


@route_app.command("eval")
@options_from(OutcomeFormat, name="fmt")
@options_from(EvalConfig)
def route_eval(
    cfg: EvalConfig,
    fmt: OutcomeFormat,
    router: Annotated[Path, typer.Argument(help="Router folder (slmforge route train).")],
    data: Data,
) -> None:
    """APGR, CPT(50%) and CPT(80%) on held-out outcomes, beside the random baseline and the optimal router;
    with a calibrated threshold, the share of large calls and the quality it gives here."""
    from slmforge.io import check_out_file, write_json
    from slmforge.route import format_report, load_outcomes, load_router, plot_curves, report

    for p in (cfg.json_out, cfg.plot):
        if p:
            check_out_file(p)
    r = load_router(router)
    d = load_outcomes(data, fmt, signal=r.config.signal if r.kind == "cascade" else None)
    rep = report(r, d, cfg)
    typer.echo(format_report(rep))
    if cfg.json_out:
        write_json(cfg.json_out, rep)
        typer.echo(f"wrote {cfg.json_out}")
    if cfg.plot:
        curves = {r.kind: rep["result"]["curve"], "random": rep["random"]["curve"], "optimal": rep["optimal"]["curve"]}
        plot_curves(curves, d, cfg.plot, title=f"{r.kind} router on {d.source}")
        typer.echo(f"wrote {cfg.plot}")


@route_app.command("calibrate")
@options_from(OutcomeFormat, name="fmt")
@options_from(CalibrationTarget, name="cal")
def route_calibrate(
    cal: CalibrationTarget,
    fmt: OutcomeFormat,
    router: Annotated[Path, typer.Argument(help="Router folder (slmforge route train).")],
    data: Annotated[Path, typer.Option(help="Validation outcomes (JSONL, CSV or RouteLLM's MMLU folder).")],
    out: Annotated[Path | None, typer.Option(help="Write the calibrated router here (default: in place).")] = None,
) -> None:
    """Choose the threshold on validation data for one target: a share of large calls (--share), a fraction of
    the large model's quality (--quality 0.95) or a PGR (--pgr); it is then applied unchanged."""
    from slmforge.io import check_out_dir
    from slmforge.route import calibrate, describe, load_outcomes, load_router, save_router

    if not cal.target():
        raise SlmforgeError("route calibrate: give a target: --share, --quality or --pgr")
    dest = out or router
    check_out_dir(dest)
    r = load_router(router)
    d = load_outcomes(data, fmt, signal=r.config.signal if r.kind == "cascade" else None)
    r = calibrate(r, d, **cal.target())
    save_router(r, dest)
    typer.echo(f"wrote {dest} · {describe(r)}")
