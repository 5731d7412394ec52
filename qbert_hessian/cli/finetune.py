"""``qbert-hessian finetune``: an FP32 baseline fine-tuned with transformers' Trainer."""

from __future__ import annotations

import argparse

from ..config import FinetuneConfig
from ..errors import QBHError
from .common import add_common, add_config, add_files, add_max_eval, check_out_dir, from_args, raw_task, say, start

DISTRIBUTED = True  # shares its work over the processes of a torchrun / accelerate launch


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune an FP32 baseline with transformers' Trainer",
        description="Fine-tune an FP32 baseline. Example: qbert-hessian finetune --model minilm-l6 "
        "--task sst2 --data ../shared/data/sst2 --max-train-samples 4000 --out runs/sst2/checkpoint",
    )
    add_files(
        p,
        model="minilm-l6, a local folder, or a hub name",
        out="checkpoint folder to write",
        resume="continue from the last Trainer checkpoint in OUT",
        force="overwrite a finished checkpoint in OUT",
    )
    add_config(p, FinetuneConfig, skip=["max_length"])
    add_max_eval(p, "score the checkpoint on a subset of this many dev examples, drawn with --seed (default: all)")
    add_common(p)
    return p


def run(args: argparse.Namespace) -> int:
    from .. import stages
    from ..evaluate import summary

    check_out_dir(args.out)
    if (args.out / "metrics.json").exists() and not (args.force or args.resume):
        raise QBHError(f"'{args.out}' already holds a fine-tuned checkpoint; pass --force to overwrite it")
    config = from_args(FinetuneConfig, args)
    if config.batch_size % args.world.size:
        raise QBHError(
            f"--batch-size {config.batch_size} is the batch of all {args.world.size} processes together and must "
            f"split evenly over them; use a multiple of {args.world.size}"
        )
    raw = raw_task(args)
    start(args)
    result = stages.finetune(
        args.model,
        raw,
        config,
        args.out,
        device=args.device,
        resume=args.resume,
        progress=not args.quiet,
        max_eval_samples=args.max_eval_samples,
    )
    m = result["metrics"]
    say(args, f"dev {summary(m, raw.family)} on {m['num_examples']} examples; checkpoint in {args.out}")
    return 0
