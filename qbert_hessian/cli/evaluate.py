"""``qbert-hessian evaluate``: the task metric of an FP32 model, of its direct quantization under plans, and of
packed checkpoints and ONNX exports, on the same dev examples."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import CalibrationConfig
from ..errors import QBHError
from .common import ANY_MODEL, add_common, add_config, add_data_args, add_max_eval, check_out_file, from_args, raw_task

DISTRIBUTED = False  # light: runs in one process only


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate",
        help="task metric of an FP32 model, its direct quantization under plans, and packed checkpoints",
        description="Evaluate on the dev split. Example: qbert-hessian evaluate --model runs/sst2/checkpoint "
        "--task sst2 --data ../shared/data/sst2 --plan plan.json --packed runs/sst2/packed",
    )
    p.add_argument("--model", required=True, help=ANY_MODEL)
    add_data_args(p)
    p.add_argument("--plan", type=Path, action="append", default=[], help="also evaluate direct quantization (repeat)")
    p.add_argument("--packed", type=Path, action="append", default=[], help="also evaluate a packed folder (repeat)")
    p.add_argument(
        "--onnx", type=Path, action="append", default=[], help="also evaluate an ONNX export with ONNX Runtime (repeat)"
    )
    p.add_argument("--out", type=Path, default=None, help="evaluation JSON file to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    add_config(p, CalibrationConfig)
    add_max_eval(p, "score every model on the same subset of this many dev examples, drawn with --seed (default: all)")
    add_common(p)
    return p


def run(args: argparse.Namespace) -> int:
    from .. import stages
    from ..artifacts import BitPlan
    from ..evaluate import METRIC_COLUMNS

    if args.out is not None:
        check_out_file(args.out)
        if args.out.exists() and not args.force:
            raise QBHError(f"'{args.out}' exists; pass --force to overwrite it, or another --out")
    calibration = from_args(CalibrationConfig, args)
    raw = raw_task(args)
    plans = [(str(p), BitPlan.load(p)) for p in args.plan]  # refuse bad plans before any work
    result = stages.evaluate_models(
        args.model,
        raw,
        plans=plans,
        packed=args.packed,
        onnx=args.onnx,
        calibration=calibration,
        max_length=args.max_length,
        device=args.device,
        max_eval_samples=args.max_eval_samples,
        eval_seed=calibration.seed,
    )
    cols = [*METRIC_COLUMNS[raw.family], "loss"]
    print(f"| model | kind | size MiB | {' | '.join(cols)} |\n|---|---|---:|{'---:|' * len(cols)}")
    for r in result.results:
        size = f"{r['size_mib']:.3f}" if r["size_mib"] is not None else "-"
        print(f"| {r['name']} | {r['kind']} | {size} | {' | '.join(f'{r[c]:.4f}' for c in cols)} |")
    if args.out:
        result.task = args.task
        result.save(args.out)
    return 0
