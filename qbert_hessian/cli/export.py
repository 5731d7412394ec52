"""``qbert-hessian export``: a packed checkpoint for deployment, as ONNX (ONNX Runtime's 2/4/8-bit kernels) or
compressed-tensors."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..allocate import MIB
from ..errors import QBHError
from .common import add_common, check_not_link

DISTRIBUTED = False  # light: runs in one process only


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export",
        help="a packed checkpoint for deployment: ONNX Runtime (2/4/8-bit kernels) or compressed-tensors",
        description="Export a packed checkpoint. Example: qbert-hessian export runs/sst2/packed --format onnx "
        "--out runs/sst2/deploy (needs pip install 'qbert_hessian[deploy]')",
    )
    p.add_argument("packed", type=Path, help="packed checkpoint folder (from qbert-hessian quantize)")
    p.add_argument(
        "--format",
        choices=["onnx", "compressed-tensors"],
        required=True,
        help="onnx: onnx/model.onnx with MatMulNBits int8 kernels; compressed-tensors: loads with from_pretrained",
    )
    p.add_argument("--out", type=Path, required=True, help="folder to write (Hugging Face layout)")
    p.add_argument(
        "--exact",
        action="store_true",
        help="onnx: float32 compute with the plan's own activation ranges (static as Q/DQ, or per token)",
    )
    p.add_argument("--force", action="store_true", help="replace an earlier export in OUT")
    add_common(p, device=False)
    return p


def run(args: argparse.Namespace) -> int:
    from ..deploy.output import check_out, check_source, require

    if args.exact and args.format != "onnx":
        raise QBHError("--exact applies to --format onnx; drop it")
    require(*(("onnx", "onnxruntime") if args.format == "onnx" else ("compressed_tensors",)))
    check_not_link(args.out)
    check_source(args.packed)
    check_out(args.out, force=args.force)
    if args.format == "onnx":
        from ..deploy.onnx import export_onnx

        path = export_onnx(args.packed, args.out, exact=args.exact, force=args.force)
    else:
        from ..deploy.compressed import export_compressed_tensors

        path = export_compressed_tensors(args.packed, args.out, force=args.force)
    print(f"{args.format} export {path}: {path.stat().st_size / MIB:.3f} MiB")
    return 0
