"""``qbert-hessian``: argument parsing only; every command is a thin call into the stage modules.

Exit codes: 0 success, 2 bad input (a :class:`QBHError` or a usage error, one line on stderr, nothing
half-written), 130 interrupted (finished work is kept; rerun with ``--resume``), 1 a crash (a bug).
Heavy imports (torch, transformers) happen inside the commands so ``--help`` is fast.

Launched by ``torchrun`` or ``accelerate launch`` (``-m qbert_hessian``), every process runs the same command:
the world is read from the environment and checked, each command checks its inputs, then joins the process
group (so a bad input fails at once on every rank, not after a rendezvous); rank 0 alone prints, logs, draws
progress bars and writes. ``plan``, ``quantize`` and ``evaluate`` are light and run in one process only.

One module per command (``finetune``, ``sensitivity``, ``plan``, ``quantize``, ``evaluate``, ``export``,
``landscape``, ``density``, ``run``, ``demo``) holds its options (``add_parser``) beside its body (``run``);
:mod:`.common` holds what they share (options built from the config classes, output checks, rank 0's voice) and
:mod:`.main` registers them and turns errors into exit codes.
"""

from .main import build_parser, entry, main

__all__ = ["build_parser", "entry", "main"]
