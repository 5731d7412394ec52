"""``qbert-hessian run``: the whole pipeline from a TOML config (finetune, sensitivity, plans, quantization, QAT,
report), each stage reused while its inputs are unchanged. Also the pieces ``demo`` shares: the run's common
options, and the run started and reported."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import RANGE_METHODS, Precision, SensitivityConfig
from ..errors import QBHError
from .common import QUANT_OVERRIDES, add_common, add_quant_overrides, check_out_dir, say, start

DISTRIBUTED = True  # shares its work over the processes of a torchrun / accelerate launch
DESCRIPTION = "Run every stage; a stage is reused only while its inputs are unchanged. Example: "


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "run",
        help="the whole pipeline from a TOML config: finetune, sensitivity, plans, quantization, QAT, report",
        description=DESCRIPTION + "qbert-hessian run experiments/sst2_minilm.toml --set qat.epochs=1",
    )
    p.add_argument(
        "config",
        type=Path,
        help="TOML file: [model], [finetune], [sensitivity], [allocate], [[plans]], [qat], [run]",
    )
    for key in ("model", "task", "data"):
        p.add_argument(f"--{key}", default=None, help=f"override [model] {'name' if key == 'model' else key}")
    p.add_argument("--weight-range", choices=RANGE_METHODS, default=None, help="override [allocate] range_method")
    p.add_argument(
        "--precision",
        choices=[m.value for m in Precision],
        default=None,
        help="override [sensitivity] precision: " + SensitivityConfig.field_help()["precision"].replace("%", "%%"),
    )
    add_quant_overrides(p, "[allocate]'s", dest_prefix="set_")
    add_run_options(p, out=None)
    return p


def add_run_options(p: argparse.ArgumentParser, *, out: Path | None) -> None:
    """The options ``run`` and ``demo`` share: the run folder (default ``out``), ``--set`` overrides, ``--force``."""
    p.add_argument("--out", type=Path, default=out, help="run folder (run: default, the config's 'out')")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set sensitivity.draws=5 (repeatable)",
    )
    p.add_argument("--force", action="store_true", help="recompute every stage")
    add_common(p)


def run(args: argparse.Namespace) -> int:
    from ..run_config import load_run_config

    overrides = list(args.overrides)
    overrides += [f"model.{k}={_toml_str(v)}" for k in ("model", "task", "data") if (v := getattr(args, k))]
    overrides = [o.replace("model.model=", "model.name=") for o in overrides]
    if args.weight_range is not None:
        overrides.append(f"allocate.range_method={_toml_str(args.weight_range)}")
    if args.precision is not None:
        overrides.append(f"sensitivity.precision={_toml_str(args.precision)}")
    for key in QUANT_OVERRIDES:
        if (v := getattr(args, f"set_{key}")) is not None:
            overrides.append(f"allocate.{key}={_toml_str(v) if isinstance(v, str) else repr(v)}")
    config = load_run_config(args.config, overrides)
    out = args.out or (Path(config.out) if config.out else None)
    if out is None:
        raise QBHError("the run has no output folder; pass --out DIR or set out = '...' in the config")
    check_out_dir(out)
    return execute(args, make_run(args, config, out))


def _toml_str(value: str) -> str:
    import json

    return json.dumps(value)  # a JSON string is a valid TOML basic string


def make_run(args: argparse.Namespace, config, out: Path):
    """The pipeline over ``out``, once the run's settings are checked against the world (then the ranks meet)."""
    from ..pipeline import Run
    from ..run_config import check_world

    check_world(config, args.world.size)
    start(args)
    return Run(config, out, force=args.force, progress=not args.quiet, device=args.device)


def execute(args: argparse.Namespace, run) -> int:
    try:
        report = run.execute()
    except KeyboardInterrupt:
        say(args, f"interrupted; finished stages are kept in {run.out}; rerun the same command to continue", err=True)
        return 130
    if args.world.is_main:
        print(report.read_text(encoding="utf-8"))
        print(f"report: {report}")
    return 0
