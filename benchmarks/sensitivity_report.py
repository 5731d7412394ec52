"""The results file of benchmarks/bench_sensitivity.py (markdown), and the analysis of our Lanczos runs' products
against the fewest that reach the tolerance."""

from __future__ import annotations

import datetime
import os
import platform
import sys

import numpy as np
import torch
from sensitivity_peers import ARPACK_NCV, Eigs, lanczos_schedule

from qbert_hessian.config import SensitivityConfig
from qbert_hessian.hessian.hvp import split_by_length
from qbert_hessian.hessian.lanczos import tridiagonal_eigh


def pct(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{100 * x:.2f}%"


def products_against_minimum(
    tridiagonals: list, eig: Eigs, reference: dict[str, np.ndarray], names: list[str], draws: int, tol: float
) -> dict[str, tuple[int, int, int]] | None:
    """Per block: (products used, the fewest products after which the run's value was within ``tol`` of the
    converged reference, block-draws stopped before that point), from each run's own T_m.

    The value after m products is the largest-magnitude eigenvalue of T_m (what the engine reports when it
    stops there); the minimum is what a stopping rule that knew the reference would have paid on the same
    Krylov spaces. A block-draw stopped outside the tolerance counts its products in both (its minimum is
    larger, unknown). None when the runs do not line up with the draws and blocks (draw-major order)."""
    if len(tridiagonals) != draws * len(names):
        return None
    out = {n: [0, 0, 0] for n in names}
    for i, (alpha, beta) in enumerate(tridiagonals):
        d, n = divmod(i, len(names))
        name = names[n]
        values = []
        for m in range(1, len(alpha) + 1):
            evals = tridiagonal_eigh(alpha[:m], beta[: m - 1])[0]
            values.append(float(evals[np.argmax(np.abs(evals))]))
        if not np.isclose(values[-1], eig[name][d], rtol=1e-6, atol=0.0):
            return None
        ref = float(reference[name][d])
        within = [m for m, v in enumerate(values, 1) if abs(v - ref) <= tol * abs(ref)]
        out[name][0] += len(alpha)
        out[name][1] += within[0] if within else len(alpha)
        out[name][2] += 0 if within else 1
    return {n: (a, b, c) for n, (a, b, c) in out.items()}


def render_minimum(minimum: dict[str, tuple[int, int, int]] | None, cfg: SensitivityConfig) -> str:
    """The section on our default engine's products against the fewest that reach the tolerance."""
    if minimum is None:
        return ""
    rows = ["| block | products | minimum | above the minimum | draws stopped outside the tolerance |"]
    rows.append("|---|---:|---:|---:|---:|")
    for name, (used, least, outside) in minimum.items():
        rows.append(f"| `{name}` | {used} | {least} | {used - least} | {outside} |")
    used, least, outside = (sum(x[i] for x in minimum.values()) for i in range(3))
    rows.append(f"| all | {used} | {least} | {used - least} | {outside} |")
    return f"""
## Products against the minimum (ours, Lanczos, the default)

For every block-draw, the fewest products after which the Lanczos value (the largest-magnitude eigenvalue of
T_m, read off the run's own tridiagonal) was within the tolerance ({cfg.tol:g} relative) of the converged reference:
what a stopping rule that knew the answer would have paid on the same Krylov spaces. The products above it are
what the residual rule pays to certify the value without knowing it. A draw stopped outside the tolerance counts
its products in both columns (its minimum is larger, unknown). Over {cfg.draws} draws:

{chr(10).join(rows)}

Stopping at the minimum everywhere would make {least} products instead of {used} ({100 * (used - least) / used:.0f}% fewer): the
most any stopping rule could save on these Krylov spaces.
"""


def machine_line(dev: str) -> tuple[str, str]:
    """The machine, and how memory was measured on it."""
    if dev == "cuda":
        machine = f"{torch.cuda.get_device_name()} GPU, {os.cpu_count()} CPU cores, torch {torch.__version__}"
        return machine, "peak GPU memory above the loaded model (fresh process, 2 draws)"
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)"
    )
    return machine, "peak memory above the loaded model (RSS, fresh process, 2 draws)"


