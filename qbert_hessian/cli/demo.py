"""``qbert-hessian demo``: the whole pipeline on the offline default (MiniLM-L6, BBC News), sized for 2 CPU
cores."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import check_out_dir
from .run import DESCRIPTION, add_run_options, execute, make_run

DISTRIBUTED = True  # shares its work over the processes of a torchrun / accelerate launch


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="the offline default: MiniLM-L6 on BBC News through the whole pipeline (about 10 minutes on 2 cores)",
        description=DESCRIPTION + "make demo",
    )
    add_run_options(p, out=Path("runs/demo"))
    return p


def run(args: argparse.Namespace) -> int:
    """The whole pipeline on the offline default (MiniLM-L6, BBC News), sized for 2 CPU cores."""
    from ..run_config import DEMO_CONFIG, apply_overrides, parse_run_config

    config = parse_run_config(apply_overrides(DEMO_CONFIG, args.overrides))
    check_out_dir(args.out)
    return execute(args, make_run(args, config, args.out))
