"""Where a block's Hessian-vector product spends its time, on one padding-free BBC News batch.

    python benchmarks/product_profile.py --model runs/bbc/checkpoint

For every block of the protocol (embeddings, each encoder layer), on one batch of 16 articles at max length
128 (no padding):

- **graph**: seconds to build the block's graph (forward + create-graph backward), as the engine does per
  block and draw; and, once, the graph of every block's parameters together (what one graph per draw shared by
  all blocks would cost instead of their sum);
- **product**: milliseconds per product three ways, interleaved so that drift in the machine's speed hits them
  alike (both graphs alive): a bare ``autograd.grad`` double backward with HF's eager attention and PyTorch's
  GELU (what PyHessian does), :class:`BlockHessian` with the same kernels, and :class:`BlockHessian` under
  :func:`~qbert_hessian.models.curvature_kernels` (the engine's default since this script was written).

Then one product of ``encoder.0`` (whose gradient runs through every layer), taken apart:

- **by operation**: every aten operation of the product timed on its own (a ``TorchDispatchMode``; CPU
  operations are synchronous), matrix products apart from the rest, with their FLOPs (PyTorch's
  ``FlopCounterMode``) and the rate they ran at, beside one lone (2048 x 384) @ (384 x 1536) product's rate (what
  this machine's BLAS does at best on these shapes) and the matrix-product FLOPs of one forward pass;
- **page faults**: minor faults and milliseconds per product with the system allocator's defaults and inside
  :func:`~qbert_hessian.hessian.memory.reuse_freed_memory` (the engine's default), each in a fresh process
  (a long-lived heap, like this one's after the table above, hides the faults a run starts with).

Writes benchmarks/PRODUCTS.md (command, machine, tables). It times: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
import resource
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from transformers import DataCollatorWithPadding

from qbert_hessian.artifacts import write_text
from qbert_hessian.hessian import vec
from qbert_hessian.hessian.hvp import BlockHessian, curvature_mode, grads_enabled
from qbert_hessian.hessian.memory import reuse_freed_memory
from qbert_hessian.models import BlockMap, curvature_kernels, eager_attention, load_model
from qbert_hessian.tasks import load_raw_task, tokenize_task

HERE = Path(__file__).resolve().parent


def interleaved_seconds(calls: list[Callable[[], object]], repeats: int) -> list[float]:
    """Mean seconds per call of each, after one warm-up each, the calls interleaved."""
    for call in calls:
        call()
    seconds = [0.0] * len(calls)
    for _ in range(repeats):
        for i, call in enumerate(calls):
            start = time.perf_counter()
            call()
            seconds[i] += time.perf_counter() - start
    return [s / repeats for s in seconds]


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


MATMULS = {"mm", "bmm", "addmm", "baddbmm", "matmul"}


class OpClock(TorchDispatchMode):
    """Seconds spent in every aten operation run under it, by operation name (CPU operations are synchronous,
    so the wall time around each call is its cost)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[str, float] = defaultdict(float)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.seconds[func.overloadpacket.__name__] += time.perf_counter() - start
        return out


def load(model_path: str) -> tuple[torch.nn.Module, dict]:
    """The model and the first 16 BBC News training articles at max length 128, as one batch."""
    torch.manual_seed(0)
    model, tok = load_model(model_path)
    task = tokenize_task(load_raw_task("bbc-news"), tok, max_length=128)
    return model, dict(DataCollatorWithPadding(tok)([task.train[i] for i in range(16)]))


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def fault_probe(model_path: str, mode: str, repeats: int) -> None:
    """Child process: minor page faults and seconds per product of encoder.0, in a process whose allocator has
    not been retuned before (``mode`` "on": inside reuse_freed_memory)."""
    model, batch = load(model_path)
    params = BlockMap(model).parameters("encoder.0")
    with curvature_mode(model), curvature_kernels(model), grads_enabled(params):
        v = vec.randn_like(params, torch.Generator().manual_seed(0))
        with reuse_freed_memory(mode == "on"):
            hvp = BlockHessian(model, params, [batch])
            hvp(v)  # warm-up: the first product takes its pages from the kernel in either mode
            f0, t0 = minor_faults(), time.perf_counter()
            for _ in range(repeats):
                hvp(v)
            seconds = (time.perf_counter() - t0) / repeats
            faults = (minor_faults() - f0) / repeats
    print(json.dumps({"faults": faults, "seconds": seconds}))


