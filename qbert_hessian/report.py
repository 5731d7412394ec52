"""Figures, tables and markdown built from artifacts alone (never from live models).

The sensitivity report becomes ``sensitivity.csv`` (one row per block), ``sensitivity.md`` (blocks ranked
by Omega, readable in ten seconds) and ``sensitivity.png`` (per-draw eigenvalue distribution per block with
Omega marked; the normalised trace below when it was estimated). Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .artifacts import METRIC_COLUMNS, BitPlan, SensitivityReport, atomic_write, write_text
from .config import ACT_PERCENTILE, PRICED_MEASURES, UNRECORDED
from .errors import QBHError
from .run_config import ResolvedPlan, recorded_plans
from .run_folder import RunFolder


def _save_figure(fig: Any, path: Path | str, *, dpi: int = 120) -> Path:
    """Write a matplotlib figure as PNG atomically (an ``Figure`` object: no pyplot state, no backend switch)."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}"


def sensitivity_rows(report: SensitivityReport) -> list[dict[str, object]]:
    """One flat row per block, in model order (the CSV's content)."""
    rows = []
    for b in report.blocks:
        rows.append(
            {
                "block": b.name,
                "num_params": b.num_params,
                "eig_mean": b.mean,
                "eig_std": b.std,
                "omega": b.omega,
                "eig_min": min(b.eigenvalues),
                "eig_max": max(b.eigenvalues),
                "trace": b.trace.mean if b.trace else None,
                "trace_stderr": b.trace.stderr if b.trace else None,
                "trace_method": b.trace.method if b.trace else None,
                "normalized_trace": b.normalized_trace,
                "most_negative_mean": sum(b.most_negative) / len(b.most_negative) if b.most_negative else None,
                "iterations_mean": sum(b.iterations) / len(b.iterations),
                "converged_draws": sum(b.converged),
                "draws": len(b.eigenvalues),
                "seconds": round(b.seconds, 2),
            }
        )
    return rows


def sensitivity_csv(report: SensitivityReport) -> str:
    rows = sensitivity_rows(report)
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    return buf.getvalue()


def sensitivity_table(report: SensitivityReport) -> str:
    """Markdown table of the blocks ranked by Omega (most sensitive first)."""
    has_trace = any(b.trace for b in report.blocks)
    head = "| rank | block | params | mean top eig | std | **Omega** |"
    rule = "|---:|---|---:|---:|---:|---:|"
    if has_trace:
        head += " trace +- se | trace / params |"
        rule += "---:|---:|"
    head += " iters | converged |"
    rule += "---:|---:|"
    lines = [head, rule]
    ranked = sorted(report.blocks, key=lambda b: b.omega, reverse=True)
    for rank, b in enumerate(ranked, 1):
        line = f"| {rank} | `{b.name}` | {b.num_params:,} | {_fmt(b.mean)} | {_fmt(b.std)} | **{_fmt(b.omega)}** |"
        if has_trace:
            t = b.trace
            line += f" {_fmt(t.mean) + ' +- ' + _fmt(t.stderr, 2) if t else '-'} | {_fmt(b.normalized_trace, 3)} |"
        line += f" {sum(b.iterations) / len(b.iterations):.1f} | {sum(b.converged)}/{len(b.converged)} |"
        lines.append(line)
    return "\n".join(lines)


def _trace_setting(cfg: dict) -> str:
    """``block (hutchpp, 12 products per draw)``; reports from before the setting were Hutchinson's."""
    if cfg["trace"] == "none":
        return "none"
    method = cfg.get("trace_method", "hutchinson")
    return f"{cfg['trace']} ({method}, {cfg.get('trace_samples')} products per draw)"


def _precision_text(cfg: dict) -> str:
    """The products' precision when not float32 (reports from before the setting, and fp32 ones, say nothing)."""
    about = {
        "bf16": "bf16 matrix products, unchecked (about 1% per product)",
        "mixed": (
            "bf16 search, every eigenvalue checked in float32 against tol (residual over the Ritz gap, as the fp32 "
            "stopping rule); traces float32"
        ),
    }
    precision = cfg.get("precision", "fp32")
    return f"; products: {about.get(precision, precision)}" if precision != "fp32" else ""


