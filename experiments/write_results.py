"""Write experiments/RESULTS.md from a finished run folder (its JSON artifacts only).

python experiments/write_results.py runs/sst2_minilm --config experiments/sst2_minilm.toml
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from qbert_hessian.artifacts import write_text
from qbert_hessian.report import results_rows, results_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    ap.add_argument("--wall", default=None, help="total wall time of the run command, as measured")
    args = ap.parse_args()

    run = args.run
    rows = results_rows(run)
    ft = json.loads((run / "checkpoint" / "metrics.json").read_text()) if (run / "checkpoint").exists() else None
    sens = json.loads((run / "sensitivity" / "sensitivity.json").read_text())
    times = []
    if ft:
        times.append(f"fine-tune FP32 baseline: {ft['train_seconds']:.0f} s ({ft['train_examples']} sentences)")
    times.append(f"sensitivity (7 blocks x {sens['config']['draws']} draws): {sens['seconds']:.0f} s")
    for res in sorted((run / "results").glob("*/qat.json")):
        q = json.loads(res.read_text())
        times.append(f"QAT {res.parent.name}: {q['train_seconds']:.0f} s ({q['steps']} steps)")
    lines = [
        f"# {args.config.stem}: measured",
        "",
        f"Command: `qbert-hessian run {args.config}` (folder `{run}`); this file: "
        f"`python experiments/write_results.py {run} --config {args.config}`.",
        f"Machine: {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, no GPU."
        + (f" Total wall time: {args.wall}." if args.wall else ""),
        "",
        results_table(rows),
        "",
        "Wall times: " + "; ".join(times) + ".",
        "",
        f"The plans are in `{run}/plans/*.md`; the per-plan metrics, QAT logs and packed checkpoints in "
        f"`{run}/results/<plan>/`.",
    ]
    write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
