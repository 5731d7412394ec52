"""``qbert-hessian sensitivity``: every block scored by its top Hessian eigenvalue over data draws (Q-BERT)."""

from __future__ import annotations

import argparse

from ..config import SensitivityConfig
from ..errors import QBHError
from .common import add_common, add_config, add_files, check_out_dir, csv_list, from_args, raw_task, say, start

DISTRIBUTED = True  # shares its work over the processes of a torchrun / accelerate launch


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sensitivity",
        help="per-block Hessian sensitivity report (Q-BERT protocol)",
        description="Score every block by its top Hessian eigenvalue over data draws. Example: "
        "qbert-hessian sensitivity --model runs/sst2/checkpoint --task sst2 "
        "--data ../shared/data/sst2 --out runs/sst2/sensitivity",
    )
    add_files(
        p,
        model="a fine-tuned model (classifier, token tagger or QA): folder, hub name or minilm-l6",
        out="folder for sensitivity.{json,csv,md,png} and profile.json",
        resume="continue OUT/sensitivity.json from its finished blocks and draws (OUT/sensitivity.state.pt)",
        force="overwrite an existing report in OUT",
    )
    p.add_argument(
        "--blocks",
        type=csv_list,
        default=None,
        help="comma-separated blocks or groups: default, layers, embedding-parts, linears, "
        "embeddings[.word|.position|.token_type], encoder.N[.query|.key|.value|.attn_out|.ffn_in|.ffn_out]",
    )
    add_config(p, SensitivityConfig, skip=["max_length"])
    add_common(p)
    return p


def run(args: argparse.Namespace) -> int:
    from .. import distributed, stages
    from ..artifacts import SensitivityReport
    from ..models import BlockMap, is_classifier
    from ..sensitivity import draw_indices, parallel_mode

    config = from_args(SensitivityConfig, args)
    check_out_dir(args.out)
    existing = args.out / "sensitivity.json"
    resume = None
    if existing.exists():
        if args.resume:
            resume = SensitivityReport.load(existing)
        elif not args.force:
            raise QBHError(f"'{existing}' exists; pass --resume to continue it or --force to overwrite it")
    raw = raw_task(args)
    if not is_classifier(args.model, raw.family):
        raise QBHError(
            f"'{args.model}' has no trained {raw.family} head, so its curvature would describe a random head; "
            "fine-tune it first (qbert-hessian finetune)"
        )
    model, task = stages.load_for_task(args.model, raw, max_length=config.max_length, device=args.device)
    block_map = BlockMap(model)  # built once for the command and passed down
    names = block_map.expand(args.blocks)  # unknown blocks fail before any output is written
    draw_indices(len(task.train), config)  # so does a draw larger than the data
    done = {b.name for b in resume.blocks} if resume is not None else set()
    # so does a world the work cannot be shared over (every rank reaches the same verdict)
    parallel_mode(config, len(task.train), len([n for n in names if n not in done]), args.world.size)
    inputs = {"model": stages.model_fingerprint(args.model), "data": stages.data_fingerprint(raw)}
    start(args)
    resume = distributed.broadcast_object(resume)  # rank 0's report: every rank resumes the same blocks
    try:
        stages.sensitivity(
            model,
            task,
            config,
            args.out,
            blocks=args.blocks,
            model_name=args.model,
            inputs=inputs,
            resume=resume,
            progress=not args.quiet,
            block_map=block_map,
        )
    except KeyboardInterrupt:
        say(args, f"interrupted; the finished draws are kept in {args.out}; rerun with --resume to continue", err=True)
        return 130
    if args.world.is_main:
        print((args.out / "sensitivity.md").read_text(encoding="utf-8"))
        print(f"report in {args.out}")
    return 0