def faults_in_fresh_process(model_path: str, mode: str, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--model", model_path, "--repeats", str(repeats), "--fault-probe", mode]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def product_anatomy(model, block_map, batch, args) -> list[str]:
    """One product of encoder.0 by operation, and its page faults with and without reuse_freed_memory (each in a
    fresh process: this one's heap has been shaped by everything above)."""
    params = block_map.parameters("encoder.0")
    with curvature_mode(model), curvature_kernels(model), grads_enabled(params):
        v = vec.randn_like(params, torch.Generator().manual_seed(0))
        hvp = BlockHessian(model, params, [batch])
        hvp(v)
        clock = OpClock()
        with FlopCounterMode(display=False) as counter, clock:
            t0 = time.perf_counter()
            hvp(v)
            total = time.perf_counter() - t0
        hvp.free()
        with torch.no_grad(), FlopCounterMode(display=False) as forward:
            model(**batch)
    a, b = torch.randn(2048, 384), torch.randn(384, 1536)
    lone = min(timed(lambda: a @ b)[0] for _ in range(20))
    off, on = (faults_in_fresh_process(args.model, mode, args.repeats) for mode in ("off", "on"))
    flops = counter.get_total_flops()
    mm = sum(t for op, t in clock.seconds.items() if op in MATMULS)
    ops = sum(clock.seconds.values())
    top = sorted(((t, op) for op, t in clock.seconds.items() if op not in MATMULS), reverse=True)[:4]
    rest = ops - mm - sum(t for t, _ in top)
    return [
        "## One product of encoder.0, taken apart",
        "",
        f"Its gradient runs through all {model.config.num_hidden_layers} layers. Every aten operation timed on its "
        f"own (sum {ops * 1e3:.0f} ms; the product took {total * 1e3:.0f} ms):",
        "",
        "| | ms | share |",
        "|---|---:|---:|",
        f"| matrix products (mm, bmm) | {mm * 1e3:.0f} | {mm / ops:.0%} |",
        *(f"| {op} | {t * 1e3:.0f} | {t / ops:.0%} |" for t, op in top),
        f"| everything else | {rest * 1e3:.0f} | {rest / ops:.0%} |",
        "",
        f"The matrix products do {flops / 1e9:.1f} GFLOP, {flops / forward.get_total_flops():.2f} times the matrix "
        f"work of one forward pass of the model on the batch, at {flops / mm / 1e9:.0f} GFLOP/s; a lone "
        f"(2048 x 384) @ (384 x 1536) product runs at {2 * 2048 * 384 * 1536 / lone / 1e9:.0f} GFLOP/s here.",
        "",
        "Page faults, each mode in a fresh process (graph built, one warm-up product, then "
        f"{args.repeats} products): {off['faults']:,.0f} minor faults and {off['seconds'] * 1e3:.0f} ms per product "
        f"with the system allocator's defaults; {on['faults']:,.0f} and {on['seconds'] * 1e3:.0f} ms inside "
        "`reuse_freed_memory` (the engine's default).",
        "",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a BBC News fine-tune (make bench's runs/bbc/checkpoint)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(HERE / "PRODUCTS.md"))
    ap.add_argument("--fault-probe", choices=["on", "off"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fault_probe:
        return fault_probe(args.model, args.fault_probe, args.repeats)
    model, batch = load(args.model)
    padding = 1 - batch["attention_mask"].float().mean().item()
    block_map = BlockMap(model)
    names = block_map.expand(None)
    rows, own_builds = [], 0.0
    with curvature_mode(model):
        everything = [p for n in names for p in block_map.parameters(n)]
        with eager_attention(model), grads_enabled(everything):
            BlockHessian(model, everything, [batch]).free()  # warm-up
            shared_build, shared = timed(lambda: BlockHessian(model, everything, [batch]))
            shared.free()
        for name in names:
            params = block_map.parameters(name)
            with grads_enabled(params):
                with eager_attention(model):
                    build, stock = timed(lambda params=params: BlockHessian(model, params, [batch]))
                    grads = torch.autograd.grad(model(**batch).loss, params, create_graph=True)
                with curvature_kernels(model):
                    ours = BlockHessian(model, params, [batch])
                v = vec.randn_like(params, torch.Generator().manual_seed(0))
                bare = functools.partial(torch.autograd.grad, grads, params, grad_outputs=v, retain_graph=True)
                diff = vec.flatten(ours(v)).sub(vec.flatten(stock(v))).norm() / vec.flatten(stock(v)).norm()
                times = interleaved_seconds(
                    [bare, functools.partial(stock, v), functools.partial(ours, v)], args.repeats
                )
                stock.free()
                ours.free()
                del grads
            own_builds += build
            rows.append((name, build, *times, float(diff)))
            print(name, [f"{t * 1e3:.0f} ms" for t in times], file=sys.stderr)

    lines = [
        "# Where a Hessian-vector product spends its time",
        "",
        f"Command: `python benchmarks/product_profile.py --model {args.model} --repeats {args.repeats}`",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}; {datetime.date.today().isoformat()}. One BBC News batch of "
        f"{tuple(batch['input_ids'].shape)} tokens, {padding:.0%} padding, model `{args.model}`.",
        "",
        "| block | graph (s) | bare double backward (ms) | BlockHessian, PyTorch kernels (ms) | "
        "BlockHessian, curvature kernels (ms) | kernels' speed-up over bare | rel. difference of the products |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, build, bare, stock, ours, diff in rows:
        lines.append(
            f"| {name} | {build:.2f} | {bare * 1e3:.0f} | {stock * 1e3:.0f} | {ours * 1e3:.0f} | "
            f"{bare / ours:.2f}x | {diff:.1e} |"
        )
    total = [sum(r[i] for r in rows) for i in (2, 3, 4)]
    lines += [
        f"| all blocks, one product each | {own_builds:.2f} | {total[0] * 1e3:.0f} | {total[1] * 1e3:.0f} | "
        f"{total[2] * 1e3:.0f} | {total[0] / total[2]:.2f}x | |",
        "",
        f"One graph over every block's parameters together: {shared_build:.2f} s, against {own_builds:.2f} s for "
        "the blocks' own graphs (built once per block and draw by the engine).",
        "",
    ]
    lines += product_anatomy(model, block_map, batch, args)
    write_text(args.out, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
