"""Write one run's section of experiments/RESULTS.md from its folder (its JSON artifacts only).

python experiments/write_results.py runs/sst2_minilm --config experiments/sst2_minilm.toml --wall "41 min"

Each experiment owns the section between ``<!-- begin NAME -->`` and ``<!-- end NAME -->`` (NAME: the config's
stem); rewriting one leaves the others as they are.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
from pathlib import Path

import numpy as np
import torch

from qbert_hessian.artifacts import METRIC_COLUMNS, RunRecord, write_text
from qbert_hessian.report import results_rows, results_table

RESULTS = Path(__file__).with_name("RESULTS.md")
TITLE = (
    "# Experiments: measured\n\nEach section below is written by the command it names, from a run folder's "
    "artifacts (table1: from the sections).\n"
)


def replace_section(path: Path, name: str, text: str, top: bool = False) -> None:
    """Put ``text`` between the markers of section ``name`` in ``path``. A new section is appended, or with
    ``top`` put before the first section (after the file's title and intro; appended when there is none)."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    old = path.read_text() if path.exists() else TITLE
    block = f"{begin}\n{text.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    first = re.search(r"^<!-- begin \S+ -->$", old, re.M)
    if pattern.search(old):
        new = pattern.sub(lambda _: block, old)
    elif top and first:
        new = old[: first.start()] + block + "\n\n" + old[first.start() :]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    write_text(path, new)


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, {gpu}"


def seed_groups(run: Path, rows: list[dict]) -> list[str]:
    """The QAT rows grouped by plan settings apart from name and seed (the same recipe at several seeds), each
    group's mean and sample standard deviation of the family's scores: the table that tells a difference from
    seed-to-seed noise. Empty when no two plans differ by their seed alone."""
    specs = {p["name"]: p for p in RunRecord.load(run / "run.json").config["plans"]}
    qat = [r for r in rows if r["method"].startswith("QAT")]
    if not qat:
        return []
    family = qat[0]["family"]
    columns = METRIC_COLUMNS[family][:2]
    groups: dict[str, list[dict]] = {}
    for r in qat:
        key = json.dumps({k: v for k, v in specs[r["plan"]].items() if k not in ("name", "seed")}, sort_keys=True)
        groups.setdefault(key, []).append(r)
    if all(len(g) == 1 for g in groups.values()):
        return []
    lines = [
        "Seed-to-seed spread: QAT rows with the same settings apart from the seed, grouped (sample standard "
        "deviation over the seeds; one group per recipe):",
        "",
        "| method | plans | seeds | " + " | ".join(f"{c} mean ± std" for c in columns) + " | values |",
        "|---|---|---|" + "---|" * len(columns) + "---|",
    ]
    for members in groups.values():
        cells = []
        for c in columns:
            v = np.asarray([m[c] for m in members], dtype=float)
            cells.append(f"{v.mean():.4f} ± {v.std(ddof=1):.4f}" if len(v) > 1 else f"{v.mean():.4f}")
        values = ", ".join(f"{m[columns[0]]:.4f}" for m in members)
        seeds = ", ".join(str(m["seed"]) for m in members)
        plans = ", ".join(m["plan"] for m in members)
        lines.append(f"| {members[0]['method']} | {plans} | {seeds} | " + " | ".join(cells) + f" | {values} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--wall", default=None, help="total wall time of the run command, as measured")
    ap.add_argument("--note", default=None, help="one paragraph on what was shortened or shared")
    args = ap.parse_args()

    run = args.run
    rows = results_rows(run)
    ft = json.loads((run / "checkpoint" / "metrics.json").read_text()) if (run / "checkpoint").exists() else None
    sens = json.loads((run / "sensitivity" / "sensitivity.json").read_text())
    times = []
    if ft:
        epochs = ft["config"]["epochs"]
        times.append(
            f"fine-tune FP32 baseline: {ft['train_seconds']:.0f} s ({ft['train_examples']:,} training examples, "
            f"{epochs:g} epoch{'s' if epochs != 1 else ''})"
        )
    times.append(
        f"sensitivity ({len(sens['blocks'])} blocks x {sens['config']['draws']} draws): {sens['seconds']:.0f} s"
    )
    for res in sorted((run / "results").glob("*/qat.json")):
        q = json.loads(res.read_text())
        times.append(f"QAT {res.parent.name}: {q['train_seconds']:.0f} s ({q['steps']} steps)")
    name = args.config.stem
    spread = seed_groups(run, rows)
    lines = [
        f"## {name}",
        "",
        f"Command: `qbert-hessian run {args.config}` (folder `{run}`); this section: "
        f"`python experiments/write_results.py {run} --config {args.config}`.",
        f"Machine: {machine()}." + (f" Total wall time: {args.wall}." if args.wall else ""),
        "",
        *([args.note, ""] if args.note else []),
        results_table(rows),
        "",
        *([*spread, ""] if spread else []),
        "Wall times: " + "; ".join(times) + ".",
        "",
        f"The plans are in `{run}/plans/*.md`; the per-plan metrics, QAT logs and packed checkpoints in "
        f"`{run}/results/<plan>/`; the whole report in `{run}/report.md`.",
    ]
    replace_section(args.out, name, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
