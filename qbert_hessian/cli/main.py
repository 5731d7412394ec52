"""The ``qbert-hessian`` parser, one subcommand per module of this package, and the process around a command:
the world read and checked, logging, the exit codes."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence

from ..errors import QBHError
from . import demo, density, evaluate, export, finetune, landscape, plan, quantize, run, sensitivity
from .common import say

# Each command's module holds its parser (``add_parser``) beside its body (``run``), and says whether it shares
# its work over the processes of a torchrun / accelerate launch (``DISTRIBUTED``); ``--help`` lists them in order.
COMMANDS = (finetune, sensitivity, plan, quantize, evaluate, export, landscape, density, run, demo)


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
    for command in COMMANDS:
        p = command.add_parser(sub)
        # which option sets each config field, so errors can name the flag
        flags = {a.dest: a.option_strings[-1] for a in p._actions if a.option_strings}
        p.set_defaults(command_module=command, flags=flags)
    return parser


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


def _check_world(args: argparse.Namespace) -> None:
    """A multi-process launch: the command must be one that shares its work, and the device must fit the world
    (``--device cuda`` becomes this rank's GPU)."""
    from .. import distributed

    world = args.world
    if not args.command_module.DISTRIBUTED:
        raise QBHError(
            f"{args.command} runs in one process, but this is process {world.rank} of {world.size} "
            f"(WORLD_SIZE={world.size}); run it without torchrun / accelerate launch"
        )
    args.device = distributed.check_world(world, args.device)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .. import distributed, interrupt  # torch: seconds, with Ctrl-C held (an abort otherwise, see interrupt)

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
        return args.command_module.run(args)
    except KeyboardInterrupt:  # the commands that keep finished work say what they kept; one line for the rest
        say(args, f"qbert-hessian {args.command}: interrupted; rerun it (with --resume where it has one)", err=True)
        return 130
    except QBHError as exc:
        message = _name_flags(str(exc), args.flags)
        if args.command in ("run", "demo"):  # the run's settings come from its TOML tables
            from ..run_config import toml_names

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
    # The command has finished (or has stopped and said what it kept): a Ctrl-C from here on changes nothing it did.
    # Raised in the interpreter's shutdown it would end the process by the signal (exit -2, no message) after the
    # work was done, so it is ignored.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if code == 130:  # interrupted: the command has said what it kept, and its files are whole (atomic writes)
        # leave now: the shutdown of a library caught mid-work (torch, tqdm) can re-raise the interrupt and end
        # the process by the signal with a traceback instead of this exit status
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)
