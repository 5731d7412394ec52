"""Benchmark: the same sensitivity draw on 1 process and on N processes under torchrun (data- and block-parallel).

Every setting is the command a user types, ``python -m qbert_hessian sensitivity``, launched in a fresh process
(or N of them with ``torchrun --nproc-per-node N -m qbert_hessian``). The script checks that every multi-process
setting gives the eigenvalues and traces of the single process to 1e-6 relative (exit status 1 if not) and
times each: the whole command, and the sensitivity compute alone (from the report: each block's seconds; in
block-parallel mode the blocks of a round run side by side, so a round costs its slowest block). Writes the
table, the exact commands, the machine and the date to ``--out`` (default benchmarks/SCALING.md).

    python benchmarks/scaling.py

runs the CPU default: MiniLM-L6 (alias minilm-l6) with an SST-2 head, 1 draw of 64 SST-2 training sentences in
batches of 32, blocks encoder.0 and encoder.5, on 1 process (2 threads) and on 2 gloo processes (1 thread each).
The head is trained first, briefly (512 sentences, 1 epoch), into benchmarks/.scaling/checkpoint, unless
``--model`` names a fine-tuned classifier already. SCALING.md lists the GPU commands (draw sizes 32 .. 6,720,
BERT-base, a projection of Q-BERT's protocol on 8 GPUs), which need a machine with GPUs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SST2 = REPO.parent / "shared" / "data" / "sst2"
QBERT_DRAW = 6735  # 10% of SST-2's 67,349 training sentences: one draw of Q-BERT's protocol
TORCHRUN = Path(sys.executable).with_name("torchrun")


def portable(text: str) -> str:
    """A command or path as anyone can rerun it: this machine's folders as paths relative to the repository."""
    for local, shown in (
        (str(TORCHRUN), "torchrun"),
        (sys.executable, "python"),
        (str(REPO.parent / "shared"), "../shared"),
        (str(REPO) + "/", ""),
    ):
        text = text.replace(local, shown)
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm-l6", help="a fine-tuned classifier folder, or minilm-l6 (trained first)")
    p.add_argument("--task", default="sst2")
    p.add_argument("--data", type=Path, default=SST2, help="folder with train.tsv and dev.tsv")
    p.add_argument("--examples", default="64", help="draw sizes in sentences, comma-separated (multiples of the batch)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--blocks", default="encoder.0,encoder.5")
    p.add_argument("--procs", default="2", help="process counts to compare with 1, comma-separated")
    p.add_argument("--modes", default="data,blocks", help="parallel modes to run: data, blocks")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--max-iters", type=int, default=100)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--trace-samples", type=int, default=4)
    p.add_argument("--finetune-samples", type=int, default=512, help="sentences for the head when --model is a base")
    p.add_argument("--work", type=Path, default=HERE / ".scaling", help="where the reports of every setting go")
    p.add_argument("--out", type=Path, default=HERE / "SCALING.md")
    return p.parse_args(argv)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    return env


