"""Time of the allocator's cost table for one encoder layer: ``max`` ranges, the ``mse`` search, and the ``mse``
search as it was before (every ratio quantized, in blocks of 2**22 elements).

    PYTHONPATH=. python benchmarks/range_search.py --model minilm-l6 --layer encoder.0 --bits 2,3,4,8 --groups 128

For each width, ``measure_profile`` of the layer (its six matrices, one grouping), best of ``--repeat`` runs, in
wall and process-CPU seconds, as a markdown table. The last column checks that the two searches chose the same
ranges: the layer's ||Q(W) - W||^2 under each, as a ratio (1 exactly when every group's choice is the same).
On a machine shared with other work, compare CPU seconds with ``--threads 1``: with two OpenMP threads on two
busy cores, spin-waiting threads can multiply the wall time many times over.
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import torch

from qbert_hessian.models import load_model
from qbert_hessian.quant import ranges
from qbert_hessian.quant.profile import measure_profile

BEFORE_CHUNK = 2**22  # ranges.CHUNK_ELEMENTS before the faster search


def timed(fn, repeat: int):
    best_wall, best_cpu, out = float("inf"), float("inf"), None
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        best_wall, best_cpu = min(best_wall, time.perf_counter() - w0), min(best_cpu, time.process_time() - c0)
    return best_wall, best_cpu, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--layer", default="encoder.0")
    ap.add_argument("--groups", default="128")
    ap.add_argument("--bits", default="2,3,4,8")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--asymmetric", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    groups = int(args.groups) if args.groups.isdigit() else args.groups
    model, _ = load_model(args.model, num_labels=2)
    print(
        f"{args.model} {args.layer}, groups={groups}, symmetric={not args.asymmetric}, "
        f"{torch.get_num_threads()} threads, best of {args.repeat}; seconds wall / CPU"
    )
    print("| bits | max | mse | mse before | speed-up wall / CPU | error mse / before |")
    print("|---:|---:|---:|---:|---:|---:|")
    total = [0.0, 0.0, 0.0, 0.0]
    for b in map(int, args.bits.split(",")):

        def profile(method: str, b: int = b):
            units = measure_profile(
                model, [args.layer], bits=(b,), groups=(groups,), symmetric=not args.asymmetric, range_method=method
            ).units
            return units[args.layer].groups[str(groups)].error[str(b)]

        mx = timed(lambda: profile("max"), args.repeat)
        new = timed(lambda: profile("mse"), args.repeat)
        with (
            mock.patch.object(ranges, "search_ratios", ranges.search_ratios_dense),
            mock.patch.object(ranges, "CHUNK_ELEMENTS", BEFORE_CHUNK),
        ):
            old = timed(lambda: profile("mse"), args.repeat)
        total = [total[0] + new[0], total[1] + new[1], total[2] + old[0], total[3] + old[1]]
        print(
            f"| {b} | {mx[0]:.3f} / {mx[1]:.3f} | {new[0]:.3f} / {new[1]:.3f} | {old[0]:.3f} / {old[1]:.3f} | "
            f"{old[0] / new[0]:.1f}x / {old[1] / new[1]:.1f}x | {new[2] / old[2]:.9f} |",
            flush=True,
        )
    print(
        f"| all | | {total[0]:.3f} / {total[1]:.3f} | {total[2]:.3f} / {total[3]:.3f} | "
        f"{total[2] / total[0]:.1f}x / {total[3] / total[1]:.1f}x | |"
    )


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
