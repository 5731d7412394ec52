"""Q-BERT's saddle test across tasks: the sign of each block's top Hessian eigenvalue, draw by draw.

python experiments/saddle.py SST-2=runs/sst2_minilm CoNLL-03=runs/conll03_minilm SQuAD=runs/squad_minilm

Each argument is LABEL=FOLDER, where FOLDER is a run folder (its ``sensitivity/sensitivity.json``) or a
sensitivity output folder; the reports should hold ``most_negative`` (``[sensitivity] most_negative = true``).
Writes ``experiments/saddle.png`` and the section ``saddle`` of experiments/RESULTS.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from write_results import RESULTS, machine, replace_section

from qbert_hessian.artifacts import SensitivityReport
from qbert_hessian.errors import QBHError
from qbert_hessian.report import curvature_sign_rows, curvature_sign_table, plot_curvature_signs


def _report(folder: Path) -> SensitivityReport:
    for path in (folder / "sensitivity" / "sensitivity.json", folder / "sensitivity.json"):
        if path.exists():
            return SensitivityReport.load(path)
    raise QBHError(f"no sensitivity.json in '{folder}' or '{folder}/sensitivity'; pass a run or sensitivity folder")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="LABEL=FOLDER")
    ap.add_argument("--figure", type=Path, default=Path(__file__).with_name("saddle.png"))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    labels, reports = [], []
    for item in args.runs:
        label, sep, folder = item.partition("=")
        if not sep:
            raise SystemExit(f"'{item}' is not LABEL=FOLDER")
        labels.append(label)
        reports.append(_report(Path(folder)))
    plot_curvature_signs(reports, labels, args.figure)
    rows = curvature_sign_rows(reports, labels)
    settings = "; ".join(
        f"{label}: {r.config['draws']} draws of {r.config['batch_size']} examples, max length "
        f"{r.config.get('max_length')}, {r.model.get('name')}"
        for label, r in zip(labels, reports)
    )
    lines = [
        "## saddle: the sign of the top Hessian eigenvalue per block, three tasks",
        "",
        f"Command: `python experiments/saddle.py {' '.join(args.runs)}`. Machine: {machine()}.",
        f"Draws: {settings}.",
        "",
        f"![curvature signs]({args.figure.name})",
        "",
        curvature_sign_table(rows),
    ]
    replace_section(args.out, "saddle", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
