"""``qbert-hessian``: argument parsing only; every command is a thin call into the stage modules.

Exit codes: 0 success, 2 bad input (a :class:`QBHError` or a usage error, one line on stderr, nothing
half-written), 130 interrupted (finished work is kept; rerun with ``--resume``), 1 a crash (a bug).
Heavy imports (torch, transformers) happen inside the commands so ``--help`` is fast.

Launched by ``torchrun`` or ``accelerate launch`` (``-m qbert_hessian``), every process runs the same command:
the world is read from the environment and checked, each command checks its inputs, then joins the process
group (so a bad input fails at once on every rank, not after a rendezvous); rank 0 alone prints, logs, draws
progress bars and writes. ``plan``, ``quantize`` and ``evaluate`` are light and run in one process only.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import re
import signal
import sys
import types
import typing
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

from .allocate import MIB
from .config import (
    RANGE_METHODS,
    AllocConfig,
    Assign,
    CalibrationConfig,
    DensityConfig,
    FinetuneConfig,
    LandscapeConfig,
    PlanSpec,
    Precision,
    SensitivityConfig,
)
from .errors import QBHError

logger = logging.getLogger("qbert_hessian")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text} is not a list of integers; e.g. 2,3,4,8") from None


def _int_or_str(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


def _parse_type(hint: Any) -> Callable[[str], Any]:
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = [t for t in (typing.get_args(hint) if union else (hint,)) if t is not type(None)]
    if typing.get_origin(options[0]) is tuple:
        return _int_list
    if int in options and str in options:
        return _int_or_str
    return options[0] if options[0] in (int, float) else str


def _add_config(p: argparse.ArgumentParser, cls: type, *, skip: Sequence[str] = (), **flags: str) -> None:
    """One option per field of the config class ``cls``: its default, type and help text (the class docstring's
    ``Args:`` line) come from the class, so each lives in one place. ``flags`` renames a field's option."""
    helps, hints = cls.field_help(), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = flags.get(f.name, "--" + f.name.replace("_", "-"))
        default, hint = f.default, hints[f.name]
        kwargs: dict[str, Any] = {"dest": f.name, "help": helps[f.name].replace("%", "%%")}
        if hint is bool:
            kwargs["action"] = "store_false" if default else "store_true"
            flag = flags.get(f.name, f"--no-{f.name.replace('_', '-')}" if default else flag)
        elif isinstance(default, Enum):
            kwargs.update(choices=[m.value for m in type(default)], default=default.value)
        else:
            kwargs.update(type=_parse_type(hint), default=default)
            if isinstance(default, tuple):
                kwargs["default"] = ",".join(map(str, default))
        p.add_argument(flag, **kwargs)


def _from_args(cls: type, args: argparse.Namespace, **values: Any) -> Any:
    """The config ``cls`` from the parsed options of its fields (and ``values``); its own validation turns bad
    values into one-line errors."""
    for f in dataclasses.fields(cls):
        if f.name not in values and hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)  # string defaults went through the option's type already
    return cls(**values)


def _add_data_args(p: argparse.ArgumentParser, *, max_length: int = SensitivityConfig.max_length) -> None:
    p.add_argument(
        "--task",
        required=True,
        help="bbc-news (offline default), a GLUE name (sst2, mnli ...), conll03, squad, squad-local, squad-full "
        "(all train*.json articles, scored on dev*.json), mnli-local (MNLI from its two dev files: trains on "
        "dev_mismatched, scores dev_matched; not GLUE's protocol; mnli-local-mm: the other way round), a hub "
        "dataset, or a data folder",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="folder with local train.* and dev.* files (tsv/csv/json/jsonl; CoNLL columns; SQuAD JSON); "
        "default: $QBH_DATA_DIR",
    )
    p.add_argument("--text-columns", type=_csv, default=None, help="text column(s), comma-separated")
    p.add_argument("--label-column", default=None, help="label column")
    p.add_argument("--max-length", type=int, default=max_length, help="tokenizer truncation length")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer; e.g. 2000")
    return value


