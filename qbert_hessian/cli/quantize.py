"""``qbert-hessian quantize``: a plan applied to an FP32 model (direct quantization), written as a packed
checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..allocate import MIB
from ..config import RANGE_METHODS, CalibrationConfig
from ..errors import QBHError
from .common import (
    add_common,
    add_config,
    add_files,
    add_quant_overrides,
    check_not_link,
    check_out_dir,
    from_args,
    raw_task,
    say,
)

DISTRIBUTED = False  # light: runs in one process only


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "quantize",
        help="apply a plan (direct quantization) and write a packed checkpoint",
        description="Quantize a fine-tuned model with a plan and write the bit-packed checkpoint. Example: "
        "qbert-hessian quantize --model runs/sst2/checkpoint --plan plan.json --task sst2 "
        "--data ../shared/data/sst2 --out runs/sst2/packed",
    )
    add_files(
        p,
        model="the FP32 fine-tuned model",
        out="packed checkpoint folder to write",
        force="replace an existing packed checkpoint in OUT",
    )
    p.add_argument("--plan", type=Path, required=True, help="plan.json from qbert-hessian plan")
    p.add_argument(
        "--weight-range",
        choices=RANGE_METHODS,
        default=None,
        help="each group's range: max or mse (default: the plan's own)",
    )
    add_quant_overrides(p, "the plan's own")
    add_config(p, CalibrationConfig)
    add_common(p)
    return p


def run(args: argparse.Namespace) -> int:
    from .. import stages
    from ..artifacts import BitPlan
    from ..export import is_packed

    check_not_link(args.out)
    if args.out.exists():
        if not is_packed(args.out):
            raise QBHError(f"'{args.out}' exists and is not a packed checkpoint; choose a new folder for --out")
        if not args.force:
            raise QBHError(f"'{args.out}' exists; pass --force to replace the packed checkpoint there")
    check_out_dir(args.out.parent)
    calibration = from_args(CalibrationConfig, args)
    plan = stages.with_range_method(BitPlan.load(args.plan), args.weight_range)
    plan = stages.with_rounding(plan, args.rounding, calib_samples=args.calib_samples, damp=args.damp)
    plan = stages.with_act_range(plan, args.act_range)
    raw = raw_task(args)
    try:
        model, task = stages.load_for_task(args.model, raw, max_length=args.max_length, eager=False, device=args.device)
        # validates the plan before anything is written
        qmodel = stages.quantize_direct(model, plan, task, calibration, progress=not args.quiet)
        size = stages.export(qmodel, plan, args.out, fp32=model, tokenizer=task.tokenizer)
    except KeyboardInterrupt:
        say(args, f"interrupted; nothing was written to {args.out} (a packed checkpoint there is unchanged)", err=True)
        return 130
    predicted = size.predicted_bytes
    print(
        f"packed checkpoint {args.out / 'model.safetensors'}: {size.packed_bytes / MIB:.3f} MiB on disk vs FP32 "
        f"safetensors {size.fp32_safetensors_bytes / MIB:.3f} MiB ({size.compression:.2f}x smaller)"
        + (
            f"; plan predicted {predicted / MIB:.3f} MiB ({size.packed_bytes - predicted:+d} bytes)"
            if predicted
            else ""
        )
    )
    return 0
