"""``qbert-hessian landscape``: 1-D/2-D loss surfaces of blocks along Hessian eigenvectors, random directions or
the gradient."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import LandscapeConfig
from ..errors import QBHError
from .common import (
    ANY_MODEL,
    add_common,
    add_config,
    add_files,
    check_out_dir,
    csv_list,
    from_args,
    raw_task,
    say,
    start,
)

DISTRIBUTED = True  # shares its work over the processes of a torchrun / accelerate launch


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "landscape",
        help="1-D/2-D loss surfaces of blocks along Hessian eigenvectors (top, or extreme), random, gradient",
        description="Loss on a grid around a block's weights. Example: qbert-hessian landscape --model "
        "runs/sst2/checkpoint --task sst2 --data ../shared/data/sst2 --block encoder.0,encoder.5 "
        "--directions eigen --grid 21 --out runs/sst2/landscape",
    )
    add_files(
        p,
        model=ANY_MODEL,
        out="folder: <block>/landscape.{json,png} and panels.png",
        resume="keep the finished rows of existing landscapes",
        force="overwrite existing landscapes",
    )
    p.add_argument(
        "--block", type=csv_list, required=True, help="block(s), comma-separated, or 'model' for all weights"
    )
    add_config(p, LandscapeConfig, radius="--range", num_batches="--batches")
    add_common(p)
    return p


def run(args: argparse.Namespace) -> int:
    from .. import stages

    config = from_args(LandscapeConfig, args)
    if not args.block:
        raise QBHError("--block names no block; e.g. --block encoder.0,encoder.5 (or 'model')")
    check_out_dir(args.out)
    for b in args.block:
        path = args.out / b / "landscape.json"
        if path.exists() and not (args.resume or args.force):
            raise QBHError(f"'{path}' exists; pass --resume to continue it or --force to overwrite it")
    model, task = stages.load_for_task(args.model, raw_task(args), max_length=args.max_length, device=args.device)
    stages.check_blocks(model, args.block)

    def done(ls, path: Path) -> None:
        lo, hi = min(min(r) for r in ls.loss), max(max(r) for r in ls.loss)
        print(f"{ls.block}: loss {ls.center_loss:.4f} at the weights, {lo:.4f} .. {hi:.4f} on the grid; {path}")

    start(args)
    try:
        found = stages.landscapes(
            model,
            task,
            args.block,
            config,
            args.out,
            model_name=args.model,
            resume=args.resume,
            progress=not args.quiet,
            on_done=done,
        )
    except KeyboardInterrupt:
        say(args, f"interrupted; finished rows are in {args.out}; rerun with --resume to continue", err=True)
        return 130
    if len(found) > 1:
        say(args, f"side by side: {args.out / 'panels.png'}")
    return 0