def summary_rows(runs, missing, errors, bf16, label: dict[str, str], t_base: float) -> list[str]:
    """One row per engine: time, speed-up, products, largest error, memory; the engines that did not run."""
    rows = []
    for key, (t, m, n, eig) in runs.items():
        err = errors(eig)
        mem = "not measured" if np.isnan(m) else f"{m:.0f} MiB"
        products = f"{n} ({bf16[key]} bf16)" if bf16.get(key) else f"{n}"
        rows.append(f"| {label[key]} | {t:.1f} s | {t_base / t:.2f}x | {products} | {pct(np.nanmax(err))} | {mem} |")
    for key, why in missing.items():
        rows.append(f"| {label[key]} | not run: {why} | | | | |")
    return rows


def agreement_text(runs, names, label: dict[str, str]) -> str:
    """Each engine's per-draw top eigenvalue against PyHessian's (empty when PyHessian did not run first)."""
    keys = list(runs)
    if "pyhessian" not in runs:
        return ""
    lines = []
    ref = {n: np.array(runs["pyhessian"][3][n]) for n in names}
    for key in keys[1:]:
        rel = np.concatenate([np.abs(np.array(runs[key][3][n]) - ref[n]) / np.abs(ref[n]) for n in names])
        lines.append(
            f"- {label[key]}: mean {pct(np.nanmean(rel))}, max {pct(np.nanmax(rel))} over {rel.size} block-draws"
        )
    return "Agreement of the per-draw top eigenvalue with PyHessian's (relative difference):\n" + "\n".join(lines)


def error_lines(runs, errors, label: dict[str, str]) -> list[str]:
    """Each engine's mean and largest error against the converged reference."""
    lines = []
    for key, (_, _, _, eig) in runs.items():
        err = errors(eig)
        nan = int(np.isnan(err).sum())
        extra = f" ({nan} block-draws without a converged value)" if nan else ""
        lines.append(f"- {label[key]}: mean {pct(np.nanmean(err))}, max {pct(np.nanmax(err))}{extra}")
    return lines


def per_block_tables(runs, reference, names, label: dict[str, str]) -> tuple[list[str], list[str]]:
    """Per block: the mean top eigenvalue of every engine (and the reference), and its largest relative error."""
    keys = list(runs)
    short = {key: label[key].replace("qbert_hessian", "ours").split(" + ")[0] for key in keys}
    head = "| block | reference | " + " | ".join(short[k] for k in keys) + " |"
    rule = "|---|---:|" + "---:|" * len(keys)
    mean_rows, err_rows = [head, rule], [head.replace("| reference |", "|"), "|---|" + "---:|" * len(keys)]
    for n in names:
        cells = [f"`{n}`", f"{reference[n].mean():.4g}"]
        cells += [f"{np.nanmean(runs[k][3][n]):.4g}" for k in keys]
        mean_rows.append("| " + " | ".join(cells) + " |")
        rel = [np.abs(np.array(runs[k][3][n]) - reference[n]) / np.abs(reference[n]) for k in keys]
        err_rows.append(f"| `{n}` | " + " | ".join(pct(np.nanmax(r)) for r in rel) + " |")
    return mean_rows, err_rows


def check_text(checks, names) -> str:
    """The peers' products against ours on one vector per block (empty when no peer with an operator ran)."""
    if not checks:
        return ""
    peers = list(checks)
    rows = ["| block | " + " | ".join(peers) + " |", "|---|" + "---:|" * len(peers)]
    for n in names:
        rows.append(f"| `{n}` | " + " | ".join(f"{checks[p][n]:.1e}" for p in peers) + " |")
    return f"""
### One product, checked

||H_peer v - H v|| / ||H v|| for one seeded Gaussian v per block on the first draw's batch, H v from our
`BlockHessian` (checked against the dense Hessian in the unit tests). float32 rounding is about 1e-6:

{chr(10).join(rows)}

curvlinops 3 builds its product as `jvp(jacrev(loss))` over `torch.func` (forward over reverse, vmapped over
the columns). In torch {torch.__version__} that composition differentiates `layer_norm` wrongly when both its input
and its weight depend on the parameters (a LayerNorm after a block's linear layer: every encoder layer, and the
embeddings' LayerNorm after the tables): on a 3 x 5 toy `jvp(jacrev(f))` is 22% off a central finite difference
while `jvp(grad(f))` agrees to 1e-10 (`python benchmarks/jvp_jacrev_layernorm.py`; related upstream report:
pytorch/pytorch#196700). Its eigenvalues above inherit the error of its products.
"""


