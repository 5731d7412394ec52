"""``qbert-hessian plan``: bits per block under one memory budget (the exact MILP), from a sensitivity report."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..config import AllocConfig, Assign, PlanSpec
from ..errors import QBHError
from .common import add_common, add_config, check_out_file, from_args

DISTRIBUTED = False  # light: runs in one process only


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plan",
        help="bits per block under a memory budget (exact MILP), from a sensitivity report",
        description="Allocate bits per encoder block under one budget. Example: qbert-hessian plan "
        "--report runs/sst2/sensitivity --avg-bits 2.5 --out runs/sst2/plans/mixed-2.5.json",
    )
    p.add_argument("--report", type=Path, required=True, help="sensitivity.json or the folder holding it")
    p.add_argument("--out", type=Path, required=True, help="plan file to write (plan.md and plots go beside it)")
    budget = p.add_mutually_exclusive_group(required=True)
    helps = PlanSpec.field_help()
    for name in ("budget_mb", "ratio", "avg_bits"):
        budget.add_argument("--" + name.replace("_", "-"), type=float, help=helps[name])
    budget.add_argument("--uniform", type=int, metavar="BITS", help=helps["uniform"])
    p.add_argument("--assign", choices=[a.value for a in Assign], default=None, help=helps["assign"])
    p.add_argument("--assign-seed", type=int, default=None, help=helps["assign_seed"])
    add_config(p, AllocConfig, range_method="--weight-range")
    p.add_argument("--no-act-quant", action="store_true", help="keep activations in FP32")
    p.add_argument(
        "--model",
        default=None,
        help="the report's model, to measure ||Q(W)-W||^2 if profile.json lacks it (or has another --weight-range), "
        "or with --measure quadratic|measured to price each block's loss on the report's draws",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="with --measure quadratic|measured: the folder of the report's task data (default: $QBH_DATA_DIR)",
    )
    p.add_argument("--frontier", action="store_true", help="also sweep budgets: frontier.json and frontier.png")
    p.add_argument("--force", action="store_true", help="overwrite an existing plan")
    add_common(p, device=False)
    return p


def run(args: argparse.Namespace) -> int:
    from .. import stages
    from ..allocate import check_report_coverage
    from ..artifacts import SensitivityReport

    out = args.out if args.out.suffix == ".json" else args.out / "plan.json"
    check_out_file(out)
    if out.exists() and not args.force:
        raise QBHError(f"'{out}' exists; pass --force to overwrite it")
    report_file = stages.report_path(args.report)
    report = SensitivityReport.load(report_file)
    if not report.complete:
        raise QBHError(f"'{report_file}' is partial ({', '.join(report.pending)} pending); finish it with --resume")
    spec = PlanSpec(
        out.stem,
        args.uniform,
        args.avg_bits,
        args.budget_mb,
        args.ratio,
        assign=args.assign,
        assign_seed=args.assign_seed,
    )
    config = from_args(
        AllocConfig,
        args,
        bits=(args.uniform,) if args.uniform is not None else args.bits,
        act_bits=None if args.no_act_quant else args.act_bits,
    )
    if args.uniform is None:  # before the cost table is measured (and profile.json rewritten) for nothing
        check_report_coverage(report)
    data = args.data or (Path(os.environ["QBH_DATA_DIR"]) if os.environ.get("QBH_DATA_DIR") else None)
    profile = stages.plan_profile(report_file, report, config, model=args.model, data=data, progress=not args.quiet)
    source = {"sensitivity": str(report_file), "sha256": stages.sha256_file(report_file)}
    plan = stages.make_plan(report, profile, spec, config, source=source)
    stages.write_plan(plan, out)
    if args.frontier:
        stages.write_frontier(report, profile, config, out.parent, plan)
    print(out.with_suffix(".md").read_text(encoding="utf-8"))
    print(f"plan in {out}" + (f"; frontier in {out.parent / 'frontier.png'}" if args.frontier else ""))
    return 0
