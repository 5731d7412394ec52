"""Write the four notebooks from the cells below, and (with --execute) run them to store their outputs.

    python notebooks/build_notebooks.py              # write 01..04_*.ipynb without outputs
    python notebooks/build_notebooks.py --execute    # ... and run them on the real MiniLM-L6 artifacts
    QBH_TINY=1 python notebooks/build_notebooks.py --execute   # the tiny mode the tests use

The cells live here, not only in the .ipynb files, so a change to a notebook is a reviewable diff.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


class C(str):
    """A code cell (every other string is a markdown cell)."""


SETUP = C("""\
# QBH_TINY=1 switches to a tiny random BERT and toy data (what the test suite runs); otherwise the
# MiniLM-L6 artifacts of `qbert-hessian run experiments/sst2_minilm.toml` are used.
import tempfile
import warnings
from pathlib import Path

from IPython.display import Image, Markdown

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets: plain bars

from _setup import TINY, workspace

ws = workspace()
figures = Path(tempfile.mkdtemp())
print("tiny mode" if TINY else "MiniLM-L6 fine-tuned on SST-2", "| model:", ws["model"])""")

LOAD = C("""\
from qbert_hessian import load_model, load_task

model, tokenizer = load_model(ws["model"])
task = load_task(ws["task"], tokenizer, data_dir=ws["data"], max_length=ws["max_length"])
print(f"{model.config.num_hidden_layers} layers, {sum(p.numel() for p in model.parameters()):,} parameters; "
      f"{len(task.train):,} training and {len(task.dev):,} dev examples")""")

REPORT = C("""\
from qbert_hessian import (BlockMap, QuantProfile, SensitivityConfig, SensitivityReport, estimate_sensitivity,
                           measure_profile, profile_units)

if TINY:  # a quick report on the spot: 3 draws, and the allocator's cost table of the same blocks
    report = estimate_sensitivity(model, task, SensitivityConfig(draws=3, batch_size=16, max_iters=20), progress=False)
    profile = measure_profile(model, profile_units(BlockMap(model), [b.name for b in report.blocks]))
else:  # the experiment's report: 10 draws of 32 sentences (Q-BERT's protocol), and its cost table
    report = SensitivityReport.load(Path(ws["run_dir"]) / "sensitivity" / "sensitivity.json")
    profile = QuantProfile.load(Path(ws["run_dir"]) / "sensitivity" / "profile.json")""")

NOTEBOOKS = {
    "01_sensitivity.ipynb": [
        "# 1. Which layers are sensitive? Hessian sensitivity of a fine-tuned BERT\n\n"
        "Q-BERT (Shen et al., 2020) gives more bits to the layers where the loss is sharp. Sharpness is the top "
        "eigenvalue of the Hessian of the loss restricted to one block of weights (the embedding table or one "
        "encoder layer). Because it changes from batch to batch, Q-BERT measures it on several data draws and "
        "scores each block by **Omega = |mean| + std**. This notebook computes one eigenvalue by hand, then "
        "the whole report.",
        SETUP,
        LOAD,
        "## One block, one batch\n\n`BlockHessian` turns a batch into a Hessian-vector product over one block's "
        "parameters (double backward; one graph per batch, reused by every product). Any eigen-solver that "
        "takes `hvp(v)` works on it; Lanczos finds the top eigenvalues in a handful of products.",
        C("""\
import torch

from qbert_hessian import BlockHessian
from qbert_hessian.hessian.eigen import lanczos_eigenvalues
from qbert_hessian.hessian.hvp import curvature_mode, grads_enabled

from qbert_hessian.models import BlockMap

batch = task.batch("train", list(range(ws["batch_size"])))
params = BlockMap(model).parameters("encoder.0")
with curvature_mode(model), grads_enabled(params):
    hvp = BlockHessian(model, params, [batch])
    res = lanczos_eigenvalues(hvp, params, k=2, most_negative=True, generator=torch.Generator().manual_seed(0))
print(f"encoder.0 ({sum(p.numel() for p in params):,} weights): top eigenvalues {res.values[0]:.4g}, "
      f"{res.values[1]:.4g}; most negative {res.smallest:.4g}; {res.iters[0]} Hessian-vector products")"""),
        "## The Q-BERT protocol over every block\n\n`estimate_sensitivity` repeats this on N seeded draws of the "
        "training data for the embeddings and every layer (Lanczos, warm-started from the previous draw), adds "
        "the Hutchinson trace, and returns a `SensitivityReport` (the content of `sensitivity.json`). The table "
        "ranks the blocks by Omega.",
        REPORT,
        C("""\
from qbert_hessian.report import plot_sensitivity, sensitivity_table

Markdown(sensitivity_table(report))"""),
        C("""\