def _draws_text(report: SensitivityReport) -> str:
    """How the report's draws were made: a number of batches, or a share of the training split."""
    cfg = report.config
    if cfg.get("draw_fraction"):
        size = len(report.draws[0]["indices"]) if report.draws else 0
        return (
            f"{cfg['draws']} draws of {cfg['draw_fraction']:g} of the training split ({size} examples, in batches "
            f"of {cfg['batch_size']})"
        )
    return f"{cfg['draws']} draws x {cfg['batches_per_draw']} batch(es) of {cfg['batch_size']} training examples"


def sensitivity_markdown(report: SensitivityReport, figure: str | None = "sensitivity.png") -> str:
    cfg = report.config
    m = report.model
    status = (
        "complete"
        if report.complete
        else f"**partial**: {len(report.pending)} block(s) still to do "
        f"({', '.join(report.pending)}); rerun the same command (`sensitivity --resume`, or `run`) to finish it"
    )
    lines = [
        f"# Hessian sensitivity: {m.get('name')} on {report.task}",
        "",
        f"- model: {m.get('family')}, {m.get('num_layers')} layers, {m.get('num_heads')} heads, "
        f"{m.get('num_params', 0):,} parameters",
        f"- protocol: {_draws_text(report)}; {cfg.get('method', 'power')} eigen-solver, tol {cfg['tol']}, max "
        f"{cfg['max_iters']} products; trace: {_trace_setting(cfg)}; seed {cfg['seed']}{_precision_text(cfg)}",
        f"- status: {status}; {report.seconds:.0f} s of compute",
        "- Omega = |mean| + std of the top eigenvalue over draws (Q-BERT); higher means more sensitive "
        "to quantization. A negative eigenvalue means the loss curves down along that direction.",
        "",
        sensitivity_table(report),
    ]
    if figure:
        lines += ["", f"![sensitivity]({figure})"]
    return "\n".join(lines) + "\n"


def plot_sensitivity(report: SensitivityReport, path: Path | str) -> Path:
    """Box plot of the per-draw top eigenvalue per block, Omega marked; normalised trace below if present."""
    from matplotlib.figure import Figure

    blocks = report.blocks
    has_trace = any(b.normalized_trace is not None for b in blocks)
    fig = Figure(figsize=(max(6.0, 0.9 * len(blocks) + 2), 6.5 if has_trace else 4.2))
    axes = fig.subplots(2 if has_trace else 1, 1, sharex=True, squeeze=False)
    ax = axes[0, 0]
    xs = list(range(1, len(blocks) + 1))
    ax.boxplot([b.eigenvalues for b in blocks], positions=xs, widths=0.5, showfliers=False)
    for x, b in zip(xs, blocks):
        jitter = [x + 0.12 * ((i % 5) - 2) / 2 for i in range(len(b.eigenvalues))]
        ax.scatter(jitter, b.eigenvalues, s=10, color="tab:blue", alpha=0.6, zorder=3)
    ax.scatter(xs, [b.omega for b in blocks], marker="D", color="tab:red", s=40, zorder=4, label="Omega = |mean| + std")
    values = [v for b in blocks for v in b.eigenvalues]
    if values and min(values) > 0 and max(values) / min(values) > 100:
        ax.set_yscale("log")
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_ylabel("top Hessian eigenvalue")
    ax.set_title(
        f"{report.model.get('name')} on {report.task}: {report.config['draws']} data draws per block"
        + ("" if report.complete else " (partial)")
    )
    ax.legend(loc="best", fontsize=8)
    if has_trace:
        ax2 = axes[1, 0]
        tr = [b.normalized_trace or 0.0 for b in blocks]
        err = [(b.trace.stderr / b.num_params) if b.trace else 0.0 for b in blocks]
        ax2.bar(xs, tr, yerr=err, color="tab:green", alpha=0.7, capsize=3)
        ax2.set_ylabel("trace / #params")
    axes[-1, 0].set_xticks(xs)
    axes[-1, 0].set_xticklabels([b.name for b in blocks], rotation=30, ha="right")
    fig.tight_layout()

    return _save_figure(fig, path, dpi=120)


