"""``qbert-hessian density``: the Hessian eigenvalue density of blocks by stochastic Lanczos quadrature."""

from __future__ import annotations

import argparse

from ..config import DensityConfig
from ..errors import QBHError
from .common import ANY_MODEL, add_common, add_config, add_files, check_out_dir, csv_list, from_args, raw_task, start

DISTRIBUTED = True  # shares its work over the processes of a torchrun / accelerate launch


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "density",
        help="Hessian eigenvalue density of blocks by stochastic Lanczos quadrature",
        description="Eigenvalue density of a block's Hessian. Example: qbert-hessian density --model "
        "runs/sst2/checkpoint --task sst2 --data ../shared/data/sst2 --block encoder.0 --out runs/sst2/density",
    )
    add_files(p, model=ANY_MODEL, out="folder for density.json and density.png", force="overwrite density.json")
    p.add_argument("--block", type=csv_list, required=True, help="block(s), comma-separated, or 'model'")
    add_config(p, DensityConfig)
    add_common(p)
    return p


def run(args: argparse.Namespace) -> int:
    from .. import stages
    from ..report import plot_density

    config = from_args(DensityConfig, args)
    check_out_dir(args.out)
    out = args.out / "density.json"
    if out.exists() and not args.force:
        raise QBHError(f"'{out}' exists; pass --force to overwrite it")
    model, task = stages.load_for_task(args.model, raw_task(args), max_length=args.max_length, device=args.device)
    stages.check_blocks(model, args.block)
    start(args)
    result = stages.density(model, task, args.block, config, model_name=args.model)
    if not args.world.is_main:
        return 0
    for d in result.densities:
        # The quadrature's first moment, (1/n) tr(H), averaged over the probes.
        mean = sum(sum(w * x for w, x in zip(ws, xs)) for xs, ws in zip(d["nodes"], d["weights"])) / len(d["nodes"])
        print(f"{d['block']}: mean eigenvalue (trace/n) {mean:.4g}")
    result.save(out)
    plot_density(result.densities, args.out / "density.png")
    print(f"density in {out} and {args.out / 'density.png'}")
    return 0