def data_text(args, cfg: SensitivityConfig, batches, padded: bool) -> tuple[str, str]:
    """The draws in words, and the first reason of our speed-up (length buckets, or why there are none)."""
    lengths = [int(b["attention_mask"].sum()) for b in batches]
    positions = [b["attention_mask"].numel() for b in batches]
    kept = [sum(p["input_ids"].numel() for p in split_by_length(b, cfg.length_buckets)) for b in batches]
    if args.task == "sst2":
        data = (
            f"{cfg.draws} draws of {cfg.batch_size} SST-2 training sentences (max length {cfg.max_length}, dynamic "
            f"padding: {100 * sum(lengths) / sum(positions):.0f}% of the padded positions are real tokens)"
        )
    else:
        data = (
            f"{cfg.draws} draws of {cfg.batch_size} BBC News training articles (max length {cfg.max_length}; "
            f"{100 * sum(lengths) / sum(positions):.0f}% of the positions are real tokens: the articles are longer "
            "than the window, so every batch is full and length buckets have nothing to remove)"
        )
    if padded:
        return (
            data,
            f"""1. **Length buckets.** A padded batch spends most of its compute on padding: the {cfg.draws} batches hold
   {sum(lengths):,} real tokens in {sum(positions):,} padded positions ({100 * sum(lengths) / sum(positions):.0f}%). Our engine sorts each batch's rows by
   length and cuts them into at most {cfg.length_buckets} micro-batches, each trimmed to its longest row ({sum(kept):,} positions,
   {100 * sum(kept) / sum(positions):.0f}% of the padded count). The loss is a mean over sentences and padding never reaches a real
   token, so the size-weighted micro-batch losses are the same function of the weights: same Hessian, less work.
   The row without buckets shows the rest of the engine alone.""",
        )
    return (
        data,
        """1. **No padding here.** Every batch is full, so length buckets change nothing; what remains is the engine
   itself. (On SST-2, benchmarks/RESULTS.md, they halve the cost of every product.)""",
    )


def how_engines_run(cfg: SensitivityConfig) -> str:
    """How each engine runs one block on one draw."""
    return f"""How each engine runs one block on one draw:
- PyHessian freezes all other parameters; it starts every draw from a random vector and stops when its estimate moves by
  at most the tolerance (relative) in one step.
- curvlinops: `HessianLinearOperator` over the block's parameters and the draw's batch (mean cross-entropy of the
  logits, the model's own loss), `to_scipy(float32)`, then `scipy.sparse.linalg.eigsh(k=1, which="LM", tol={cfg.tol})`
  from a seeded start. ARPACK's `tol` bounds the Ritz residual relative to the eigenvalue (so the eigenvalue's error
  too); its restarts are capped at {max(1, cfg.max_iters // ARPACK_NCV)} (about {cfg.max_iters} products; every product of every restart counted).
- hessian-eigenthings: `HessianOperator` with a parameter filter for the block, loss `model(**batch).loss`. Power
  iteration (`deflated_power_iteration(k=1, max_iter={cfg.max_iters}, tol={cfg.tol})`) stops when both the change and the residual are
  within the tolerance. Its Lanczos runs a fixed number of steps: it is run at {", ".join(map(str, lanczos_schedule(cfg.max_iters)))} steps until its
  own test (Ritz residual <= tol |lambda|) passes, and every product of every attempt is counted.
- Ours: power iteration stops by PyHessian's rule plus a residual check; Lanczos when its residual-based error estimate
  is at most the tolerance (relative); warm starts across draws, embedding tables cut to the rows looked up.
- Ours under a precision: `bf16` runs every product's matrix products in bfloat16 (autocast) through the same float32
  graph, unchecked; `mixed` runs Lanczos on those bf16 products, then certifies each block-draw's value with one float32
  product of its Ritz vector (Rayleigh quotient, residual bound with the gap to the next Ritz value) and continues in
  float32 from that vector when the bound misses the tolerance. Their products column counts both kinds (bf16 ones
  in brackets).
"""


