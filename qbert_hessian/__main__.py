"""``python -m qbert_hessian`` and the ``qbert-hessian`` script: the CLI, so ``torchrun --nproc-per-node N -m
qbert_hessian <command> ...`` and ``accelerate launch -m qbert_hessian <command> ...`` start it on every process.

Ctrl-C is held from here until torch is imported (see :mod:`qbert_hessian.interrupt`), so this module imports
nothing heavy before :func:`~qbert_hessian.interrupt.hold`.
"""

from . import interrupt


def entry() -> None:
    interrupt.hold()
    from .cli import entry as cli_entry

    cli_entry()


if __name__ == "__main__":
    entry()