def run(cmd: list[str], threads: int) -> float:
    """Run ``cmd`` to the end (its output shown only if it fails); its wall time in seconds."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=environment(threads), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {shlex.join(cmd)}\n{proc.stderr[-4000:]}")
    return seconds


def classifier(args: argparse.Namespace) -> str:
    """``--model`` if it is a fine-tuned classifier, else a brief fine-tune of it (cached under ``--work``)."""
    from qbert_hessian.models import is_classifier

    if is_classifier(args.model, "classification"):
        return args.model
    out = args.work / "checkpoint"
    if not (out / "metrics.json").exists():
        cmd = [sys.executable, "-m", "qbert_hessian", "finetune", "--model", args.model, "--task", args.task]
        cmd += ["--data", str(args.data), "--max-train-samples", str(args.finetune_samples), "--epochs", "1"]
        cmd += ["--max-length", str(args.max_length), "--device", args.device, "--quiet", "--out", str(out)]
        print(f"training a head first: {shlex.join(cmd)}", flush=True)
        run(cmd, cores())
    return str(out)


def sensitivity_cmd(args: argparse.Namespace, model: str, examples: int, out: Path) -> list[str]:
    cmd = ["-m", "qbert_hessian", "sensitivity", "--model", model, "--task", args.task, "--data", str(args.data)]
    cmd += ["--draws", "1", "--batch-size", str(args.batch_size)]
    cmd += ["--batches-per-draw", str(examples // args.batch_size), "--blocks", args.blocks]
    cmd += ["--max-length", str(args.max_length), "--max-iters", str(args.max_iters), "--tol", str(args.tol)]
    cmd += ["--trace-samples", str(args.trace_samples), "--device", args.device, "--quiet", "--force"]
    return [*cmd, "--out", str(out)]


def compute_wall(report: dict, procs: int, mode: str | None) -> float:
    """Seconds of sensitivity compute: the blocks one after the other, or rounds of ``procs`` blocks side by side."""
    seconds = [b["seconds"] for b in report["blocks"]]
    if mode != "blocks":
        return sum(seconds)
    return sum(max(seconds[i : i + procs]) for i in range(0, len(seconds), procs))


def max_rel_diff(a: dict, b: dict) -> float:
    """Largest relative difference of the per-draw eigenvalues and the trace means of two reports."""
    worst = 0.0
    for x, y in zip(a["blocks"], b["blocks"], strict=True):
        assert x["name"] == y["name"]
        pairs = list(zip(x["eigenvalues"], y["eigenvalues"], strict=True))
        if x.get("trace") and y.get("trace"):
            pairs.append((x["trace"]["mean"], y["trace"]["mean"]))
        worst = max([worst, *(abs(p - q) / max(abs(p), 1e-30) for p, q in pairs)])
    return worst


def settings(args: argparse.Namespace, examples: int) -> list[tuple[int, str | None, int, str]]:
    """``(processes, mode, threads per process, why skipped or '')``: one process with every core (and, on a CPU
    with several, with one thread, the cost of one core), then each process count in each mode, the cores
    shared out."""
    batches, blocks = examples // args.batch_size, len(args.blocks.split(","))
    out: list[tuple[int, str | None, int, str]] = [(1, None, cores(), "")]
    if args.device == "cpu" and cores() > 1:
        out.append((1, None, 1, ""))
    for n in (int(p) for p in args.procs.split(",")):
        for mode in args.modes.split(","):
            need = batches if mode == "data" else blocks
            what = "batches in the draw" if mode == "data" else "blocks"
            out.append((n, mode, max(1, cores() // n), "" if need >= n else f"{need} {what} for {n} processes"))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [int(s) for s in args.examples.split(",")]
    bad = [s for s in sizes if s % args.batch_size or s <= 0]
    if bad:
        sys.exit(f"--examples {bad} are not positive multiples of --batch-size {args.batch_size}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    model = classifier(args)
    rows, commands, failures, layers = [], [], 0, 0
    for examples in sizes:
        single: dict[int, dict] = {}  # one process's report per thread count
        for procs, mode, threads, skipped in settings(args, examples):
            name = f"{examples}-{procs}x{threads}" + (f"-{mode}" if mode else "")
            if skipped:
                rows.append((examples, procs, mode, threads, None, None, None, skipped))
                continue
            out = args.work / name
            cmd = sensitivity_cmd(args, model, examples, out)
            if procs == 1:
                cmd = [sys.executable, *cmd]
            else:
                launch = [str(TORCHRUN), "--nproc-per-node", str(procs), "--master-port", str(free_port())]
                cmd = [*launch, *cmd, "--parallel", mode]
            print(f"{name}: {shlex.join(cmd)}", flush=True)
            wall = run(cmd, threads)
            report = json.loads((out / "sensitivity.json").read_text())
            layers = report["model"]["num_layers"]
            compute = compute_wall(report, procs, mode)
            if procs == 1:
                # One process against the first (every core): BLAS sums in another order with fewer threads, so
                # this is the floating-point spread of the single-process number itself, reported, not checked.
                single.setdefault(threads, report)
                diff = max_rel_diff(next(iter(single.values())), report)
            else:
                # N processes against one process with the same threads per process: the distributed operator
                # must be the single-process one.
                diff = max_rel_diff(single.get(threads, next(iter(single.values()))), report)
                failures += diff > 1e-6
            rows.append((examples, procs, mode, threads, wall, compute, diff, ""))
            commands.append((name, threads, cmd))
            print(f"  {wall:.1f} s wall, {compute:.1f} s compute, max relative difference {diff:.1e}", flush=True)
    write_markdown(args, argv, rows, commands, load, model, layers)
    print(f"wrote {args.out}")
    return 1 if failures else 0


def write_markdown(args, argv, rows, commands, load: float, model: str, layers: int) -> None:
    import torch

    from qbert_hessian.artifacts import write_text

    given = shlex.join(["python", "benchmarks/scaling.py", *(sys.argv[1:] if argv is None else argv)])
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    lines = [
        "# Scaling: one sensitivity draw on 1 process vs N processes (torch.distributed)",
        "",
        f"Command: `{given}` (on {datetime.date.today().isoformat()}).",
        "",
        f"Machine: {platform.machine()}, {cores()} CPU cores, {device}; torch {torch.__version__}, Python "
        f"{platform.python_version()}; load average {load:.2f} when the benchmark started.",
        f"Model: `{portable(str(model))}` (from `{args.model}`); task {args.task} (`{portable(str(args.data))}`), "
        f"max length {args.max_length}. "
        f"One draw in batches of {args.batch_size}; blocks {args.blocks}; Lanczos, tol {args.tol}, at most "
        f"{args.max_iters} products; Hutchinson trace, {args.trace_samples} probes.",
        "",
        "| draw (sentences) | processes | mode | threads / process | command wall | sensitivity compute | "
        "speed-up (compute) | max rel. difference |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    base: dict[int, float] = {}
    for examples, procs, mode, threads, wall, compute, diff, skipped in rows:
        if skipped:
            lines.append(f"| {examples} | {procs} | {mode} | {threads} | - | - | - | skipped: {skipped} |")
            continue
        base.setdefault(examples, compute)
        speed = base[examples] / compute if compute else float("nan")
        lines.append(
            f"| {examples} | {procs} | {mode or 'one process'} | {threads} | {wall:.1f} s | {compute:.1f} s | "
            f"{speed:.2f}x | {diff:.1e} |"
        )
    lines += [
        "",
        "Command wall: the whole command (start-up, model and data loading, the report's files). Sensitivity "
        "compute: the blocks' seconds from the report; in block-parallel mode a round of blocks running side by "
        "side costs its slowest block. Speed-up: against the first row (one process, every core). Max rel. "
        "difference, over every eigenvalue and trace of the same draw: for N processes, against one process "
        "with the same threads per process (the benchmark fails above 1e-6); for one process with fewer "
        "threads, against the first row (BLAS sums in another order: the spread of the one-process number "
        "itself, not checked).",
        "",
        *projection(rows, args, layers),
        "The commands, as run (environment: `OMP_NUM_THREADS` = threads / process, `PYTHONPATH` = the repository):",
        "",
        *[f"- {name}: `{portable(shlex.join(cmd))}`" for name, _, cmd in commands],
        "",
        *GPU_SECTION,
    ]
    write_text(args.out, "\n".join(lines) + "\n")


def projection(rows, args, layers: int) -> list[str]:
    """Q-BERT's protocol (10 draws, the embeddings and every layer) extrapolated from the largest draw measured
    on the most processes in data mode."""
    data = [r for r in rows if r[2] == "data" and r[5] is not None] or [r for r in rows if r[5] is not None]
    if not data:
        return []
    examples, procs, _, _, _, compute, _, _ = max(data, key=lambda r: (r[0], r[1]))
    blocks = len(args.blocks.split(","))
    per_block = compute / blocks * QBERT_DRAW / examples
    return [
        f"Projection (linear in draw size, an extrapolation, not a measurement): one block on one Q-BERT draw "
        f"({QBERT_DRAW:,} sentences, 10% of SST-2) would take {per_block:.0f} s on {procs} process(es) here; "
        f"Q-BERT's protocol for this {layers}-layer model ({layers + 1} blocks x 10 draws) "
        f"{per_block * (layers + 1) * 10 / 3600:.1f} h.",
        "",
    ]


GPU_SECTION = [
    "## GPU measurements: not run",
    "",
    "No GPU was available when this file was written, so none of the following was measured. On a machine with",
    "8 GPUs (and a fine-tuned checkpoint, e.g. from `qbert-hessian finetune --model minilm-l6 --task sst2 ...`):",
    "",
    "- one-draw cost against draw size, 32 to 6,720 sentences, 1 vs 8 GPUs:",
    "  `python benchmarks/scaling.py --device cuda --model runs/sst2/checkpoint --procs 8 --modes data "
    "--examples 32,320,3200,6720 --out benchmarks/SCALING_GPU.md`",
    "- a BERT-base-sized block (a BERT-base fine-tuned on SST-2, read from a local folder), cost per block:",
    "  `python benchmarks/scaling.py --device cuda --model runs/sst2-bert-base/checkpoint --blocks encoder.0,encoder.11 "
    "--procs 2,8 --examples 256,2560 --max-length 128 --out benchmarks/SCALING_BERT_BASE.md`",
    "- the projected Q-BERT protocol on 8 GPUs (10 draws of 10% of SST-2, every block) is the projection line of",
    "  the first command's file; the protocol itself, as a user runs it:",
    "  `torchrun --nproc-per-node 8 -m qbert_hessian sensitivity --model runs/sst2/checkpoint --task sst2 --data "
    "../shared/data/sst2 --draw-fraction 0.1 --batch-size 32 --device cuda --out runs/sst2/sensitivity-qbert`",
]


if __name__ == "__main__":
    sys.exit(main())