def curvature_sign_rows(reports: Sequence[SensitivityReport], labels: Sequence[str]) -> list[dict[str, Any]]:
    """Per task and block: the top (largest-magnitude) eigenvalue's mean and spread over the draws, on how many
    draws it is negative, and the most negative eigenvalue (when the report has it): Q-BERT's saddle test."""
    rows = []
    for label, report in zip(labels, reports):
        for b in report.blocks:
            neg = b.most_negative
            rows.append(
                {
                    "task": label,
                    "block": b.name,
                    "mean": b.mean,
                    "std": b.std,
                    "negative_draws": sum(v < 0 for v in b.eigenvalues),
                    "draws": len(b.eigenvalues),
                    "most_negative": sum(neg) / len(neg) if neg else None,
                }
            )
    return rows


def curvature_sign_table(rows: list[dict[str, Any]]) -> str:
    """:func:`curvature_sign_rows` as markdown."""
    lines = [
        "| task | block | top eigenvalue, mean | std | draws with top < 0 | most negative eigenvalue, mean |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['block']} | {_fmt(r['mean'])} | {_fmt(r['std'])} | "
            f"{r['negative_draws']}/{r['draws']} | {_fmt(r['most_negative'])} |"
        )
    return "\n".join(lines)


def plot_curvature_signs(reports: Sequence[SensitivityReport], labels: Sequence[str], path: Path | str) -> Path:
    """One panel per task: per block, the top eigenvalue of every draw (dots) and the most negative one (crosses,
    when measured), on a symmetric log axis so that sign and size read at once; above each block, on how many
    draws the top eigenvalue is negative."""
    from matplotlib.figure import Figure

    if not reports or len(reports) != len(labels):
        raise QBHError("plot_curvature_signs needs one label per sensitivity report")
    fig = Figure(figsize=(4.6 * len(reports), 4.4))
    axes = fig.subplots(1, len(reports), squeeze=False)[0]
    for ax, label, report in zip(axes, labels, reports):
        blocks = report.blocks
        xs = list(range(1, len(blocks) + 1))
        values = [abs(v) for b in blocks for v in [*b.eigenvalues, *(b.most_negative or [])] if v]
        ax.set_yscale("symlog", linthresh=max(0.01 * max(values, default=1.0), 1e-6))
        for x, b in zip(xs, blocks):
            jitter = [x - 0.15 + 0.3 * i / max(1, len(b.eigenvalues) - 1) for i in range(len(b.eigenvalues))]
            colors = ["tab:red" if v < 0 else "tab:blue" for v in b.eigenvalues]
            ax.scatter(jitter, b.eigenvalues, s=14, c=colors, alpha=0.75, zorder=3)
            if b.most_negative:
                ax.scatter([x] * len(b.most_negative), b.most_negative, marker="x", s=18, color="tab:orange", zorder=2)
            neg = sum(v < 0 for v in b.eigenvalues)
            ax.annotate(
                f"{neg}/{len(b.eigenvalues)}",
                (x, 1.0),
                xycoords=("data", "axes fraction"),
                ha="center",
                va="bottom",
                fontsize=7,
                color="tab:red" if neg else "grey",
            )
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_xticks(xs)
        ax.set_xticklabels([b.name for b in blocks], rotation=35, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10, pad=14)
    axes[0].set_ylabel("eigenvalue (symlog)")
    handles = [
        axes[0].scatter([], [], s=14, color="tab:blue", label="top eigenvalue > 0 (one dot per draw)"),
        axes[0].scatter([], [], s=14, color="tab:red", label="top eigenvalue < 0"),
        axes[0].scatter([], [], marker="x", s=18, color="tab:orange", label="most negative eigenvalue"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("Top Hessian eigenvalue per block and draw; above each block: draws on which it is negative", y=0.99)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    return _save_figure(fig, path, dpi=120)


def write_sensitivity(report: SensitivityReport, out_dir: Path | str) -> dict[str, Path]:
    """Write ``sensitivity.{json,csv,md,png}`` into ``out_dir`` (each atomically)."""
    out = Path(out_dir)
    paths = {
        "json": report.save(out / "sensitivity.json"),
        "csv": write_text(out / "sensitivity.csv", sensitivity_csv(report)),
        "md": write_text(out / "sensitivity.md", sensitivity_markdown(report)),
    }
    if report.blocks:
        paths["png"] = plot_sensitivity(report, out / "sensitivity.png")
    return paths


def plan_markdown(plan: BitPlan) -> str:
    """The plan as a person reads it: budget, predicted size, and one row per block."""
    p = plan.predicted
    budget = ", ".join(f"{k}={v}" for k, v in plan.budget.items()) or "-"
    lines = [
        f"# Bit plan: {plan.model.get('name')} ({plan.method}, {budget})",
        "",
        f"- predicted size: **{_fmt(p.get('mib'))} MiB** ({p.get('bytes', 0):,} bytes) vs FP32 "
        f"{_fmt(p.get('fp32_mib'))} MiB: **{_fmt(p.get('compression'), 3)}x** smaller",
        f"- encoder average: {_fmt(p.get('encoder_avg_bits'), 3)} bits; activations: "
        f"{plan.act_bits or 'FP32'} bits{act_range_text(plan)}; "
        f"{'symmetric' if plan.symmetric else 'asymmetric'} weight ranges chosen by "
        f"{plan.range_method}; weights rounded by {rounding_text(plan)}",
        f"- objective sum_b s_b ||Q(W_b) - W_b||^2 with s = {plan.measure}: {_fmt(p.get('objective'))}"
        if plan.measure not in PRICED_MEASURES
        else f"- objective sum_b dL_b, each block's loss change priced by {plan.measure}: {_fmt(p.get('objective'))}",
    ]
    if p.get("deploy") == "onnx":
        lines[2] = lines[2].replace("- predicted size:", "- predicted size of the ONNX export (onnx/model.onnx):", 1)
        lines.insert(
            3,
            f"- priced for deploy onnx (widths 2, 4, 8): within {p['onnx_tolerance_bytes']:,} bytes of the file "
            f"({p['onnx_initializer_bytes']:,} bytes of initializers exactly); the packed checkpoint is "
            f"{p['packed_bytes']:,} bytes",
        )
    lines += [f"- note: {n}" for n in plan.notes]
    per_block = p.get("per_block", {})
    lines += [
        "",
        "| block | bits | groups | sensitivity | ||Q(W)-W||^2 | loss term | bytes |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for name, entry in plan.blocks.items():
        pb = per_block.get(name, {})
        lines.append(
            f"| `{name}` | {entry['bits']} | {entry.get('groups', 1)} | {_fmt(pb.get('sensitivity'))} | "
            f"{_fmt(pb.get('error'))} | {_fmt(pb.get('loss'))} | {pb['bytes']:,} |"
            if pb
            else f"| `{name}` | {entry['bits']} | {entry.get('groups', 1)} | - | - | - | - |"
        )
    lines.append("| everything else (LayerNorm, biases, token types, pooler, classifier) | 32 | - | - | - | - | - |")
    return "\n".join(lines) + "\n"


def plot_frontier(front: dict[str, Any], path: Path | str, plan: BitPlan | None = None) -> Path:
    """Size vs objective: the MILP frontier, Q-BERT's rank rule, the uniform plans and the chosen plan."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    pts = front["points"]
    ax.plot([q["mib"] for q in pts], [q["objective"] for q in pts], "-o", ms=3, label="MILP (exact)")
    rank = [q for q in pts if q.get("rank_mib") is not None]
    if rank:
        ax.scatter(
            [q["rank_mib"] for q in rank],
            [q["rank_objective"] for q in rank],
            marker="x",
            color="tab:orange",
            label="rank rule (Q-BERT)",
            zorder=3,
        )
    for u in front["uniform"]:
        ax.scatter([u["mib"]], [u["objective"]], marker="s", color="tab:red", zorder=4)
        ax.annotate(
            f"{u['bits']}-bit", (u["mib"], u["objective"]), textcoords="offset points", xytext=(5, 4), fontsize=8
        )
    if plan is not None:
        ax.scatter(
            [plan.predicted["mib"]],
            [plan.predicted["objective"]],
            marker="*",
            s=160,
            color="tab:green",
            zorder=5,
            label="chosen plan" if "reassigned_from" not in plan.source else f"{plan.method} plan (not the solver's)",
        )
    positive = [q["objective"] for q in pts if q["objective"] > 0]
    if positive and max(positive) / min(positive) > 100:
        ax.set_yscale("log")
    ax.set_xlabel("model size (MiB)")
    ax.set_ylabel(f"sum of {front['measure']} x ||Q(W)-W||^2")
    ax.set_title(f"bits {','.join(map(str, front['bits']))}, groups {front['groups']} (uniform plans: squares)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save_figure(fig, path, dpi=120)


def plan_kind(plan: BitPlan) -> str:
    """How a plan's widths were chosen, as the results table names it: ``uniform``, ``mixed (milp)``, or for a
    reassigned control ``mixed (milp-reversed)`` / ``mixed (milp-random, seed 1)``: never the solver's name alone."""
    if plan.method == "uniform":
        return "uniform"
    seed = plan.source.get("reassigned_from", {}).get("seed")
    return f"mixed ({plan.method}{'' if seed is None else f', seed {seed}'})"


def rounding_text(plan: BitPlan) -> str:
    """How a plan's weights round, as the results table names it: ``nearest`` or ``gptq (128 seq, damp 0.01)``."""
    g = plan.gptq or {}
    return (
        plan.rounding if plan.rounding == "nearest" else f"{plan.rounding} ({g['calib_samples']} seq, damp {g['damp']})"
    )


def _bits_text(plan: BitPlan) -> tuple[str, str, str, str]:
    """``(w-bits, e-bits, a-bits, groups)`` of a plan as the results table shows them."""
    enc = [e for b, e in plan.blocks.items() if b.startswith("encoder.")]
    widths = sorted({e["bits"] for e in enc})
    w = "/".join(map(str, widths)) if widths else "32"
    if len(widths) > 1:
        w += f" (avg {plan.predicted.get('encoder_avg_bits', float('nan')):.2f})"
    emb = plan.blocks.get("embeddings.word", {}).get("bits", 32)
    groups = sorted({str(e.get("groups", 1)) for e in enc})
    return w, str(emb), f"{plan.act_bits or 32}{act_range_text(plan, short=True)}", "/".join(groups) or "-"


def act_range_text(plan: BitPlan, *, short: bool = False) -> str:
    """How a plan's activation ranges are set, as plan.md (and, ``short``, the results table) say it; nothing for
    max, an EMA of max|x| (what plans made before the setting used, so their reports read the same)."""
    if plan.act_bits is None or plan.act_range == UNRECORDED["act_range"]:
        return ""
    if short:
        return f" ({plan.act_range})"
    what = {"percentile": f"the {ACT_PERCENTILE}th percentile of |x|", "mse": "MSE clipping", "dynamic": "per token"}
    return f" ({plan.act_range}: {what[plan.act_range]})"


# How each family's scores are headed in tables, and what they mean (report.md's note above the table).
METRIC_LABELS: dict[str, dict[str, str]] = {
    "classification": {"accuracy": "accuracy", "macro_f1": "macro-F1"},
    "token": {"f1": "entity F1", "precision": "entity precision", "recall": "entity recall", "accuracy": "token acc."},
    "qa": {"exact_match": "EM", "f1": "F1"},
}
METRIC_NOTES: dict[str, str] = {
    "classification": "Accuracy and macro-F1 on the dev split",
    "token": "Entity-level F1, precision and recall on the dev split (seqeval, CoNLL rules: an entity counts only "
    "with its exact span and type), and the accuracy of the tags of first sub-tokens",
    "qa": "SQuAD v1.1 exact match (EM) and token F1 on the dev questions (official normalisation, best over the "
    "gold answers; spans found by n-best search over every window of the context)",
}


def _scores(metrics: dict[str, Any], family: str) -> dict[str, Any]:
    return {k: metrics[k] for k in METRIC_COLUMNS[family]}


def _part_compression(plan: BitPlan, part: str) -> float | None:
    """The packed compression of the plan's ``encoder`` weights or ``embeddings`` tables (older plans: None)."""
    entry = plan.predicted.get(part)
    return entry.get("compression") if isinstance(entry, dict) else None


def _finetune_budget(run: RunFolder) -> tuple[int | None, int | None]:
    """``(examples seen, seed)`` of the run's fine-tuning (a reused checkpoint records neither: None)."""
    import json

    path = run.checkpoint / "metrics.json"
    if not path.exists():
        return None, None
    data = json.loads(path.read_text())
    config = data.get("config", {})
    epochs = config.get("epochs")
    seen = round(data["train_examples"] * epochs) if "train_examples" in data and epochs else None
    return seen, config.get("seed")


def _recipe(plan: ResolvedPlan) -> str:
    """A plan's own QAT recipe, for its row's method (`` (distill logits, learned steps)``; empty: the run's)."""
    parts = []
    own = plan.own_recipe
    if "distill" in own:
        parts.append(f"distill {own['distill']}")
    if "learn_scales" in own:
        parts.append("learned steps" if own["learn_scales"] else "steps from the range")
    return f" ({', '.join(parts)})" if parts else ""


def results_rows(run_dir: Path | str, plans: Sequence[ResolvedPlan] | None = None) -> list[dict[str, Any]]:
    """The results table of a run folder, from its JSON artifacts alone: one row per model, holding the task
    family's scores (:data:`~qbert_hessian.artifacts.METRIC_COLUMNS`) under their own keys and the family, the
    whole-model size and compression, the encoder weights' and the embedding tables' compression apart (Q-BERT's
    Table 1 reports the encoder's), and the training budget: examples seen and seed (direct rows train nothing;
    their seed is the calibration batches'). ``plans``: the run's plans (None: as its ``run.json`` records them)."""
    from .artifacts import RunRecord, StageResult

    run = RunFolder(Path(run_dir))
    base = StageResult.load(run.fp32)
    family = base.family
    fp32_bytes = base.bytes
    config = RunRecord.load(run.ledger).config
    seen, seed = _finetune_budget(run)
    rows = [
        {
            "method": "FP32 baseline",
            "plan": "-",
            "w_bits": "32",
            "e_bits": "32",
            "a_bits": "32",
            "groups": "-",
            "rounding": "-",
            "family": family,
            **_scores(base.metrics, family),
            "mib": fp32_bytes / 2**20,
            "compression": 1.0,
            "encoder_compression": 1.0,
            "embedding_compression": 1.0,
            "examples_seen": seen,
            "seed": seed,
        }
    ]
    calibration_seed = config.get("run", {}).get("seed")
    for run_plan in recorded_plans(config) if plans is None else plans:
        name = run_plan.name
        path = run.metrics(name)
        if not path.exists():
            continue
        res = StageResult.load(path)
        if res.family != family:
            raise QBHError(f"'{path}' holds {res.family} scores but the FP32 baseline {family} scores; rerun the run")
        plan = BitPlan.load(run.plan(name))
        w, e, a, g = _bits_text(plan)
        common = {
            "plan": name,
            "w_bits": w,
            "e_bits": e,
            "a_bits": a,
            "groups": g,
            "rounding": rounding_text(plan),
            "family": family,
            "mib": res.bytes / 2**20,
            "compression": fp32_bytes / res.bytes,
            "encoder_compression": _part_compression(plan, "encoder"),
            "embedding_compression": _part_compression(plan, "embeddings"),
        }
        kind = plan_kind(plan)
        direct = {"examples_seen": 0, "seed": calibration_seed}
        rows.append({"method": f"direct, {kind}", **common, **_scores(res.direct or {}, family), **direct})
        if res.qat:
            seed = run_plan.qat.seed if run_plan.qat is not None else None
            trained = {"examples_seen": res.examples_seen, "seed": seed}
            rows.append(
                {"method": f"QAT{_recipe(run_plan)}, {kind}", **common, **_scores(res.metrics, family), **trained}
            )
        onnx = run.onnx_metrics(name)
        if onnx.exists():  # [run] export = ["onnx"]: the same model scored from the ONNX file, sized as that file
            dep = StageResult.load(onnx)
            source = rows[-1]  # the packed model it was exported from (QAT when the plan trains)
            # the encoder and embedding ratios are the packed tensors', not the ONNX file's: left out
            size = {"mib": dep.bytes / 2**20, "compression": fp32_bytes / dep.bytes}
            size |= {"encoder_compression": None, "embedding_compression": None}
            row = {**source, **size, **_scores(dep.metrics, family)}
            rows.append({**row, "method": f"{source['method'].split(',')[0]} as ONNX int8, {kind}"})
    return rows


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def results_table(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`results_rows` as markdown, with their family's score columns."""
    family = rows[0].get("family", "classification") if rows else "classification"
    labels = METRIC_LABELS[family]
    head = " | ".join(["method", "plan", "w-bits", "e-bits", "a-bits", "groups", "rounding", *labels.values()])
    head += " | size MiB"
    tail = "compression | encoder comp. | embedding comp. | examples seen | seed"
    lines = [
        f"| {head} | {tail} |",
        f"|---|---|---|---:|---:|---|---|{'---:|' * len(labels)}---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        scores = " | ".join(f"{r[k]:.4f}" for k in labels)
        seen = r.get("examples_seen")
        lines.append(
            f"| {r['method']} | {r['plan']} | {r['w_bits']} | {r['e_bits']} | {r['a_bits']} | {r['groups']} | "
            f"{r.get('rounding', UNRECORDED['rounding'])} | {scores} | {r['mib']:.2f} | {r['compression']:.2f}x | "
            f"{_ratio(r.get('encoder_compression'))} | "
            f"{_ratio(r.get('embedding_compression'))} | {'-' if seen is None else f'{seen:,}'} | "
            f"{'-' if r.get('seed') is None else r['seed']} |"
        )
    return "\n".join(lines)


def write_run_report(run_dir: Path | str, plans: Sequence[ResolvedPlan] | None = None) -> Path:
    """``report.md`` of a run folder: the results table, the sensitivity plot, the plans and the frontier.
    ``plans``: the run's plans (None: as its ``run.json`` records them)."""
    from .artifacts import RunRecord

    run = RunFolder(Path(run_dir))
    config = RunRecord.load(run.ledger).config
    m = config["model"]
    plans = recorded_plans(config) if plans is None else plans
    rows = results_rows(run.root, plans)
    family = rows[0]["family"]
    kind = "" if family == "classification" else f" ({'NER' if family == 'token' else 'question answering'})"
    lines = [
        f"# Compression run: {m['name']} on {m['task']}{kind}",
        "",
        f"{METRIC_NOTES[family]}; packed sizes are bytes of `model.safetensors` on disk, compression is against "
        "the FP32 weights. Quantized rows are evaluated from their packed checkpoint (QAT rows) or by direct "
        "(post-training) quantization of the FP32 model.",
        "",
        results_table(rows),
        "",
        "## Sensitivity",
        "",
        "![sensitivity](sensitivity/sensitivity.png)",
        "",
        "Table: [sensitivity/sensitivity.md](sensitivity/sensitivity.md).",
        "",
        "## Plans",
        "",
    ]
    for name in (p.name for p in plans):
        path = run.plan(name)
        if path.exists():
            plan = BitPlan.load(path)
            enc = ", ".join(
                f"{b.split('.', 1)[1]}:{e['bits']}" for b, e in plan.blocks.items() if b.startswith("encoder.")
            )
            origin = plan.source.get("reassigned_from")
            how = (
                f"; **{plan_kind(plan)}**: the {origin['method']} plan's widths reassigned (objective "
                f"{plan.predicted['objective']:.4g} against the solver's {origin['objective']:.4g})"
                if origin
                else ""
            )
            lines.append(
                f"- [{name}](plans/{name}.md): encoder {enc}; predicted {plan.predicted['mib']:.2f} MiB"
                f" ({plan.predicted['bytes']:,} bytes){how}"
            )
    if run.frontier_figure.exists():
        lines += ["", "![frontier](plans/frontier.png)"]
    lines += ["", "## Settings", "", "Every number above was computed with these settings (`run.json`):", ""]
    for section in ("model", "finetune", "sensitivity", "allocate", "qat", "run"):
        values = ", ".join(f"{k}={v}" for k, v in config.get(section, {}).items() if v is not None)
        lines.append(f"- **{section}**: {values}")
    return write_text(run.report, "\n".join(lines) + "\n")


def _landscape_axes(ls: dict[str, Any]) -> tuple[str, str]:
    kind = ls["directions"].get("kind", "?")
    ev = ls["directions"].get("eigenvalues", [])
    if kind == "eigen":
        names = [f"eigenvector {i + 1} (lambda={v:.3g})" for i, v in enumerate(ev)]
        return (names + ["", ""])[0], (names + ["", ""])[1]
    if kind == "extreme":
        names = [
            f"{'largest' if v == max(ev) and len(ev) > 1 else 'smallest'} eigenvalue's vector (lambda={v:.3g})"
            for v in ev
        ]
        return (names + ["", ""])[0], (names + ["", ""])[1]
    return f"{kind} direction 1", f"{kind} direction 2"


def _draw_landscape(ax: Any, ls: dict[str, Any], kind: str) -> None:
    import numpy as np

    a, b = np.asarray(ls["alphas"]), np.asarray(ls["betas"])
    z = np.asarray([[np.nan if x is None else x for x in row] for row in ls["loss"]], dtype=float)
    xlabel, ylabel = _landscape_axes(ls)
    title = f"{ls['block']}" + ("" if np.isfinite(z).all() else " (partial)")
    if len(b) == 1:
        ax.plot(a, z[0], "-o", ms=3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss")
    elif kind == "surface":
        A, B = np.meshgrid(a, b)
        ax.plot_surface(A, B, np.ma.masked_invalid(z), cmap="viridis", linewidth=0, antialiased=True)
        ax.set_xlabel("alpha")
        ax.set_ylabel("beta")
        ax.set_zlabel("loss")
    else:
        cs = ax.contourf(a, b, np.ma.masked_invalid(z), levels=20, cmap="viridis")
        ax.contour(a, b, np.ma.masked_invalid(z), levels=10, colors="k", linewidths=0.4)
        ax.figure.colorbar(cs, ax=ax, label="loss")
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title)


def plot_landscapes(landscapes: list[dict[str, Any]], path: Path | str, *, titles: list[str] | None = None) -> Path:
    """One panel per landscape: a line (1-D), or a contour above a 3-D surface (2-D); side by side."""
    from matplotlib.figure import Figure

    n = len(landscapes)
    two_d = any(len(ls["betas"]) > 1 for ls in landscapes)
    fig = Figure(figsize=(5.0 * n, 8.6 if two_d else 3.8))
    for i, ls in enumerate(landscapes):
        if two_d:
            ax = fig.add_subplot(2, n, i + 1)
            _draw_landscape(ax, ls, "contour")
            ax3 = fig.add_subplot(2, n, n + i + 1, projection="3d")
            _draw_landscape(ax3, ls, "surface")
        else:
            ax = fig.add_subplot(1, n, i + 1)
            _draw_landscape(ax, ls, "line")
        if titles:
            ax.set_title(titles[i])
    fig.tight_layout()
    return _save_figure(fig, path, dpi=110)


def plot_density(densities: list[dict[str, Any]], path: Path | str, *, labels: list[str] | None = None) -> Path:
    """Eigenvalue densities (stochastic Lanczos quadrature) on a log scale."""
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for i, d in enumerate(densities):
        y = np.maximum(np.asarray(d["density"]), 1e-12)
        ax.semilogy(d["grid"], y, label=(labels[i] if labels else d.get("block")))
    ax.set_ylim(bottom=1e-6)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)")
    ax.set_title("Hessian eigenvalue density (stochastic Lanczos quadrature)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save_figure(fig, path, dpi=120)