# Where our speed-up comes from, after the length buckets (the first reason, which depends on the data).
WHY_FASTER = """2. **Lanczos with a residual stopping rule.** Its Ritz value converges with the gap like a Chebyshev polynomial rather
   than geometrically, and the rule stops as soon as the error estimate beta_m |s_mj| (squared over the gap to the
   next Ritz value) is inside the tolerance, instead of paying one more product to see the value stop moving.
3. **One graph per draw, reused.** Each product is one double backward through a graph built once per draw over
   every block's parameters, through the part of it the block's gradient depends on (PyHessian builds one per
   block and draw, as ours does with `shared_graph=False`, the row "a graph per block and draw"); curvlinops and
   hessian-eigenthings run the forward pass (and curvlinops its reverse pass) again for every product.
4. **Embedding tables cut to the rows looked up.** The word table's Hessian is zero outside the draw's token ids, so
   the solver's vectors hold a few hundred rows instead of 30,522.
5. **Warm starts**: each draw starts from the previous draw's top eigenvector (kept whole between draws).
6. **Curvature kernels.** GELU and the attention softmax run, during the products, as functions whose double
   backward keeps the factors that do not depend on the vector (GELU', g GELU'', g - <g, y>) instead of
   recomputing them in every product (`qbert_hessian/hessian/kernels.py`; per block in benchmarks/PRODUCTS.md).
7. **Freed memory reused.** A product frees a few hundred MiB of intermediates that the next one allocates again; with
   glibc's defaults those pages go back to the kernel and come back zero-filled, one fault per 4 KiB page. Our
   engine keeps them in the process while it runs (`qbert_hessian/hessian/memory.py`). The rows "the system
   allocator's defaults" (ours without it) and "inside our reuse_freed_memory" (PyHessian with it) show what it
   gives each.

Memory: our Lanczos keeps its basis (one vector of the block's size per product) for re-orthogonalisation; ARPACK keeps
its (20 vectors by default); eigenthings' Lanczos keeps all of its steps' vectors of the whole block (word table
included).
"""


def render(
    args,
    about,
    cfg,
    ref_cfg,
    names,
    batches,
    padded,
    runs,
    missing,
    reference,
    errors,
    checks,
    t_fb,
    hvp_rows,
    bf16,
    label: dict[str, str],
) -> str:
    """The results file (``label``: each engine key's name in the tables)."""
    base = "pyhessian" if "pyhessian" in runs else list(runs)[0]
    machine, memory = machine_line(args.device)
    summary = summary_rows(runs, missing, errors, bf16, label, runs[base][0])
    mean_rows, err_rows = per_block_tables(runs, reference, names, label)
    command = "python benchmarks/bench_sensitivity.py " + " ".join(sys.argv[1:])
    data, buckets = data_text(args, cfg, batches, padded)
    hvp_table = "\n".join(
        f"| {n} | {g1 * 1000:.0f} ms | {h1 * 1000:.0f} ms | {h1 / t_fb:.2f}x | {g2 * 1000:.0f} ms | {h2 * 1000:.0f} ms | {h2 / t_fb:.2f}x |"
        for n, g1, h1, g2, h2 in hvp_rows
    )
    return f"""# Sensitivity benchmark: qbert_hessian and its peers ({"SST-2" if args.task == "sst2" else "BBC News"})

Command: `{command}` ({datetime.date.today().isoformat()}; the checkpoint from the script's docstring)

Machine: {machine}, Python {platform.python_version()}. Model: {about}, fine-tuned on the
task. Protocol (Q-BERT's): blocks {", ".join(names)}; {data}; the same batches for every engine;
tolerance {cfg.tol}, at most {cfg.max_iters} products where the solver takes a cap; eigenvalues only.

{how_engines_run(cfg)}
{"Every engine ran in this one process, one after another (`--in-process`)." if args.in_process else "Every engine ran in a fresh process of its own, timed from after the model and batches were loaded, so none inherited another's heap or allocator settings and their order does not matter."}

| engine | wall time | speed-up vs {label[base]} | Hessian-vector products | max error vs converged | {memory} |
|---|---:|---:|---:|---:|---:|
{chr(10).join(summary)}

{agreement_text(runs, names, label)}

Error of each engine against a converged reference (our Lanczos at tolerance {ref_cfg.tol:g}, same draws):
{chr(10).join(error_lines(runs, errors, label))}

Mean top eigenvalue over the draws, per block:

{chr(10).join(mean_rows)}

Largest relative error of a draw against the converged reference, per block:

{chr(10).join(err_rows)}
{check_text(checks, names)}
Cost of one Hessian-vector product (ours) against one forward+backward of the padded batch ({t_fb * 1000:.0f} ms), on the first
draw's batch, built as one padded batch and as length buckets:

| parameters | graph, padded | one HVP, padded | HVP / (fwd+bwd) | graph, buckets | one HVP, buckets | HVP / (fwd+bwd) |
|---|---:|---:|---:|---:|---:|---:|
{hvp_table}

Where our speed-up comes from:
{buckets}
{WHY_FASTER}"""