def _add_max_eval(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--max-eval-samples", type=_positive_int, default=None, help=help)


def _add_common(p: argparse.ArgumentParser, *, device: bool = True) -> None:
    if device:
        p.add_argument("--device", default="cpu", help="where the model runs: cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")


def _add_files(p: argparse.ArgumentParser, *, model: str, out: str, force: str, resume: str | None = None) -> None:
    p.add_argument("--model", required=True, help=model)
    _add_data_args(p)
    p.add_argument("--out", type=Path, required=True, help=out)
    if resume:
        p.add_argument("--resume", action="store_true", help=resume)
    p.add_argument("--force", action="store_true", help=force)


ANY_MODEL = "an FP32 checkpoint or a packed checkpoint folder"


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (required, unset or a plain switch)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qbert-hessian",
        description="Hessian-guided ultra-low-bit compression of BERT-family models (Q-BERT and beyond).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser = functools.partial(sub.add_parser, formatter_class=_Formatter)  # type: ignore[method-assign]

    p = sub.add_parser(
        "finetune",
        help="fine-tune an FP32 baseline with transformers' Trainer",
        description="Fine-tune an FP32 baseline. Example: qbert-hessian finetune --model minilm-l6 "
        "--task sst2 --data ../shared/data/sst2 --max-train-samples 4000 --out runs/sst2/checkpoint",
    )
    _add_files(
        p,
        model="minilm-l6, a local folder, or a hub name",
        out="checkpoint folder to write",
        resume="continue from the last Trainer checkpoint in OUT",
        force="overwrite a finished checkpoint in OUT",
    )
    _add_config(p, FinetuneConfig, skip=["max_length"])
    _add_max_eval(p, "score the checkpoint on a subset of this many dev examples, drawn with --seed (default: all)")
    _add_common(p)

    p = sub.add_parser(
        "sensitivity",
        help="per-block Hessian sensitivity report (Q-BERT protocol)",
        description="Score every block by its top Hessian eigenvalue over data draws. Example: "
        "qbert-hessian sensitivity --model runs/sst2/checkpoint --task sst2 "
        "--data ../shared/data/sst2 --out runs/sst2/sensitivity",
    )
    _add_files(
        p,
        model="a fine-tuned model (classifier, token tagger or QA): folder, hub name or minilm-l6",
        out="folder for sensitivity.{json,csv,md,png} and profile.json",
        resume="continue OUT/sensitivity.json from its finished blocks and draws (OUT/sensitivity.state.pt)",
        force="overwrite an existing report in OUT",
    )
    p.add_argument(
        "--blocks",
        type=_csv,
        default=None,
        help="comma-separated blocks or groups: default, layers, embedding-parts, linears, "
        "embeddings[.word|.position|.token_type], encoder.N[.query|.key|.value|.attn_out|.ffn_in|.ffn_out]",
    )
    _add_config(p, SensitivityConfig, skip=["max_length"])
    _add_common(p)

    p = sub.add_parser(
        "plan",
        help="bits per block under a memory budget (exact MILP), from a sensitivity report",
        description="Allocate bits per encoder block under one budget. Example: qbert-hessian plan "
        "--report runs/sst2/sensitivity --avg-bits 2.5 --out runs/sst2/plans/mixed-2.5.json",
    )
    p.add_argument("--report", type=Path, required=True, help="sensitivity.json or the folder holding it")
    p.add_argument("--out", type=Path, required=True, help="plan file to write (plan.md and plots go beside it)")
    budget = p.add_mutually_exclusive_group(required=True)
    helps = PlanSpec.field_help()
    for name in ("budget_mb", "ratio", "avg_bits"):
        budget.add_argument("--" + name.replace("_", "-"), type=float, help=helps[name])
    budget.add_argument("--uniform", type=int, metavar="BITS", help=helps["uniform"])
    p.add_argument("--assign", choices=[a.value for a in Assign], default=None, help=helps["assign"])
    p.add_argument("--assign-seed", type=int, default=None, help=helps["assign_seed"])
    _add_config(p, AllocConfig, range_method="--weight-range")
    p.add_argument("--no-act-quant", action="store_true", help="keep activations in FP32")
    p.add_argument(
        "--model",
        default=None,
        help="the report's model, to measure ||Q(W)-W||^2 if profile.json lacks it (or has another --weight-range), "
        "or with --measure quadratic|measured to price each block's loss on the report's draws",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="with --measure quadratic|measured: the folder of the report's task data (default: $QBH_DATA_DIR)",
    )
    p.add_argument("--frontier", action="store_true", help="also sweep budgets: frontier.json and frontier.png")
    p.add_argument("--force", action="store_true", help="overwrite an existing plan")
    _add_common(p, device=False)

    p = sub.add_parser(
        "quantize",
        help="apply a plan (direct quantization) and write a packed checkpoint",
        description="Quantize a fine-tuned model with a plan and write the bit-packed checkpoint. Example: "
        "qbert-hessian quantize --model runs/sst2/checkpoint --plan plan.json --task sst2 "
        "--data ../shared/data/sst2 --out runs/sst2/packed",
    )
    _add_files(
        p,
        model="the FP32 fine-tuned model",
        out="packed checkpoint folder to write",
        force="replace an existing packed checkpoint in OUT",
    )
    p.add_argument("--plan", type=Path, required=True, help="plan.json from qbert-hessian plan")
    p.add_argument(
        "--weight-range",
        choices=RANGE_METHODS,
        default=None,
        help="each group's range: max or mse (default: the plan's own)",
    )
    _add_rounding(p, "the plan's own")
    _add_config(p, CalibrationConfig)
    _add_common(p)

    p = sub.add_parser(
        "evaluate",
        help="task metric of an FP32 model, its direct quantization under plans, and packed checkpoints",
        description="Evaluate on the dev split. Example: qbert-hessian evaluate --model runs/sst2/checkpoint "
        "--task sst2 --data ../shared/data/sst2 --plan plan.json --packed runs/sst2/packed",
    )
    p.add_argument("--model", required=True, help=ANY_MODEL)
    _add_data_args(p)
    p.add_argument("--plan", type=Path, action="append", default=[], help="also evaluate direct quantization (repeat)")
    p.add_argument("--packed", type=Path, action="append", default=[], help="also evaluate a packed folder (repeat)")
    p.add_argument(
        "--onnx", type=Path, action="append", default=[], help="also evaluate an ONNX export with ONNX Runtime (repeat)"
    )
    p.add_argument("--out", type=Path, default=None, help="evaluation JSON file to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    _add_config(p, CalibrationConfig)
    _add_max_eval(p, "score every model on the same subset of this many dev examples, drawn with --seed (default: all)")
    _add_common(p)

    p = sub.add_parser(
        "export",
        help="a packed checkpoint for deployment: ONNX Runtime (2/4/8-bit kernels) or compressed-tensors",
        description="Export a packed checkpoint. Example: qbert-hessian export runs/sst2/packed --format onnx "
        "--out runs/sst2/deploy (needs pip install 'qbert_hessian[deploy]')",
    )
    p.add_argument("packed", type=Path, help="packed checkpoint folder (from qbert-hessian quantize)")
    p.add_argument(
        "--format",
        choices=["onnx", "compressed-tensors"],
        required=True,
        help="onnx: onnx/model.onnx with MatMulNBits int8 kernels; compressed-tensors: loads with from_pretrained",
    )
    p.add_argument("--out", type=Path, required=True, help="folder to write (Hugging Face layout)")
    p.add_argument(
        "--exact", action="store_true", help="onnx: float32 compute with the static activation ranges (Q/DQ)"
    )
    p.add_argument("--force", action="store_true", help="replace an earlier export in OUT")
    _add_common(p, device=False)

    p = sub.add_parser(
        "landscape",
        help="1-D/2-D loss surfaces of blocks along Hessian eigenvectors (top, or extreme), random, gradient",
        description="Loss on a grid around a block's weights. Example: qbert-hessian landscape --model "
        "runs/sst2/checkpoint --task sst2 --data ../shared/data/sst2 --block encoder.0,encoder.5 "
        "--directions eigen --grid 21 --out runs/sst2/landscape",
    )
    _add_files(
        p,
        model=ANY_MODEL,
        out="folder: <block>/landscape.{json,png} and panels.png",
        resume="keep the finished rows of existing landscapes",
        force="overwrite existing landscapes",
    )
    p.add_argument("--block", type=_csv, required=True, help="block(s), comma-separated, or 'model' for all weights")
    _add_config(p, LandscapeConfig, radius="--range", num_batches="--batches")
    _add_common(p)

    p = sub.add_parser(
        "density",
        help="Hessian eigenvalue density of blocks by stochastic Lanczos quadrature",
        description="Eigenvalue density of a block's Hessian. Example: qbert-hessian density --model "
        "runs/sst2/checkpoint --task sst2 --data ../shared/data/sst2 --block encoder.0 --out runs/sst2/density",
    )
    _add_files(p, model=ANY_MODEL, out="folder for density.json and density.png", force="overwrite density.json")
    p.add_argument("--block", type=_csv, required=True, help="block(s), comma-separated, or 'model'")
    _add_config(p, DensityConfig)
    _add_common(p)

    for name, about in (
        ("run", "the whole pipeline from a TOML config: finetune, sensitivity, plans, quantization, QAT, report"),
        ("demo", "the offline default: MiniLM-L6 on BBC News through the whole pipeline (about 12 minutes on 2 cores)"),
    ):
        p = sub.add_parser(
            name,
            help=about,
            description="Run every stage; a stage is reused only while its inputs are unchanged. Example: "
            + ("qbert-hessian run experiments/sst2_minilm.toml --set qat.epochs=1" if name == "run" else "make demo"),
        )
        if name == "run":
            p.add_argument(
                "config",
                type=Path,
                help="TOML file: [model], [finetune], [sensitivity], [allocate], [[plans]], [qat], [run]",
            )
            for key in ("model", "task", "data"):
                p.add_argument(f"--{key}", default=None, help=f"override [model] {'name' if key == 'model' else key}")
            p.add_argument(
                "--weight-range", choices=RANGE_METHODS, default=None, help="override [allocate] range_method"
            )
            p.add_argument(
                "--precision",
                choices=[m.value for m in Precision],
                default=None,
                help="override [sensitivity] precision: "
                + SensitivityConfig.field_help()["precision"].replace("%", "%%"),
            )
            _add_rounding(p, "[allocate]'s", dest_prefix="set_")
        default_out = Path("runs/demo") if name == "demo" else None
        p.add_argument("--out", type=Path, default=default_out, help="run folder (run: default, the config's 'out')")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="SECTION.KEY=VALUE",
            help="override one setting, e.g. --set sensitivity.draws=5 (repeatable)",
        )
        p.add_argument("--force", action="store_true", help="recompute every stage")
        _add_common(p)
    for p in sub.choices.values():  # which option sets each config field, so errors can name the flag
        p.set_defaults(flags={a.dest: a.option_strings[-1] for a in p._actions if a.option_strings})
    return parser


def _add_rounding(p: argparse.ArgumentParser, default: str, *, dest_prefix: str = "") -> None:
    """``--rounding``, ``--calib-samples`` and ``--damp`` overriding a plan's (or a run's) settings; checked by the
    configs, so a bad value is one line. ``dest_prefix`` keeps the run's TOML keys out of the flag names its errors
    are given (a bad ``[allocate] rounding`` is named as the file names it)."""
    helps = AllocConfig.field_help()
    for name in ("rounding", "calib_samples", "damp"):
        kind = {"rounding": str, "calib_samples": int, "damp": float}[name]
        flag = "--" + name.replace("_", "-")
        p.add_argument(
            flag, dest=dest_prefix + name, type=kind, default=None, help=f"{helps[name]} (default: {default})"
        )


def _name_flags(message: str, flags: dict[str, str]) -> str:
    """A library error names the config field (``SensitivityConfig.seed``); on the command line, name its flag."""
    return re.sub(r"\b\w+(?:Config|Spec)\.(\w+)\b", lambda m: flags.get(m.group(1), m.group(0)), message)


def _setup_logging(quiet: bool, main: bool = True) -> None:
    level = logging.ERROR if not main else logging.WARNING if quiet else logging.INFO  # one rank logs
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # transformers saves shards with the hub's progress bar


def _start(args: argparse.Namespace) -> None:
    """Join the process group of a torchrun / accelerate launch (no-op in one process); called by a command once
    its inputs are checked."""
    from . import distributed

    connect = float(os.environ.get("QBH_RENDEZVOUS_TIMEOUT", "300"))  # seconds a rank > 0 waits for rank 0
    try:
        args.started = distributed.start(args.world, args.device, connect_timeout_s=connect) or args.started
    except QBHError:
        args.alone = True  # only this process knows: it says so whatever its local rank
        raise


def _say(args: argparse.Namespace, text: str, *, err: bool = False) -> None:
    """Print on rank 0 only (every rank runs the command)."""
    if args.world.is_main:
        print(text, file=sys.stderr if err else sys.stdout)


def _raw_task(args: argparse.Namespace):
    from .tasks import load_raw_task

    data = args.data or (Path(os.environ["QBH_DATA_DIR"]) if os.environ.get("QBH_DATA_DIR") else None)
    return load_raw_task(args.task, data_dir=data, text_columns=args.text_columns, label_column=args.label_column)


def _check_out_dir(path: Path, flag: str = "--out") -> None:
    """An output folder must be creatable and writable before any work starts."""
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise QBHError(f"{flag} '{path}' lies under the file '{parent}'; choose a folder path")
            if not os.access(parent, os.W_OK):
                raise QBHError(f"{flag} '{path}' is not writable ('{parent}' is read-only); choose another folder")
            return


def _check_not_link(path: Path, flag: str = "--out") -> None:
    """An output path that is a symbolic link is refused: replacing it would either break the link or write
    through it into a file the command did not make."""
    if path.is_symlink():
        raise QBHError(
            f"{flag} '{path}' is a symbolic link (to '{os.readlink(path)}'); pass the real path or a new one"
        )


def _check_out_file(path: Path, flag: str = "--out") -> None:
    _check_not_link(path, flag)
    if path.is_dir():
        raise QBHError(f"{flag} '{path}' is a folder; give a file path, e.g. {path / 'result.json'}")
    _check_out_dir(path.parent, flag)


def cmd_finetune(args: argparse.Namespace) -> int:
    from . import stages
    from .evaluate import summary

    _check_out_dir(args.out)
    if (args.out / "metrics.json").exists() and not (args.force or args.resume):
        raise QBHError(f"'{args.out}' already holds a fine-tuned checkpoint; pass --force to overwrite it")
    config = _from_args(FinetuneConfig, args)
    if config.batch_size % args.world.size:
        raise QBHError(
            f"--batch-size {config.batch_size} is the batch of all {args.world.size} processes together and must "
            f"split evenly over them; use a multiple of {args.world.size}"
        )
    raw = _raw_task(args)
    _start(args)
    result = stages.finetune(
        args.model,
        raw,
        config,
        args.out,
        device=args.device,
        resume=args.resume,
        progress=not args.quiet,
        max_eval_samples=args.max_eval_samples,
    )
    m = result["metrics"]
    _say(args, f"dev {summary(m, raw.family)} on {m['num_examples']} examples; checkpoint in {args.out}")
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from . import distributed, stages
    from .artifacts import SensitivityReport
    from .models import BlockMap, is_classifier
    from .sensitivity import draw_indices, parallel_mode

    config = _from_args(SensitivityConfig, args)
    _check_out_dir(args.out)
    existing = args.out / "sensitivity.json"
    resume = None
    if existing.exists():
        if args.resume:
            resume = SensitivityReport.load(existing)
        elif not args.force:
            raise QBHError(f"'{existing}' exists; pass --resume to continue it or --force to overwrite it")
    raw = _raw_task(args)
    if not is_classifier(args.model, raw.family):
        raise QBHError(
            f"'{args.model}' has no trained {raw.family} head, so its curvature would describe a random head; "
            "fine-tune it first (qbert-hessian finetune)"
        )
    model, task = stages.load_for_task(args.model, raw, max_length=config.max_length, device=args.device)
    block_map = BlockMap(model)  # built once for the command and passed down
    names = block_map.expand(args.blocks)  # unknown blocks fail before any output is written
    draw_indices(len(task.train), config)  # so does a draw larger than the data
    done = {b.name for b in resume.blocks} if resume is not None else set()
    # so does a world the work cannot be shared over (every rank reaches the same verdict)
    parallel_mode(config, len(task.train), len([n for n in names if n not in done]), args.world.size)
    inputs = {"model": stages.model_fingerprint(args.model), "data": stages.data_fingerprint(raw)}
    _start(args)
    resume = distributed.broadcast_object(resume)  # rank 0's report: every rank resumes the same blocks
    try:
        stages.sensitivity(
            model,
            task,
            config,
            args.out,
            blocks=args.blocks,
            model_name=args.model,
            inputs=inputs,
            resume=resume,
            progress=not args.quiet,
            block_map=block_map,
        )
    except KeyboardInterrupt:
        _say(args, f"interrupted; the finished draws are kept in {args.out}; rerun with --resume to continue", err=True)
        return 130
    if args.world.is_main:
        print((args.out / "sensitivity.md").read_text(encoding="utf-8"))
        print(f"report in {args.out}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from . import stages
    from .allocate import check_report_coverage
    from .artifacts import SensitivityReport

    out = args.out if args.out.suffix == ".json" else args.out / "plan.json"
    _check_out_file(out)
    if out.exists() and not args.force:
        raise QBHError(f"'{out}' exists; pass --force to overwrite it")
    report_file = stages.report_path(args.report)
    report = SensitivityReport.load(report_file)
    if not report.complete:
        raise QBHError(f"'{report_file}' is partial ({', '.join(report.pending)} pending); finish it with --resume")
    spec = PlanSpec(
        out.stem,
        args.uniform,
        args.avg_bits,
        args.budget_mb,
        args.ratio,
        assign=args.assign,
        assign_seed=args.assign_seed,
    )
    config = _from_args(
        AllocConfig,
        args,
        bits=(args.uniform,) if args.uniform is not None else args.bits,
        act_bits=None if args.no_act_quant else args.act_bits,
    )
    if args.uniform is None:  # before the cost table is measured (and profile.json rewritten) for nothing
        check_report_coverage(report)
    data = args.data or (Path(os.environ["QBH_DATA_DIR"]) if os.environ.get("QBH_DATA_DIR") else None)
    profile = stages.plan_profile(report_file, report, config, model=args.model, data=data, progress=not args.quiet)
    source = {"sensitivity": str(report_file), "sha256": stages.sha256_file(report_file)}
    plan = stages.make_plan(report, profile, spec, config, source=source)
    stages.write_plan(plan, out)
    if args.frontier:
        stages.write_frontier(report, profile, config, out.parent, plan)
    print(out.with_suffix(".md").read_text(encoding="utf-8"))
    print(f"plan in {out}" + (f"; frontier in {out.parent / 'frontier.png'}" if args.frontier else ""))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from . import stages
    from .artifacts import BitPlan
    from .export import is_packed

    _check_not_link(args.out)
    if args.out.exists():
        if not is_packed(args.out):
            raise QBHError(f"'{args.out}' exists and is not a packed checkpoint; choose a new folder for --out")
        if not args.force:
            raise QBHError(f"'{args.out}' exists; pass --force to replace the packed checkpoint there")
    _check_out_dir(args.out.parent)
    calibration = _from_args(CalibrationConfig, args)
    plan = stages.with_range_method(BitPlan.load(args.plan), args.weight_range)
    plan = stages.with_rounding(plan, args.rounding, calib_samples=args.calib_samples, damp=args.damp)
    raw = _raw_task(args)
    try:
        model, task = stages.load_for_task(args.model, raw, max_length=args.max_length, eager=False, device=args.device)
        # validates the plan before anything is written
        qmodel = stages.quantize_direct(model, plan, task, calibration, progress=not args.quiet)
        size = stages.export(qmodel, plan, args.out, fp32=model, tokenizer=task.tokenizer)
    except KeyboardInterrupt:
        _say(args, f"interrupted; nothing was written to {args.out} (a packed checkpoint there is unchanged)", err=True)
        return 130
    predicted = size.predicted_bytes
    print(
        f"packed checkpoint {args.out / 'model.safetensors'}: {size.packed_bytes / MIB:.3f} MiB on disk vs FP32 "
        f"safetensors {size.fp32_safetensors_bytes / MIB:.3f} MiB ({size.compression:.2f}x smaller)"
        + (
            f"; plan predicted {predicted / MIB:.3f} MiB ({size.packed_bytes - predicted:+d} bytes)"
            if predicted
            else ""
        )
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from . import stages
    from .artifacts import BitPlan
    from .evaluate import METRIC_COLUMNS

    if args.out is not None:
        _check_out_file(args.out)
        if args.out.exists() and not args.force:
            raise QBHError(f"'{args.out}' exists; pass --force to overwrite it, or another --out")
    calibration = _from_args(CalibrationConfig, args)
    raw = _raw_task(args)
    plans = [(str(p), BitPlan.load(p)) for p in args.plan]  # refuse bad plans before any work
    result = stages.evaluate_models(
        args.model,
        raw,
        plans=plans,
        packed=args.packed,
        onnx=args.onnx,
        calibration=calibration,
        max_length=args.max_length,
        device=args.device,
        max_eval_samples=args.max_eval_samples,
        eval_seed=calibration.seed,
    )
    cols = [*METRIC_COLUMNS[raw.family], "loss"]
    print(f"| model | kind | size MiB | {' | '.join(cols)} |\n|---|---|---:|{'---:|' * len(cols)}")
    for r in result.results:
        size = f"{r['size_mib']:.3f}" if r["size_mib"] is not None else "-"
        print(f"| {r['name']} | {r['kind']} | {size} | {' | '.join(f'{r[c]:.4f}' for c in cols)} |")
    if args.out:
        result.task = args.task
        result.save(args.out)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .deploy.output import check_out, check_source, require

    if args.exact and args.format != "onnx":
        raise QBHError("--exact applies to --format onnx; drop it")
    require(*(("onnx", "onnxruntime") if args.format == "onnx" else ("compressed_tensors",)))
    _check_not_link(args.out)
    check_source(args.packed)
    check_out(args.out, force=args.force)
    if args.format == "onnx":
        from .deploy.onnx import export_onnx

        path = export_onnx(args.packed, args.out, exact=args.exact, force=args.force)
    else:
        from .deploy.compressed import export_compressed_tensors

        path = export_compressed_tensors(args.packed, args.out, force=args.force)
    print(f"{args.format} export {path}: {path.stat().st_size / MIB:.3f} MiB")
    return 0


def cmd_landscape(args: argparse.Namespace) -> int:
    from . import stages

    config = _from_args(LandscapeConfig, args)
    if not args.block:
        raise QBHError("--block names no block; e.g. --block encoder.0,encoder.5 (or 'model')")
    _check_out_dir(args.out)
    for b in args.block:
        path = args.out / b / "landscape.json"
        if path.exists() and not (args.resume or args.force):
            raise QBHError(f"'{path}' exists; pass --resume to continue it or --force to overwrite it")
    model, task = stages.load_for_task(args.model, _raw_task(args), max_length=args.max_length, device=args.device)
    stages.check_blocks(model, args.block)

    def done(ls, path: Path) -> None:
        lo, hi = min(min(r) for r in ls.loss), max(max(r) for r in ls.loss)
        print(f"{ls.block}: loss {ls.center_loss:.4f} at the weights, {lo:.4f} .. {hi:.4f} on the grid; {path}")

    _start(args)
    try:
        found = stages.landscapes(
            model,
            task,
            args.block,
            config,
            args.out,
            model_name=args.model,
            resume=args.resume,
            progress=not args.quiet,
            on_done=done,
        )
    except KeyboardInterrupt:
        _say(args, f"interrupted; finished rows are in {args.out}; rerun with --resume to continue", err=True)
        return 130
    if len(found) > 1:
        _say(args, f"side by side: {args.out / 'panels.png'}")
    return 0


def cmd_density(args: argparse.Namespace) -> int:
    from . import stages
    from .report import plot_density

    config = _from_args(DensityConfig, args)
    _check_out_dir(args.out)
    out = args.out / "density.json"
    if out.exists() and not args.force:
        raise QBHError(f"'{out}' exists; pass --force to overwrite it")
    model, task = stages.load_for_task(args.model, _raw_task(args), max_length=args.max_length, device=args.device)
    stages.check_blocks(model, args.block)
    _start(args)
    result = stages.density(model, task, args.block, config, model_name=args.model)
    if not args.world.is_main:
        return 0
    for d in result.densities:
        # The quadrature's first moment, (1/n) tr(H), averaged over the probes.
        mean = sum(sum(w * x for w, x in zip(ws, xs)) for xs, ws in zip(d["nodes"], d["weights"])) / len(d["nodes"])
        print(f"{d['block']}: mean eigenvalue (trace/n) {mean:.4g}")
    result.save(out)
    plot_density(result.densities, args.out / "density.png")
    print(f"density in {out} and {args.out / 'density.png'}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import load_run_config

    overrides = list(args.overrides)
    overrides += [f"model.{k}={_toml_str(v)}" for k in ("model", "task", "data") if (v := getattr(args, k))]
    overrides = [o.replace("model.model=", "model.name=") for o in overrides]
    if args.weight_range is not None:
        overrides.append(f"allocate.range_method={_toml_str(args.weight_range)}")
    if args.precision is not None:
        overrides.append(f"sensitivity.precision={_toml_str(args.precision)}")
    if args.set_rounding is not None:
        overrides.append(f"allocate.rounding={_toml_str(args.set_rounding)}")
    overrides += [
        f"allocate.{k}={v!r}" for k in ("calib_samples", "damp") if (v := getattr(args, f"set_{k}")) is not None
    ]
    config = load_run_config(args.config, overrides)
    out = args.out or (Path(config.out) if config.out else None)
    if out is None:
        raise QBHError("the run has no output folder; pass --out DIR or set out = '...' in the config")
    _check_out_dir(out)
    return _execute(args, _run(args, config, out))


def _toml_str(value: str) -> str:
    import json

    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _execute(args: argparse.Namespace, run) -> int:
    try:
        report = run.execute()
    except KeyboardInterrupt:
        _say(args, f"interrupted; finished stages are kept in {run.out}; rerun the same command to continue", err=True)
        return 130
    if args.world.is_main:
        print(report.read_text(encoding="utf-8"))
        print(f"report: {report}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole pipeline on the offline default (MiniLM-L6, BBC News), sized for 2 CPU cores."""
    from .pipeline import DEMO_CONFIG, apply_overrides, parse_run_config

    config = parse_run_config(apply_overrides(DEMO_CONFIG, args.overrides))
    _check_out_dir(args.out)
    return _execute(args, _run(args, config, args.out))


def _run(args: argparse.Namespace, config, out: Path):
    """The pipeline over ``out``, once the run's settings are checked against the world (then the ranks meet)."""
    from .pipeline import Run, check_world

    check_world(config, args.world.size)
    _start(args)
    return Run(config, out, force=args.force, progress=not args.quiet, device=args.device)


COMMANDS = {
    "finetune": cmd_finetune,
    "sensitivity": cmd_sensitivity,
    "plan": cmd_plan,
    "quantize": cmd_quantize,
    "evaluate": cmd_evaluate,
    "export": cmd_export,
    "landscape": cmd_landscape,
    "density": cmd_density,
    "run": cmd_run,
    "demo": cmd_demo,
}


# The commands that share their work over the processes of a torchrun / accelerate launch.
DISTRIBUTED = ("finetune", "sensitivity", "landscape", "density", "run", "demo")


def _check_world(args: argparse.Namespace) -> None:
    """A multi-process launch: the command must be one that shares its work, and the device must fit the world
    (``--device cuda`` becomes this rank's GPU)."""
    from . import distributed

    world = args.world
    if args.command not in DISTRIBUTED:
        raise QBHError(
            f"{args.command} runs in one process, but this is process {world.rank} of {world.size} "
            f"(WORLD_SIZE={world.size}); run it without torchrun / accelerate launch"
        )
    args.device = distributed.check_world(world, args.device)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import distributed, interrupt  # torch: seconds, with Ctrl-C held (an abort otherwise, see interrupt)

    if interrupt.release():
        print(f"qbert-hessian {args.command}: interrupted before it started", file=sys.stderr)
        return 130

    args.started = False
    try:
        args.world = distributed.world_from_env()
    except QBHError as exc:
        print(f"qbert-hessian {args.command}: error: {exc}", file=sys.stderr)
        return 2
    args.quiet = args.quiet or not args.world.is_main  # progress bars from rank 0 only
    try:
        _setup_logging(args.quiet, main=args.world.is_main)
        if args.world.distributed:
            _check_world(args)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:  # the commands that keep finished work say what they kept; one line for the rest
        _say(args, f"qbert-hessian {args.command}: interrupted; rerun it (with --resume where it has one)", err=True)
        return 130
    except QBHError as exc:
        message = _name_flags(str(exc), args.flags)
        if args.command in ("run", "demo"):  # the run's settings come from its TOML tables
            from .pipeline import toml_names

            message = toml_names(message)
        if args.world.local_rank == 0 or getattr(args, "alone", False):  # one line per host, not per process
            print(f"qbert-hessian {args.command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        if args.started:
            distributed.stop()


def entry() -> None:
    try:
        code = main()
    except KeyboardInterrupt:
        code = 130
    if code == 130:  # interrupted: the command has said what it kept, and its files are whole (atomic writes)
        # leave now: the shutdown of a library caught mid-work (torch, tqdm) can re-raise the interrupt and end
        # the process by the signal with a traceback instead of this exit status
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)


if __name__ == "__main__":
    entry()
