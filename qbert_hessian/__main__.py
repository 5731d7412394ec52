"""``python -m qbert_hessian``: the CLI, so ``torchrun --nproc-per-node N -m qbert_hessian <command> ...`` and
``accelerate launch -m qbert_hessian <command> ...`` start it on every process."""

from .cli import entry

entry()
