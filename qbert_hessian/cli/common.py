"""What the commands share: options made from config classes and the common option groups (data, files,
device), and the checks and printing every command body uses (output paths, the data, rank 0's voice).

Light on purpose: every command module imports it when the parser is built, so nothing here imports torch or
transformers at module level.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

from ..config import AllocConfig, SensitivityConfig
from ..errors import QBHError

ANY_MODEL = "an FP32 checkpoint or a packed checkpoint folder"


# -- option types ---------------------------------------------------------------------------------------------


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in csv_list(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text} is not a list of integers; e.g. 2,3,4,8") from None


def int_or_str(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer; e.g. 2000")
    return value


def _parse_type(hint: Any) -> Callable[[str], Any]:
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = [t for t in (typing.get_args(hint) if union else (hint,)) if t is not type(None)]
    if typing.get_origin(options[0]) is tuple:
        return int_list
    if int in options and str in options:
        return int_or_str
    return options[0] if options[0] in (int, float) else str


# -- options ----------------------------------------------------------------------------------------------------


def add_config(p: argparse.ArgumentParser, cls: type, *, skip: Sequence[str] = (), **flags: str) -> None:
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


def from_args(cls: type, args: argparse.Namespace, **values: Any) -> Any:
    """The config ``cls`` from the parsed options of its fields (and ``values``); its own validation turns bad
    values into one-line errors."""
    for f in dataclasses.fields(cls):
        if f.name not in values and hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)  # string defaults went through the option's type already
    return cls(**values)


def add_data_args(p: argparse.ArgumentParser, *, max_length: int = SensitivityConfig.max_length) -> None:
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
    p.add_argument("--text-columns", type=csv_list, default=None, help="text column(s), comma-separated")
    p.add_argument("--label-column", default=None, help="label column")
    p.add_argument("--max-length", type=int, default=max_length, help="tokenizer truncation length")


def add_max_eval(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--max-eval-samples", type=positive_int, default=None, help=help)


def add_common(p: argparse.ArgumentParser, *, device: bool = True) -> None:
    if device:
        p.add_argument("--device", default="cpu", help="where the model runs: cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")


def add_files(p: argparse.ArgumentParser, *, model: str, out: str, force: str, resume: str | None = None) -> None:
    p.add_argument("--model", required=True, help=model)
    add_data_args(p)
    p.add_argument("--out", type=Path, required=True, help=out)
    if resume:
        p.add_argument("--resume", action="store_true", help=resume)
    p.add_argument("--force", action="store_true", help=force)


# The allocator settings ``quantize`` and ``run`` take as flags over a plan's (or the run's [allocate]) own, in the
# order their help lists them, with the type each is parsed as.
QUANT_OVERRIDES = {"rounding": str, "calib_samples": int, "damp": float, "act_range": str}


def add_quant_overrides(p: argparse.ArgumentParser, default: str, *, dest_prefix: str = "") -> None:
    """``--rounding``, ``--calib-samples``, ``--damp`` and ``--act-range`` overriding a plan's (or a run's)
    settings; checked by the configs, so a bad value is one line. ``dest_prefix`` keeps the run's TOML keys out of
    the flag names its errors are given (a bad ``[allocate] rounding`` is named as the file names it)."""
    helps = AllocConfig.field_help()
    for name, kind in QUANT_OVERRIDES.items():
        flag = "--" + name.replace("_", "-")
        p.add_argument(
            flag, dest=dest_prefix + name, type=kind, default=None, help=f"{helps[name]} (default: {default})"
        )


# -- command bodies -------------------------------------------------------------------------------------------


def start(args: argparse.Namespace) -> None:
    """Join the process group of a torchrun / accelerate launch (no-op in one process); called by a command once
    its inputs are checked."""
    from .. import distributed

    connect = float(os.environ.get("QBH_RENDEZVOUS_TIMEOUT", "300"))  # seconds a rank > 0 waits for rank 0
    try:
        args.started = distributed.start(args.world, args.device, connect_timeout_s=connect) or args.started
    except QBHError:
        args.alone = True  # only this process knows: it says so whatever its local rank
        raise


def say(args: argparse.Namespace, text: str, *, err: bool = False) -> None:
    """Print on rank 0 only (every rank runs the command)."""
    if args.world.is_main:
        print(text, file=sys.stderr if err else sys.stdout)


def raw_task(args: argparse.Namespace):
    from ..tasks import load_raw_task

    data = args.data or (Path(os.environ["QBH_DATA_DIR"]) if os.environ.get("QBH_DATA_DIR") else None)
    return load_raw_task(args.task, data_dir=data, text_columns=args.text_columns, label_column=args.label_column)


def check_out_dir(path: Path, flag: str = "--out") -> None:
    """An output folder must be creatable and writable before any work starts."""
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise QBHError(f"{flag} '{path}' lies under the file '{parent}'; choose a folder path")
            if not os.access(parent, os.W_OK):
                raise QBHError(f"{flag} '{path}' is not writable ('{parent}' is read-only); choose another folder")
            return


def check_not_link(path: Path, flag: str = "--out") -> None:
    """An output path that is a symbolic link is refused: replacing it would either break the link or write
    through it into a file the command did not make."""
    if path.is_symlink():
        raise QBHError(
            f"{flag} '{path}' is a symbolic link (to '{os.readlink(path)}'); pass the real path or a new one"
        )


def check_out_file(path: Path, flag: str = "--out") -> None:
    check_not_link(path, flag)
    if path.is_dir():
        raise QBHError(f"{flag} '{path}' is a folder; give a file path, e.g. {path / 'result.json'}")
    check_out_dir(path.parent, flag)
