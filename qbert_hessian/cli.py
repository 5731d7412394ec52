"""``qbert-hessian``: argument parsing only; every command is a thin call into the stage modules.

Exit codes: 0 success, 2 bad input (a :class:`QBHError` or a usage error, one line on stderr, nothing
half-written), 130 interrupted (finished work is kept; rerun with ``--resume``), 1 a crash (a bug).
Heavy imports (torch, transformers) happen inside the commands so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import QBHError

logger = logging.getLogger("qbert_hessian")

DEMO_MODEL = "minilm-l6"
DEMO_TASK = "bbc-news"


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
    p.add_argument("--tol", type=float, default=1e-3, help="relative change of the eigenvalue at which to stop")
    p.add_argument("--top-k", type=int, default=1, help="eigenvalues per block and draw")
    p.add_argument("--most-negative", action="store_true", help="also estimate the most negative eigenvalue")
    p.add_argument("--trace", choices=["block", "shared", "none"], default="block", help="Hutchinson trace mode")
    p.add_argument("--trace-samples", type=int, default=4, help="Rademacher probes per draw")
    p.add_argument("--no-warm-start", action="store_true", help="random start vector on every draw")
    _add_run_control(
        p, resume="keep the finished blocks of OUT/sensitivity.json", force="overwrite an existing report in OUT"
    )

    p = sub.add_parser(
        "demo",
        help="the offline default: fine-tune MiniLM-L6 on BBC News, then its sensitivity",
        description="Run the main job on the offline default (MiniLM-L6, BBC News). Finished stages "
        "are reused; the path of the report is printed at the end.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--draws", type=int, default=5)
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
    write_sensitivity(report, args.out)
    print((args.out / "sensitivity.md").read_text(encoding="utf-8"))
    print(f"report in {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Fine-tune (once) and score MiniLM-L6 on BBC News; sized for 2 CPU cores."""
    ckpt = args.out / "checkpoint"
    common = ["--task", DEMO_TASK, "--max-length", "128"] + (["--quiet"] if args.quiet else [])
    if not (ckpt / "metrics.json").exists():
        print(f"[demo] fine-tuning {DEMO_MODEL} on {DEMO_TASK} -> {ckpt}")
        rc = main(
            [
                "finetune",
                "--model",
                DEMO_MODEL,
                *common,
                "--out",
                str(ckpt),
                "--epochs",
                "2",
                "--batch-size",
                "16",
                "--lr",
                "1e-4",
                "--resume",
            ]
        )
        if rc:
            return rc
    else:
        print(f"[demo] reusing the fine-tuned checkpoint in {ckpt}")
    sens = args.out / "sensitivity"
    print(f"[demo] Hessian sensitivity -> {sens}")
    rc = main(
        [
            "sensitivity",
            "--model",
            str(ckpt),
            *common,
            "--out",
            str(sens),
            "--draws",
            str(args.draws),
            "--batch-size",
            "16",
            "--resume",
        ]
    )
    if rc == 0:
        print(f"[demo] done: {sens / 'sensitivity.md'}")
    return rc


COMMANDS = {"finetune": cmd_finetune, "sensitivity": cmd_sensitivity, "demo": cmd_demo}


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
