"""Hessian-vector products of the batch-averaged task loss over one block of parameters.

For batches B_1..B_m with n_j examples and mean losses L_j, the loss is L = sum_j (n_j / N) L_j and

    H v = sum_j (n_j / N) d/dtheta <grad L_j(theta), v>            (Pearlmutter 1994; double backward)

over the block's parameters theta only (the other parameters are held fixed, so this is the diagonal block
H_bb of the full Hessian). Each batch gets one forward and one ``create_graph`` backward; the graphs are kept
and reused by every product until :meth:`BlockHessian.free`, so power iteration pays one double backward per
step. Dropout must be off: :func:`curvature_mode` puts the model in eval mode and restores it afterwards.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import QBHError

Batch = Mapping[str, Tensor]
LossFn = Callable[[nn.Module, Batch], Tensor]
HVP = Callable[[list[Tensor]], list[Tensor]]


def model_loss(model: nn.Module, batch: Batch) -> Tensor:
    """The default loss: the HF model's own loss for a batch that carries ``labels`` (mean over examples)."""
    return model(**batch).loss


@contextlib.contextmanager
def curvature_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (dropout off) for the duration; the previous train/eval state is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def grads_enabled(params: Sequence[nn.Parameter]) -> Iterator[None]:
    """``requires_grad=True`` on ``params`` for the duration (a frozen block still has a Hessian)."""
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, r in zip(params, before):
            p.requires_grad_(r)


def _batch_size(batch: Batch) -> int:
    first = next(iter(batch.values()))
    return int(first.shape[0])


class BlockHessian:
    """The Hessian of the batch-averaged loss restricted to ``params``, as a callable ``v -> H v``.

    Args:
        model: the model, in eval mode (see :func:`curvature_mode`); its device is used for the batches.
        params: the block's parameters (they get ``requires_grad=True`` for the duration of the graph).
        batches: HF batches (dicts of tensors, with ``labels``).
        loss_fn: ``loss_fn(model, batch) -> scalar``; defaults to the model's own loss.

    Raises:
        QBHError: if a batch's loss is not finite.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[nn.Parameter],
        batches: Sequence[Batch],
        loss_fn: LossFn | None = None,
    ) -> None:
        if not params:
            raise QBHError("the block has no parameters; choose another block")
        if not batches:
            raise QBHError("no data: the curvature needs at least one batch")
        self.params = list(params)
        loss_fn = loss_fn or model_loss
        device = self.params[0].device
        sizes = [_batch_size(b) for b in batches]
        total = float(sum(sizes))
        self.weights = [n / total for n in sizes]
        self.grads: list[list[Tensor | None]] = []
        self.losses: list[float] = []
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise QBHError(
                    f"the loss is not finite ({loss.item()}) on a data batch; check the labels and the model "
                    "(a diverged fine-tune gives NaN weights)"
                )
            self.losses.append(float(loss.detach()))
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            # A gradient that does not depend on theta (e.g. a bias feeding the loss linearly and alone)
            # contributes no curvature; keep it out of the double backward.
            self.grads.append([g if g is not None and g.requires_grad else None for g in grads])
        self.num_products = 0

    @property
    def loss(self) -> float:
        """The batch-averaged loss at the current parameters."""
        return math.fsum(w * l for w, l in zip(self.weights, self.losses))

    def __call__(self, v: list[Tensor]) -> list[Tensor]:
        """H v for a vector shaped like ``params``."""
        out: list[Tensor | None] = [None] * len(self.params)
        for w, grads in zip(self.weights, self.grads):
            idx = [i for i, g in enumerate(grads) if g is not None]
            if not idx:
                continue
            hv = torch.autograd.grad(
                [grads[i] for i in idx],
                self.params,
                grad_outputs=[v[i] for i in idx],
                retain_graph=True,
                allow_unused=True,
            )
            for i, h in enumerate(hv):
                if h is not None:
                    h = h.detach()
                    h = h if w == 1.0 else h.mul_(w)
                    out[i] = h if out[i] is None else out[i].add_(h)
        self.num_products += 1
        return [torch.zeros_like(p) if o is None else o for p, o in zip(self.params, out)]

    def free(self) -> None:
        """Drop the graphs (their memory is released once no other reference holds them)."""
        self.grads = []
