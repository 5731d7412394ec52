"""``qbert-hessian``: argument parsing only; every command is a thin call into the stage modules.

Exit codes: 0 success, 2 bad input (a :class:`QBHError` or a usage error, one line on stderr, nothing
half-written), 130 interrupted (finished work is kept; rerun with ``--resume``), 1 a crash (a bug).
Heavy imports (torch, transformers) happen inside the commands so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import QBHError

logger = logging.getLogger("qbert_hessian")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _add_data_args(p: argparse.ArgumentParser, *, max_length: int = 128) -> None:
    p.add_argument(
        "--task",
        required=True,
        help="bbc-news (offline default), a GLUE name (sst2, mnli ...), a hub dataset, or a data folder",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="folder with local train.* and dev.* files (tsv/csv/json/jsonl); default: $QBH_DATA_DIR",
    )
    p.add_argument("--text-columns", type=_csv, default=None, help="text column(s), comma-separated")
    p.add_argument("--label-column", default=None, help="label column")
    p.add_argument("--max-length", type=int, default=max_length, help="tokenizer truncation length")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the device follows the model)")


def _add_run_control(p: argparse.ArgumentParser, *, resume: str, force: str) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help=resume)
    p.add_argument("--force", action="store_true", help=force)
    _add_common(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qbert-hessian",
        description="Hessian-guided ultra-low-bit compression of BERT-family models (Q-BERT and beyond).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "finetune",
        help="fine-tune an FP32 baseline with transformers' Trainer",
        description="Fine-tune an FP32 baseline. Example: qbert-hessian finetune --model minilm-l6 "
        "--task sst2 --data ../shared/data/sst2 --max-train-samples 4000 --out runs/sst2/checkpoint",
    )
    p.add_argument("--model", required=True, help="minilm-l6, a local folder, or a hub name")
    _add_data_args(p)
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-train-samples", type=int, default=None, help="train on a seeded subset of this size")
    _add_run_control(
        p, resume="continue from the last Trainer checkpoint in OUT", force="overwrite a finished checkpoint in OUT"
    )

    p = sub.add_parser(
        "sensitivity",
        help="per-block Hessian sensitivity report (Q-BERT protocol)",
        description="Score every block by its top Hessian eigenvalue over data draws. Example: "
        "qbert-hessian sensitivity --model runs/sst2/checkpoint --task sst2 "
        "--data ../shared/data/sst2 --out runs/sst2/sensitivity",
    )
    p.add_argument("--model", required=True, help="a fine-tuned classifier: folder, hub name or minilm-l6")
    _add_data_args(p)
    p.add_argument("--out", type=Path, required=True, help="folder for sensitivity.{json,csv,md,png}")
    p.add_argument(
        "--blocks",
        type=_csv,
        default=None,
        help="comma-separated blocks or groups: default, layers, embedding-parts, linears, "
        "embeddings[.word|.position|.token_type], encoder.N[.query|.key|.value|.attn_out|.ffn_in|.ffn_out]",
    )
    p.add_argument("--draws", type=int, default=10, help="data draws (Q-BERT: 10)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches-per-draw", type=int, default=1)
    p.add_argument(
        "--method",
        choices=["lanczos", "power"],
        default="lanczos",
        help="eigen-solver: Lanczos (fewer products) or power iteration (Q-BERT, PyHessian)",
    )
    p.add_argument("--max-iters", type=int, default=100, help="cap on Hessian-vector products per eigenvalue")
    p.add_argument(
        "--tol",
        type=float,
        default=1e-3,
        help="relative accuracy at which to stop (Lanczos: error estimate; power: change per step)",
    )
    p.add_argument("--top-k", type=int, default=1, help="eigenvalues per block and draw")
    p.add_argument("--most-negative", action="store_true", help="also estimate the most negative eigenvalue")
    p.add_argument("--trace", choices=["block", "shared", "none"], default="block", help="Hutchinson trace mode")
    p.add_argument("--trace-samples", type=int, default=4, help="Rademacher probes per draw")
    p.add_argument("--no-warm-start", action="store_true", help="random start vector on every draw")
    p.add_argument(
        "--length-buckets",
        type=int,
        default=4,
        help="cut each batch into at most this many length-sorted micro-batches (same loss, less padding; 1: off)",
    )
    _add_run_control(
        p, resume="keep the finished blocks of OUT/sensitivity.json", force="overwrite an existing report in OUT"
    )

    p = sub.add_parser(
        "plan",
        help="bits per block under a memory budget (exact MILP), from a sensitivity report",
        description="Allocate bits per encoder block under one budget. Example: qbert-hessian plan "
        "--report runs/sst2/sensitivity --avg-bits 2.5 --out runs/sst2/plans/mixed-2.5.json",
    )
    p.add_argument("--report", type=Path, required=True, help="sensitivity.json or the folder holding it")
    p.add_argument("--out", type=Path, required=True, help="plan file to write (plan.md and plots go beside it)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-mb", type=float, help="whole-model size limit in MiB")
    budget.add_argument("--ratio", type=float, help="compression ratio vs FP32 to reach at least")
    budget.add_argument("--avg-bits", type=float, help="average bits per encoder weight")
    budget.add_argument("--uniform", type=int, metavar="BITS", help="every encoder block at BITS (no budget)")
    p.add_argument("--bits", type=_csv, default=["2", "3", "4", "8"], help="candidate widths (default 2,3,4,8)")
    p.add_argument("--groups", default="128", help="grouping of encoder matrices: 1, heads, an integer G, channel")
    p.add_argument("--measure", choices=["omega", "trace"], default="omega", help="sensitivity: Omega or trace/#params")
    p.add_argument("--method", choices=["milp", "rank"], default="milp", help="exact MILP or Q-BERT's rank rule")
    p.add_argument("--embedding-bits", type=int, default=8, help="word-embedding width (Q-BERT: 8)")
    p.add_argument("--position-bits", type=int, default=None, help="position-embedding width (default: as word)")
    p.add_argument("--embedding-groups", default="channel", help="embedding grouping: channel (per row), 1 or G")
    p.add_argument("--act-bits", type=int, default=8, help="activation width on quantized linears")
    p.add_argument("--no-act-quant", action="store_true", help="keep activations in FP32")
    p.add_argument("--model", default=None, help="the report's model, to measure ||Q(W)-W||^2 if the report lacks it")
    p.add_argument("--frontier", action="store_true", help="also sweep budgets: frontier.json and frontier.png")
    p.add_argument("--force", action="store_true", help="overwrite an existing plan")
    _add_common(p)

    p = sub.add_parser(
        "quantize",
        help="apply a plan (direct quantization) and write a packed checkpoint",
        description="Quantize a fine-tuned model with a plan and write the bit-packed checkpoint. Example: "
        "qbert-hessian quantize --model runs/sst2/checkpoint --plan plan.json --task sst2 "
        "--data ../shared/data/sst2 --out runs/sst2/packed",
    )
    p.add_argument("--model", required=True, help="the FP32 fine-tuned classifier")
    p.add_argument("--plan", type=Path, required=True, help="plan.json from qbert-hessian plan")
    _add_data_args(p)
    p.add_argument("--out", type=Path, required=True, help="packed checkpoint folder to write")
    p.add_argument("--calibration-batches", type=int, default=8, help="training batches that set activation ranges")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite an existing packed checkpoint")
    _add_common(p)

    p = sub.add_parser(
        "evaluate",
        help="task metric of an FP32 model, its direct quantization under plans, and packed checkpoints",
        description="Evaluate on the dev split. Example: qbert-hessian evaluate --model runs/sst2/checkpoint "
        "--task sst2 --data ../shared/data/sst2 --plan plan.json --packed runs/sst2/packed",
    )
    p.add_argument("--model", required=True, help="an FP32 checkpoint or a packed checkpoint folder")
    _add_data_args(p)
    p.add_argument("--plan", type=Path, action="append", default=[], help="also evaluate direct quantization (repeat)")
    p.add_argument("--packed", type=Path, action="append", default=[], help="also evaluate a packed folder (repeat)")
    p.add_argument("--calibration-batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="metrics.json to write")
    _add_common(p)

    p = sub.add_parser(
        "landscape",
        help="1-D/2-D loss surfaces of blocks along Hessian eigenvectors, random or gradient directions",
        description="Loss on a grid around a block's weights. Example: qbert-hessian landscape --model "
        "runs/sst2/checkpoint --task sst2 --data ../shared/data/sst2 --block encoder.0,encoder.5 "
        "--directions eigen --grid 21 --out runs/sst2/landscape",
    )
    p.add_argument("--model", required=True, help="an FP32 checkpoint or a packed checkpoint folder")
    _add_data_args(p)
    p.add_argument("--block", type=_csv, required=True, help="block(s), comma-separated, or 'model' for all weights")
    p.add_argument("--directions", choices=["eigen", "random", "gradient"], default="eigen")
    p.add_argument("--dims", type=int, choices=[1, 2], default=2)
    p.add_argument("--grid", type=int, default=21, help="points per axis (Q-BERT: 21)")
    p.add_argument("--range", dest="radius", type=float, default=0.4, help="axes run over [-R, R] (Q-BERT: 0.4)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=2, help="fixed batches averaged at every grid point")
    p.add_argument("--split", choices=["train", "dev"], default="train")
    p.add_argument("--out", type=Path, required=True, help="folder: <block>/landscape.{json,png} and panels.png")
    _add_run_control(p, resume="keep the finished rows of existing landscapes", force="overwrite existing landscapes")

    p = sub.add_parser(
        "density",
        help="Hessian eigenvalue density of blocks by stochastic Lanczos quadrature",
        description="Eigenvalue density of a block's Hessian. Example: qbert-hessian density --model "
        "runs/sst2/checkpoint --task sst2 --data ../shared/data/sst2 --block encoder.0 --out runs/sst2/density",
    )
    p.add_argument("--model", required=True)
    _add_data_args(p)
    p.add_argument("--block", type=_csv, required=True, help="block(s), comma-separated, or 'model'")
    p.add_argument("--steps", type=int, default=80, help="Lanczos steps per probe (memory: this many vectors)")
    p.add_argument("--probes", type=int, default=1, help="Rademacher probes averaged")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, required=True, help="folder for density.json and density.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite an existing density.json")
    _add_common(p)

    p = sub.add_parser(
        "run",
        help="the whole pipeline from a TOML config: finetune, sensitivity, plans, quantization, QAT, report",
        description="Run every stage; finished stages are skipped, so an interrupted run continues where it "
        "stopped. Example: qbert-hessian run experiments/sst2_minilm.toml --set qat.epochs=1",
    )
    p.add_argument(
        "config", type=Path, help="TOML file: [model], [finetune], [sensitivity], [allocate], [[plans]], [qat], [run]"
    )
    p.add_argument("--out", type=Path, default=None, help="run folder (default: the config's 'out')")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set sensitivity.draws=5 (repeatable)",
    )
    p.add_argument("--model", default=None, help="override [model] name")
    p.add_argument("--task", default=None, help="override [model] task")
    p.add_argument("--data", default=None, help="override [model] data")
    p.add_argument("--force", action="store_true", help="recompute every stage")
    _add_common(p)

    p = sub.add_parser(
        "demo",
        help="the offline default: MiniLM-L6 on BBC News through the whole pipeline (about 10 minutes on 2 cores)",
        description="Fine-tune MiniLM-L6 on BBC News, score its layers, plan 2/3/4-bit models, quantize, "
        "recover with QAT, export packed checkpoints and write report.md. Finished stages are reused.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--force", action="store_true", help="recompute every stage")
    _add_common(p)
    return parser


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _raw_task(args: argparse.Namespace):
    from .tasks import load_raw_task

    data = args.data or (Path(os.environ["QBH_DATA_DIR"]) if os.environ.get("QBH_DATA_DIR") else None)
    return load_raw_task(args.task, data_dir=data, text_columns=args.text_columns, label_column=args.label_column)


def cmd_finetune(args: argparse.Namespace) -> int:
    from .config import FinetuneConfig
    from .models import load_model
    from .tasks import subset, tokenize_task
    from .train import finetune

    if (args.out / "metrics.json").exists() and not (args.force or args.resume):
        raise QBHError(f"'{args.out}' already holds a fine-tuned checkpoint; pass --force to overwrite it")
    config = FinetuneConfig(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        max_train_samples=args.max_train_samples,
        max_length=args.max_length,
        seed=args.seed,
    )
    raw = subset(_raw_task(args), config.max_train_samples, config.seed)
    model, tokenizer = load_model(
        args.model, num_labels=len(raw.label_names), label_names=raw.label_names, eager=False, device=args.device
    )
    task = tokenize_task(raw, tokenizer, max_length=config.max_length)
    result = finetune(model, task, config, args.out, model_name=args.model, resume=args.resume, progress=not args.quiet)
    m = result["metrics"]
    print(
        f"dev accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f} on {m['num_examples']} examples; "
        f"checkpoint in {args.out}"
    )
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from .artifacts import SensitivityReport
    from .config import SensitivityConfig
    from .hessian.sensitivity import estimate_sensitivity
    from .models import is_classifier, load_model
    from .report import write_sensitivity
    from .tasks import tokenize_task

    config = SensitivityConfig(
        draws=args.draws,
        batch_size=args.batch_size,
        batches_per_draw=args.batches_per_draw,
        method=args.method,
        max_iters=args.max_iters,
        tol=args.tol,
        top_k=args.top_k,
        most_negative=args.most_negative,
        trace=args.trace,
        trace_samples=args.trace_samples,
        warm_start=not args.no_warm_start,
        length_buckets=args.length_buckets,
        seed=args.seed,
        max_length=args.max_length,
    )
    existing = args.out / "sensitivity.json"
    resume = None
    if existing.exists():
        if args.resume:
            resume = SensitivityReport.load(existing)
        elif not args.force:
            raise QBHError(f"'{existing}' exists; pass --resume to continue it or --force to overwrite it")
    raw = _raw_task(args)
    model, tokenizer = load_model(args.model, num_labels=len(raw.label_names), eager=True, device=args.device)
    if not is_classifier(args.model):
        logger.warning(
            "'%s' has no trained classifier head; fine-tune it first (qbert-hessian finetune) "
            "or the curvature describes a random head",
            args.model,
        )
    task = tokenize_task(raw, tokenizer, max_length=config.max_length)
    # Validate the blocks before any output is written.
    from .models import BlockMap

    BlockMap(model).expand(args.blocks)
    try:
        report = estimate_sensitivity(
            model,
            task,
            config,
            blocks=args.blocks,
            model_name=args.model,
            resume=resume,
            on_block=lambda r: write_sensitivity(r, args.out),
            progress=not args.quiet,
        )
    except KeyboardInterrupt:
        print(f"interrupted; the finished blocks are in {existing}; rerun with --resume to continue", file=sys.stderr)
        return 130
    if report.complete and report.quantization is None:
        from .quant.apply import report_profile

        report.quantization = report_profile(model, [b.name for b in report.blocks])
    write_sensitivity(report, args.out)
    print((args.out / "sensitivity.md").read_text(encoding="utf-8"))
    print(f"report in {args.out}")
    return 0


def _report_path(path: Path) -> Path:
    return path / "sensitivity.json" if path.is_dir() else path


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def cmd_plan(args: argparse.Namespace) -> int:
    from .allocate import AllocConfig, Budget, allocate_bits, frontier, uniform_plan
    from .artifacts import SensitivityReport, write_json, write_text
    from .config import parse_groups
    from .report import plan_markdown, plot_frontier

    out = args.out if args.out.suffix == ".json" else args.out / "plan.json"
    if out.exists() and not args.force:
        raise QBHError(f"'{out}' exists; pass --force to overwrite it")
    report_path = _report_path(args.report)
    report = SensitivityReport.load(report_path)
    if not report.complete:
        raise QBHError(f"'{report_path}' is partial ({', '.join(report.pending)} pending); finish it with --resume")
    try:
        bits = tuple(int(b) for b in args.bits)
    except ValueError:
        raise QBHError(f"--bits {','.join(args.bits)} is not a list of integers; e.g. --bits 2,3,4,8") from None
    config = AllocConfig(
        bits=(args.uniform,) if args.uniform is not None else bits,
        groups=args.groups,
        measure=args.measure,
        method=args.method,
        embedding_bits=args.embedding_bits,
        position_bits=args.position_bits,
        embedding_groups=args.embedding_groups,
        act_bits=None if args.no_act_quant else args.act_bits,
    )
    if args.model is not None:
        _ensure_profile(report, report_path, args.model, config, parse_groups)
    source = {"sensitivity": str(report_path), "sha256": _sha256(report_path)}
    if args.uniform is not None:
        plan = uniform_plan(report, args.uniform, config, source=source)
    else:
        budget = Budget(max_mb=args.budget_mb, ratio=args.ratio, avg_bits=args.avg_bits)
        plan = allocate_bits(report, budget, config, source=source)
    front = frontier(report, dataclasses.replace(config, method="milp")) if args.frontier else None
    plan.save(out)
    md = write_text(out.with_suffix(".md"), plan_markdown(plan))
    if front is not None:
        write_json(out.parent / "frontier.json", front)
        plot_frontier(front, out.parent / "frontier.png", plan)
    print(md.read_text(encoding="utf-8"))
    print(f"plan in {out}" + (f"; frontier in {out.parent / 'frontier.png'}" if front else ""))
    return 0


def _ensure_profile(report, report_path: Path, model_name: str, config, parse_groups) -> None:
    """Measure ||Q(W)-W||^2 on the model when the report lacks the grouping or widths the plan needs."""
    from .models import BlockMap, load_model
    from .quant.apply import DEFAULT_PROFILE_GROUPS, report_profile

    prof = report.quantization or {}
    unit = next((b.name for b in report.blocks if b.name.startswith("encoder.")), None)
    have = prof.get("units", {}).get(unit, {}).get("groups", {}) if unit else {}
    needed = {str(config.groups)} - set(have) - set(prof.get("units", {}).get(unit, {}).get("unavailable", {}))
    if prof and not needed:
        return
    model, _ = load_model(model_name, eager=False)
    block_map = BlockMap(model)
    if report.model.get("num_layers") != block_map.num_layers:
        raise QBHError(f"--model {model_name} is not the report's model ({report.model.get('name')}); pass that one")
    groups = list(dict.fromkeys([*DEFAULT_PROFILE_GROUPS, parse_groups(config.groups)]))
    logger.info("measuring quantization errors of %s (groups %s)", model_name, groups)
    report.quantization = report_profile(model, [b.name for b in report.blocks], groups=groups)
    report.save(report_path)


def _direct(model, plan, task, args: argparse.Namespace):
    """The plan applied to ``model`` with its activation ranges calibrated (direct quantization)."""
    from .quant.apply import quantize_calibrated

    return quantize_calibrated(
        model, plan, task, num_batches=args.calibration_batches, batch_size=args.batch_size, seed=args.seed
    )


def cmd_quantize(args: argparse.Namespace) -> int:
    from .allocate import MIB
    from .artifacts import BitPlan, write_json
    from .export import file_sizes, fp32_safetensors_bytes, save_packed
    from .models import load_model
    from .tasks import tokenize_task

    if args.out.exists() and not args.force:
        raise QBHError(f"'{args.out}' exists; pass --force to overwrite it")
    plan = BitPlan.load(args.plan)
    raw = _raw_task(args)
    model, tokenizer = load_model(args.model, num_labels=len(raw.label_names), eager=False, device=args.device)
    task = tokenize_task(raw, tokenizer, max_length=args.max_length)
    qmodel = _direct(model, plan, task, args)  # validates the plan against the model before anything is written
    weights = save_packed(qmodel, args.out, tokenizer=tokenizer)
    sizes = file_sizes(args.out)
    fp32 = fp32_safetensors_bytes(model)
    predicted = plan.predicted.get("bytes")
    size = {
        "packed_bytes": sizes["weights_bytes"],
        "packed_mib": sizes["weights_bytes"] / MIB,
        "folder_bytes": sizes["folder_bytes"],
        "fp32_safetensors_bytes": fp32,
        "fp32_mib": fp32 / MIB,
        "compression": fp32 / sizes["weights_bytes"],
        "predicted_bytes": predicted,
        "predicted_error": (sizes["weights_bytes"] - predicted) / predicted if predicted else None,
    }
    write_json(args.out / "size.json", size)
    print(
        f"packed checkpoint {weights}: {size['packed_mib']:.3f} MiB on disk vs FP32 safetensors {size['fp32_mib']:.3f} "
        f"MiB ({size['compression']:.2f}x smaller)"
        + (f"; plan predicted {predicted / MIB:.3f} MiB ({100 * size['predicted_error']:+.2f}%)" if predicted else "")
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .allocate import MIB
    from .artifacts import METRICS_SCHEMA, BitPlan, write_json
    from .evaluate import evaluate
    from .export import file_sizes, is_packed, load_packed
    from .models import load_model
    from .tasks import tokenize_task

    raw = _raw_task(args)
    rows = []
    packed = list(args.packed)
    plans = [(p, BitPlan.load(p)) for p in args.plan]  # refuse bad plans before any work
    for p in packed:
        if not is_packed(p):
            raise QBHError(f"'{p}' is not a packed checkpoint (no quantization.json); export one with quantize")
    if is_packed(args.model):
        packed.insert(0, Path(args.model))
        if plans:
            raise QBHError("--plan needs an FP32 --model; pass the fine-tuned checkpoint, not a packed one")
    else:
        model, tokenizer = load_model(args.model, num_labels=len(raw.label_names), eager=False, device=args.device)
        task = tokenize_task(raw, tokenizer, max_length=args.max_length)
        state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        rows.append({"name": "fp32", "kind": "fp32", "size_mib": state_bytes / MIB, **evaluate(model, task)})
        for path, plan in plans:
            qmodel = _direct(model, plan, task, args)
            rows.append(
                {"name": str(path), "kind": "direct", "size_mib": plan.predicted.get("mib"), **evaluate(qmodel, task)}
            )
    for p in packed:
        from transformers import AutoTokenizer

        qmodel = load_packed(p, device=args.device)
        task = tokenize_task(raw, AutoTokenizer.from_pretrained(p), max_length=args.max_length)
        rows.append(
            {
                "name": str(p),
                "kind": "packed",
                "size_mib": file_sizes(p)["weights_bytes"] / MIB,
                **evaluate(qmodel, task),
            }
        )
    print("| model | kind | size MiB | accuracy | macro-F1 | loss |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        size = f"{r['size_mib']:.3f}" if r["size_mib"] is not None else "-"
        print(f"| {r['name']} | {r['kind']} | {size} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {r['loss']:.4f} |")
    if args.out:
        write_json(args.out, {"schema": METRICS_SCHEMA, "task": args.task, "results": rows})
    return 0


def _load_any(args: argparse.Namespace, raw, *, eager: bool = True):
    """An FP32 checkpoint or a packed one, with the tokenized task."""
    from transformers import AutoTokenizer

    from .export import is_packed, load_packed
    from .models import load_model
    from .tasks import tokenize_task

    if is_packed(args.model):
        model, tokenizer = (
            load_packed(args.model, eager=eager, device=args.device),
            AutoTokenizer.from_pretrained(args.model),
        )
    else:
        model, tokenizer = load_model(args.model, num_labels=len(raw.label_names), eager=eager, device=args.device)
    return model, tokenize_task(raw, tokenizer, max_length=args.max_length)


def _check_blocks(model, blocks: list[str]) -> None:
    from .landscape import WHOLE_MODEL
    from .models import BlockMap

    block_map = BlockMap(model)
    for b in blocks:
        if b != WHOLE_MODEL:
            block_map.module_path(b)


def cmd_landscape(args: argparse.Namespace) -> int:
    from .landscape import Landscape, LandscapeConfig, loss_landscape
    from .report import plot_landscapes

    config = LandscapeConfig(
        directions=args.directions,
        dims=args.dims,
        grid=args.grid,
        radius=args.radius,
        batch_size=args.batch_size,
        num_batches=args.batches,
        split=args.split,
        seed=args.seed,
    )
    for b in args.block:
        path = args.out / b / "landscape.json"
        if path.exists() and not (args.resume or args.force):
            raise QBHError(f"'{path}' exists; pass --resume to continue it or --force to overwrite it")
    raw = _raw_task(args)
    model, task = _load_any(args, raw)
    _check_blocks(model, args.block)
    done = []
    for b in args.block:
        path = args.out / b / "landscape.json"
        resume = Landscape.load(path) if path.exists() and args.resume else None
        if resume is not None and resume.complete and resume.config == config.to_dict():
            done.append(resume)
            continue

        def save(ls: Landscape, path: Path = path) -> None:
            ls.save(path)

        try:
            ls = loss_landscape(
                model, task, config, block=b, model_name=args.model, resume=resume, on_row=save, progress=not args.quiet
            )
        except KeyboardInterrupt:
            print(f"interrupted; finished rows are in {path}; rerun with --resume to continue", file=sys.stderr)
            return 130
        ls.save(path)
        plot_landscapes([ls.to_dict()], path.with_suffix(".png"))
        done.append(ls)
        print(
            f"{b}: loss {ls.center_loss:.4f} at the weights, {min(min(r) for r in ls.loss):.4f} .. "
            f"{max(max(r) for r in ls.loss):.4f} on the grid; {path}"
        )
    if len(done) > 1:
        plot_landscapes([ls.to_dict() for ls in done], args.out / "panels.png")
        print(f"side by side: {args.out / 'panels.png'}")
    return 0


def cmd_density(args: argparse.Namespace) -> int:
    import torch

    from .artifacts import write_json
    from .hessian.density import slq_density, smooth_alike
    from .hessian.hvp import BlockHessian, curvature_mode, grads_enabled
    from .landscape import block_parameters
    from .report import plot_density

    if args.steps < 1 or args.probes < 1:
        raise QBHError(f"--steps {args.steps} and --probes {args.probes} must both be at least 1")
    out = args.out / "density.json"
    if out.exists() and not args.force:
        raise QBHError(f"'{out}' exists; pass --force to overwrite it")
    raw = _raw_task(args)
    model, task = _load_any(args, raw)
    _check_blocks(model, args.block)
    n = min(args.batch_size, len(task.train))
    batch = task.batch("train", list(range(n)))
    found = []
    generator = torch.Generator().manual_seed(args.seed)
    with curvature_mode(model):
        for b in args.block:
            params = block_parameters(model, b)
            with grads_enabled(params):
                hvp = BlockHessian(model, params, [batch])
                res = slq_density(hvp, params, steps=args.steps, num_probes=args.probes, generator=generator)
                hvp.free()
            found.append((b, sum(p.numel() for p in params), res))
            lo, hi = res.extremes
            print(f"{b}: Ritz values from {lo:.4g} to {hi:.4g}; mean eigenvalue (trace/n) {res.moment(1):.4g}")
    smooth_alike([r for _, _, r in found])  # one kernel width, so the curves compare
    results = [{"block": b, "num_params": n, **r.to_dict()} for b, n, r in found]
    write_json(
        out,
        {
            "schema": "qbert_hessian.density/1",
            "model": args.model,
            "task": args.task,
            "batch_size": n,
            "probes": args.probes,
            "densities": results,
        },
    )
    plot_density(results, args.out / "density.png")
    print(f"density in {out} and {args.out / 'density.png'}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import Run, load_run_config

    overrides = list(args.overrides)
    overrides += [f"model.{k}={_toml_str(v)}" for k in ("model", "task", "data") if (v := getattr(args, k))]
    overrides = [o.replace("model.model=", "model.name=") for o in overrides]
    config = load_run_config(args.config, overrides)
    out = args.out or (Path(config.out) if config.out else None)
    if out is None:
        raise QBHError("the run has no output folder; pass --out DIR or set out = '...' in the config")
    return _execute(Run(config, out, force=args.force, progress=not args.quiet))


def _toml_str(value: str) -> str:
    import json

    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _execute(run) -> int:
    try:
        report = run.execute()
    except KeyboardInterrupt:
        print(
            f"interrupted; finished stages are kept in {run.out}; rerun the same command to continue", file=sys.stderr
        )
        return 130
    print(report.read_text(encoding="utf-8"))
    print(f"report: {report}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole pipeline on the offline default (MiniLM-L6, BBC News), sized for 2 CPU cores."""
    from .pipeline import DEMO_CONFIG, Run, apply_overrides, parse_run_config

    config = parse_run_config(apply_overrides(DEMO_CONFIG, args.overrides))
    return _execute(Run(config, args.out, force=args.force, progress=not args.quiet))


COMMANDS = {
    "finetune": cmd_finetune,
    "sensitivity": cmd_sensitivity,
    "plan": cmd_plan,
    "quantize": cmd_quantize,
    "evaluate": cmd_evaluate,
    "landscape": cmd_landscape,
    "density": cmd_density,
    "run": cmd_run,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.quiet)
    try:
        return COMMANDS[args.command](args)
    except QBHError as exc:
        print(f"qbert-hessian {args.command}: error: {exc}", file=sys.stderr)
        return 2


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
