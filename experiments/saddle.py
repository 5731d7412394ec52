"""Q-BERT's saddle test across tasks: the sign of each block's top Hessian eigenvalue, draw by draw.

python experiments/saddle.py SST-2=runs/sst2_minilm CoNLL-03=runs/conll03_minilm SQuAD=runs/squad_minilm \
    --landscape SQuAD=runs/landscapes/squad/encoder.1 --landscape SST-2=runs/landscapes/sst2/encoder.5

Each argument is LABEL=FOLDER, where FOLDER is a run folder (its ``sensitivity/sensitivity.json``) or a
sensitivity output folder; the reports should hold ``most_negative`` (``[sensitivity] most_negative = true``).
Each ``--landscape LABEL=FOLDER`` is a ``qbert-hessian landscape --directions extreme`` output (a folder holding
``landscape.json``): the plane of a block's largest and most negative eigenvectors, drawn side by side in
``experiments/saddle_landscapes.png`` with a table of the curvature along each axis.
Writes ``experiments/saddle.png`` and the section ``saddle`` of experiments/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from write_results import RESULTS, machine, replace_section

from qbert_hessian.artifacts import SensitivityReport
from qbert_hessian.errors import QBHError
from qbert_hessian.report import curvature_sign_rows, curvature_sign_table, plot_curvature_signs, plot_landscapes


def _report(folder: Path) -> SensitivityReport:
    for path in (folder / "sensitivity" / "sensitivity.json", folder / "sensitivity.json"):
        if path.exists():
            return SensitivityReport.load(path)
    raise QBHError(f"no sensitivity.json in '{folder}' or '{folder}/sensitivity'; pass a run or sensitivity folder")


def _pairs(items: list[str]) -> list[tuple[str, Path]]:
    out = []
    for item in items:
        label, sep, folder = item.partition("=")
        if not sep:
            raise QBHError(f"'{item}' is not LABEL=FOLDER; write e.g. SQuAD=runs/squad_minilm")
        out.append((label, Path(folder)))
    return out


def _landscape(folder: Path) -> dict:
    path = folder / "landscape.json" if folder.is_dir() else folder
    if not path.exists():
        raise QBHError(f"no landscape.json in '{folder}'; pass a qbert-hessian landscape output folder of one block")
    ls = json.loads(path.read_text())
    if ls["directions"].get("kind") != "extreme" or len(ls["betas"]) < 3:
        raise QBHError(f"'{path}' is not a 2-D landscape with --directions extreme; rerun it with those settings")
    return ls


def _axis_differences(ls: dict) -> tuple[float, float, float, float]:
    """The loss's slope (central first difference) and curvature (second difference) through the centre along
    each axis, at the grid's step: ``(slope_1, curvature_1, slope_2, curvature_2)``."""
    z = np.asarray(ls["loss"], dtype=float)
    j, i = len(ls["betas"]) // 2, len(ls["alphas"]) // 2
    ha = ls["alphas"][i + 1] - ls["alphas"][i]
    hb = ls["betas"][j + 1] - ls["betas"][j]
    return (
        float((z[j, i + 1] - z[j, i - 1]) / (2 * ha)),
        float((z[j, i - 1] - 2 * z[j, i] + z[j, i + 1]) / ha**2),
        float((z[j + 1, i] - z[j - 1, i]) / (2 * hb)),
        float((z[j - 1, i] - 2 * z[j, i] + z[j + 1, i]) / hb**2),
    )


def landscape_lines(pairs: list[tuple[str, Path]], figure: Path) -> list[str]:
    surfaces = [_landscape(folder) for _, folder in pairs]
    titles = [f"{label}: {ls['block']}" for (label, _), ls in zip(pairs, surfaces)]
    plot_landscapes(surfaces, figure, titles=titles)
    lines = [
        "",
        "The plane of the largest and the most negative eigenvector of a block (`qbert-hessian landscape "
        "--directions extreme`, the Ritz vectors of one Lanczos run on the landscape's own fixed training "
        "batches, "
        + ", ".join(
            f"{label}: {ls['config']['num_batches']} x {ls['config']['batch_size']}, {ls['config']['grid']}^2 points"
            for (label, _), ls in zip(pairs, surfaces)
        )
        + "): at a saddle the loss rises along the first axis and falls along the second. The second difference "
        "of the loss through the centre (at the grid's step) checks each eigenvalue against the surface itself; "
        "where the step is large against the curvature's scale, higher-order terms show in it.",
        "",
        f"![saddle landscapes]({figure.name})",
        "",
        "| task | block | lambda max | lambda min | min / max | axis 1: slope, curvature | axis 2: slope, "
        "curvature | loss range on the plane | radius |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (label, _), ls in zip(pairs, surfaces):
        top, bottom = ls["directions"]["eigenvalues"]
        s1, c1, s2, c2 = _axis_differences(ls)
        z = np.asarray(ls["loss"], dtype=float)
        lines.append(
            f"| {label} | {ls['block']} | {top:.3g} | {bottom:.3g} | {bottom / top:.2f} | {s1:.3g}, {c1:.3g} | "
            f"{s2:.3g}, {c2:.3g} | {z.min():.3f} to {z.max():.3f} (centre {ls['center_loss']:.3f}) | "
            f"{ls['alphas'][-1]:g} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="LABEL=FOLDER")
    ap.add_argument("--landscape", action="append", default=[], help="LABEL=FOLDER of an extreme-directions landscape")
    ap.add_argument("--figure", type=Path, default=Path(__file__).with_name("saddle.png"))
    ap.add_argument("--landscape-figure", type=Path, default=Path(__file__).with_name("saddle_landscapes.png"))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    labels = [label for label, _ in _pairs(args.runs)]
    reports = [_report(folder) for _, folder in _pairs(args.runs)]
    for _, folder in _pairs(args.landscape):  # every input checked before anything is written
        _landscape(folder)
    plot_curvature_signs(reports, labels, args.figure)
    rows = curvature_sign_rows(reports, labels)
    settings = "; ".join(
        f"{label}: {r.config['draws']} draws of {r.config['batch_size']} examples, max length "
        f"{r.config.get('max_length')}, {r.model.get('name')}"
        for label, r in zip(labels, reports)
    )
    command = " ".join([*args.runs, *(f"--landscape {item}" for item in args.landscape)])
    lines = [
        "## saddle: the sign of the top Hessian eigenvalue per block, three tasks",
        "",
        f"Command: `python experiments/saddle.py {command}`. Machine: {machine()}.",
        f"Draws: {settings}.",
        "",
        f"![curvature signs]({args.figure.name})",
        "",
        curvature_sign_table(rows),
    ]
    if args.landscape:
        lines += landscape_lines(_pairs(args.landscape), args.landscape_figure)
    replace_section(args.out, "saddle", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    import sys

    try:
        main()
    except QBHError as exc:  # a missing or wrong input folder: one line, exit 2, nothing written
        print(f"saddle.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