Image(plot_sensitivity(report, figures / "sensitivity.png"))"""),
        "Each box is the top eigenvalue over the data draws; the red diamond is Omega. On MiniLM-L6 fine-tuned "
        "on SST-2 the first layers are the sharpest and the last ones the flattest, so a bit plan gives the first "
        "layers more bits (notebook 2). The same report comes from the command line: `qbert-hessian sensitivity "
        "--model runs/sst2_minilm/checkpoint --task sst2 --data ../shared/data/sst2 --out DIR`.",
    ],
    "02_bit_plans.ipynb": [
        "# 2. Bit plans under a memory budget\n\nFrom a sensitivity report and a budget, the allocator picks "
        "bits per encoder layer so that the sum of Omega_b x ||Q_b(W) - W||^2 is smallest. It is a multiple-choice "
        "knapsack solved exactly with `scipy.optimize.milp`; the report already holds every layer's perturbation "
        "at every width and grouping, so planning needs no model and takes milliseconds.",
        SETUP,
        LOAD,
        REPORT,
        "## Q-BERT's 2/3-bit setting: 2.5 bits on average on the encoder, 8-bit embeddings",
        C("""\
from qbert_hessian import AllocConfig, Budget, allocate_bits, uniform_plan
from qbert_hessian.report import plan_markdown

# rounded to nearest with static activation ranges, as quantize_model and calibrate_activations apply it below
# (the defaults, GPTQ and dynamic per-token ranges, are applied whole by quantize_calibrated(model, plan, task))
config = AllocConfig(bits=(2, 3), groups=ws["groups"], rounding="nearest", act_range="max")
plan = allocate_bits(report, profile, Budget(avg_bits=2.5), config)
Markdown(plan_markdown(plan))"""),
        "## What each budget buys\n\nThe frontier sweeps average-bit budgets with candidates 2, 3, 4 and 8 "
        "bits; the squares are the uniform plans, the crosses Q-BERT's rank rule (bits monotone in Omega).",
        C("""\
from qbert_hessian import frontier
from qbert_hessian.report import plot_frontier

front = frontier(report, profile, AllocConfig(groups=ws["groups"]), num_points=13)
Image(plot_frontier(front.to_dict(), figures / "frontier.png", plan))"""),
        "## Apply the plan and write the packed checkpoint\n\nThe plan swaps the Linear and Embedding modules "
        "for fake-quant ones (FP32 master weights), 8-bit activation ranges are calibrated on a few batches, "
        "and `save_packed` writes the integer codes bit-packed at their width with fp16 scales. Its size on "
        "disk is what the plan predicted.",
        C("""\
from qbert_hessian import calibrate_activations, load_packed, quantize_model, save_packed
from qbert_hessian.evaluate import evaluate
from qbert_hessian.export import file_sizes, fp32_safetensors_bytes
from qbert_hessian.quant.apply import calibration_batches

qmodel = quantize_model(model, plan)
calibrate_activations(qmodel, calibration_batches(task, 4, ws["batch_size"]))
save_packed(qmodel, figures / "packed", plan=plan, tokenizer=tokenizer)
disk, fp32 = file_sizes(figures / "packed")["weights_bytes"], fp32_safetensors_bytes(model)
print(f"packed {disk:,} bytes on disk (plan: {plan.predicted['bytes']:,}); FP32 {fp32:,} bytes: {fp32 / disk:.2f}x smaller")
acc = {"FP32": evaluate(model, task)["accuracy"], "direct 2/3-bit": evaluate(qmodel, task)["accuracy"],
       "packed file": evaluate(load_packed(figures / "packed"), task)["accuracy"]}
print(acc)"""),
        "Direct quantization at 2-3 bits loses accuracy; quantization-aware training (notebook 3) recovers it.",
    ],
    "03_compression_run.ipynb": [
        "# 3. A compression run, end to end\n\n`qbert-hessian run CONFIG.toml` chains every stage: FP32 baseline, "
        "sensitivity, plans, direct quantization, QAT (straight-through estimator, distillation from the FP32 "
        "model), packed export and evaluation from the packed file, and writes `report.md`. Each stage writes "
        "its artifact and is skipped when it exists, so a run resumes after an interruption. Here the same from "
        "Python.",
        SETUP,
        C("""\
from qbert_hessian.pipeline import Run
from qbert_hessian.run_config import load_run_config, parse_run_config

if TINY:
    config = parse_run_config({
        "model": {"name": ws["model"], "task": "sst2", "data": ws["data"], "max_length": 16},
        "sensitivity": {"draws": 2, "batch_size": 16, "max_iters": 20, "trace_samples": 2},
        "allocate": {"groups": "heads"},
        "plans": [{"name": "uniform-4", "uniform": 4, "qat": False}, {"name": "mixed-3", "avg_bits": 3.0, "bits": [2, 4]}],
        "qat": {"epochs": 2, "batch_size": 16, "lr": 1e-3, "distill": True},
        "run": {"calibration_batches": 2, "batch_size": 16},
    })
else:  # the experiment's config; its stages are finished, so this only reads them back
    from _setup import ROOT

    config = load_run_config(ROOT / "experiments" / "sst2_minilm.toml")
[(p.name, {k: v for k, v in p.spec.to_dict().items() if k != "name" and v is not None}) for p in config.plans]"""),
        C("""\
report_md = Run(config, ws["run_dir"], progress=False).execute()
print(report_md)"""),
        "## The results table\n\nThe same table as `report.md`, built from the run's JSON artifacts alone.",
        C("""\
from qbert_hessian.report import results_rows, results_table

Markdown(results_table(results_rows(ws["run_dir"])))"""),
        C("""\
Image(str(Path(ws["run_dir"]) / "plans" / "frontier.png"))"""),
        "Read the rows in pairs: *direct* is the plan applied to the FP32 weights, *QAT* the same plan after "
        "quantization-aware training, evaluated from its packed checkpoint. Sizes are bytes on disk.",
    ],
    "04_loss_landscape.ipynb": [
        "# 4. Loss landscapes and the Hessian spectrum\n\nQ-BERT's Figure 2 plots the loss around the weights of "
        "a sharp and a flat layer along the top two Hessian eigenvectors of that layer. `loss_landscape` does "
        "that (or along random filter-normalised directions, or the gradient), averaging the same fixed batches "
        "at every grid point; `slq_density` estimates the whole eigenvalue density by stochastic Lanczos "
        "quadrature.",
        SETUP,
        LOAD,
        REPORT,
        C("""\
ranked = sorted((b for b in report.blocks if b.name.startswith("encoder.")), key=lambda b: b.omega)
flat, sharp = ranked[0].name, ranked[-1].name
print(f"sharpest layer {sharp} (Omega {ranked[-1].omega:.3g}), flattest {flat} (Omega {ranked[0].omega:.3g})")"""),
        C("""\
from qbert_hessian.landscape import LandscapeConfig, loss_landscape
from qbert_hessian.report import plot_landscapes

cfg = LandscapeConfig(directions="eigen", grid=7 if TINY else 15, radius=0.4, batch_size=ws["batch_size"], num_batches=2)
surfaces = [loss_landscape(model, task, cfg, block=b, progress=False) for b in (sharp, flat)]
Image(plot_landscapes([s.to_dict() for s in surfaces], figures / "landscapes.png"))"""),
        "Along the sharp layer's top eigenvectors the loss rises fast; the flat layer barely moves over the same "
        "range. That is the intuition behind giving the sharp layer more bits.",
        "## The eigenvalue density of one layer",
        C("""\
import torch

from qbert_hessian.hessian.density import slq_density, smooth_alike
from qbert_hessian.hessian.hvp import BlockHessian, curvature_mode, grads_enabled
from qbert_hessian.report import plot_density

batch = task.batch("train", list(range(ws["batch_size"])))
results = {}
for name in (sharp, flat):
    params = BlockMap(model).parameters(name)
    with curvature_mode(model), grads_enabled(params):
        results[name] = slq_density(BlockHessian(model, params, [batch]), params, steps=20 if TINY else 60,
                                    generator=torch.Generator().manual_seed(0))
    print(f"{name}: eigenvalues from {results[name].extremes[0]:.3g} to {results[name].extremes[1]:.3g}")
smooth_alike(list(results.values()))  # one kernel width for both curves
Image(plot_density([{"block": n, **r.to_dict()} for n, r in results.items()], figures / "density.png"))"""),
        "Most of the mass sits near zero: the Hessian of a fine-tuned BERT layer is nearly flat in almost every "
        "direction, with a few large outliers (and some negative eigenvalues). The outliers decide the top "
        "eigenvalue and the sensitivity score.",
    ],
}


def build(name: str, cells: list[str]) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [new_code_cell(str(c)) if isinstance(c, C) else new_markdown_cell(c) for c in cells]
    return nb


def execute(nb: nbformat.NotebookNode, timeout: int = 1200) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    return nb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--execute", action="store_true", help="run each notebook and keep its outputs")
    ap.add_argument("--only", default=None, help="one notebook file name")
    args = ap.parse_args()
    for name, cells in NOTEBOOKS.items():
        if args.only and name != args.only:
            continue
        nb = build(name, cells)
        if args.execute:
            nb = execute(nb)
        nbformat.write(nb, HERE / name)
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
