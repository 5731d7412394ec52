"""Hessian-vector products of the batch-averaged task loss over one block of parameters.

For batches B_1..B_m with n_j examples and mean losses L_j, the loss is L = sum_j (n_j / N) L_j and

    H v = sum_j (n_j / N) d/dtheta <grad L_j(theta), v>            (Pearlmutter 1994; double backward)

over the block's parameters theta only (the other parameters are held fixed, so this is the diagonal block
H_bb of the full Hessian). Each batch gets one forward and one ``create_graph`` backward; the graphs are kept
and reused by every product until :meth:`BlockHessian.free`, so power iteration pays one double backward per
step. Dropout must be off: :func:`curvature_mode` puts the model in eval mode and restores it afterwards.

The weight n_j is what the batch's loss averages over (:func:`loss_weight`): examples for sentence
classification and QA (HF's QA loss is (CE_start + CE_end) / 2, a mean over features), labelled tokens
(``labels != -100``) for token classification, whose loss is a mean over those tokens. So L is the loss of
the joint batch, however it was cut.

A padded batch of sentences of mixed length spends most of its compute on padding (on SST-2, a batch of 32
padded to its longest row is about 70% padding). Padding does not reach the real tokens, so
:func:`split_by_length` cuts each batch into a few micro-batches of similar length, each trimmed to its own
longest row; weighted by :func:`loss_weight` they give the same loss, gradient and Hessian, on fewer tokens.

An embedding table is looked up only at the draw's token ids, so its Hessian is zero outside those rows.
:class:`BlockHessian` records the rows each plain ``nn.Embedding`` of the block looks up and, in
:attr:`BlockHessian.like`, offers the compact space of those rows: on SST-2 a few hundred of the 30,522 rows
of the word table. Eigenvalues and traces are the same there; the solvers' vectors are 50x smaller.

Products in bfloat16: :func:`autocast_products` runs an operator's products under autocast, so the double
backward's matrix products (the bulk of a product's work) run in bf16 while the graph, the vectors and every
other operation stay float32. The graph is the float32 one, unchanged, so the same :class:`BlockHessian` gives
bf16 products and, called directly, exact float32 ones (what certifies a bf16 result) without a second graph.
A bf16 product is 0.3-1% off the float32 one (bf16 keeps 8 bits of mantissa; MiniLM-L6 and tiny BERTs).

Data parallelism (``data_parallel=True`` under torch.distributed, e.g. torchrun): each rank holds the graphs of
its share of the batches; the weights n_j / N use the global N (an all-reduce of the local counts), so

    H v = all_reduce_sum( sum_{j on this rank} (n_j / N) H_j v )

is the single-process operator, the same on every rank, and the solvers, which only call ``hvp``, run
unchanged and identically on every rank. The compact space of an embedding table is built from the union of
every rank's looked-up rows (an all-gather), so every rank's vectors have the same shape and meaning.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .. import distributed
from ..errors import QBHError

Batch = Mapping[str, Tensor]
LossFn = Callable[[nn.Module, Batch], Tensor]
HVP = Callable[[list[Tensor]], list[Tensor]]


def model_loss(model: nn.Module, batch: Batch) -> Tensor:
    """The default loss: the HF model's own loss for a batch with its targets (see :func:`loss_weight`)."""
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


def autocast_products(hvp: HVP, dtype: torch.dtype = torch.bfloat16) -> HVP:
    """The operator ``hvp`` with each product run under ``torch.autocast`` to ``dtype`` on the vector's device.

    Through a :class:`BlockHessian` (a graph built in float32) the double backward's matrix products run in
    ``dtype``; the result is float32, shaped like ``v``. The custom curvature kernels
    (:mod:`~qbert_hessian.hessian.kernels`) take mixed inputs in their elementwise formulas, which promote to
    float32. Calling ``hvp`` itself still gives the float32 product.
    """

    def low(v: list[Tensor]) -> list[Tensor]:
        with torch.autocast(v[0].device.type, dtype=dtype):
            hv = hvp(v)
        return [h if h.dtype == x.dtype else h.to(x.dtype) for h, x in zip(hv, v)]

    return low


def loss_weight(batch: Batch) -> int:
    """What the batch's loss is a mean over: labelled tokens (``labels != -100``) when the labels are per token,
    else examples (rows). Batches weighted by it average to the loss of their union."""
    labels = batch.get("labels")
    if labels is not None and labels.dim() == 2:
        return int(labels.ne(-100).sum())
    first = next(iter(batch.values()))
    return int(first.shape[0])


def _right_padded(mask: Tensor, lengths: Tensor) -> bool:
    """Whether every row of the 0/1 mask is a run of ``lengths`` ones followed by padding."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return torch.equal(mask.bool(), positions < lengths[:, None])


def _best_cuts(lengths: np.ndarray, max_parts: int, overhead: int) -> list[int]:
    """Cut points of the ascending ``lengths`` into at most ``max_parts`` runs, minimising the padded token
    count sum_j n_j max_j plus ``overhead`` per run (dynamic programming over the sorted rows)."""
    n = lengths.size
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    back = np.zeros((max_parts + 1, n + 1), dtype=np.int64)
    layers = [best]
    for j in range(1, max_parts + 1):
        prev, cur = layers[-1], np.full(n + 1, np.inf)
        for i in range(1, n + 1):
            # the last run is rows s..i-1 (its longest row is lengths[i-1]); s ranges over 0..i-1
            costs = prev[:i] + (i - np.arange(i)) * lengths[i - 1] + overhead
            s = int(np.argmin(costs))
            cur[i], back[j, i] = costs[s], s
        layers.append(cur)
    parts = int(np.argmin([layer[n] for layer in layers[1:]])) + 1
    cuts, i = [n], n
    for j in range(parts, 0, -1):
        i = int(back[j, i])
        cuts.append(i)
    return cuts[::-1]


def split_by_length(batch: Batch, max_parts: int = 4, overhead: int = 64) -> list[Batch]:
    """Split a padded batch into at most ``max_parts`` micro-batches of rows of similar length.

    The rows are sorted by length and cut where the padded token count, plus ``overhead`` tokens per
    micro-batch (the fixed cost of one more pass), is least; each micro-batch is trimmed to its longest row.
    For a loss that is a mean over examples, the size-weighted mean of the micro-batches' losses equals the
    batch's loss as a function of the parameters (padding is masked out of every real token), so products
    over the parts are the batch's Hessian-vector products.

    Per-token labels (token classification) are trimmed with their rows; weighted by :func:`loss_weight`
    (labelled tokens) the parts again give the batch's mean over labelled tokens.

    A batch is returned whole when it has no ``attention_mask``, when it is not right-padded (trimming a
    left-padded row would move its tokens to other positions), when a padding position carries a label,
    when it carries ``start_positions`` (QA: the start/end softmax runs over every position, padding
    included, so trimming would change the loss), or when splitting saves nothing.
    """
    mask = batch.get("attention_mask")
    labels = batch.get("labels")
    if max_parts <= 1 or mask is None or mask.dim() != 2 or "start_positions" in batch:
        return [batch]
    lengths = mask.sum(1)
    if not _right_padded(mask, lengths):
        return [batch]
    if labels is not None and labels.dim() == 2 and bool((labels.ne(-100) & mask.eq(0)).any()):
        return [batch]
    n, width = mask.shape
    if n * width - int(lengths.sum()) <= overhead:  # the padding is worth less than one more pass
        return [batch]
    order = torch.argsort(lengths, stable=True)
    sorted_lengths = lengths[order].cpu().numpy()
    cuts = _best_cuts(sorted_lengths, min(max_parts, n), overhead)
    if len(cuts) == 2 and int(sorted_lengths[-1]) == width:
        return [batch]
    parts = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        rows = order[lo:hi]
        keep = int(sorted_lengths[hi - 1])
        part = {}
        for key, value in batch.items():
            if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == n:
                value = value[rows.to(value.device)]
                if value.dim() >= 2 and value.shape[1] == width:
                    value = value[:, :keep].contiguous()  # HF token-classification loss .view()s labels
            part[key] = value
        parts.append(part)
    return parts


@contextlib.contextmanager
def _record_lookups(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[dict[int, list[Tensor]]]:
    """While inside: the ids looked up in every plain ``nn.Embedding`` whose weight is ``params[i]``, by i."""
    index = {id(p): i for i, p in enumerate(params)}
    seen: dict[int, list[Tensor]] = {}
    handles = []
    for module in model.modules():
        if type(module) is nn.Embedding and id(module.weight) in index:
            i = index[id(module.weight)]

            def hook(_m: nn.Module, args: tuple, _out: Tensor, i: int = i) -> None:
                seen.setdefault(i, []).append(args[0].detach().reshape(-1))

            handles.append(module.register_forward_hook(hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def pass_overhead(device: torch.device) -> int:
    """The fixed cost of one more micro-batch, in padded tokens, for :func:`split_by_length` on ``device``.

    On a CPU a pass is compute-bound: a few dozen tokens. On a GPU a small batch is bound by kernel launches;
    on an H100 a 32 x 38 batch cut into three parts made each product three times slower
    (benchmarks/RESULTS_GPU.md), so there only batches with thousands of padded positions to save are cut.
    """
    return 64 if device.type == "cpu" else 8192


class BlockHessian:
    """The Hessian of the batch-averaged loss restricted to ``params``, as a callable ``v -> H v``.

    Args:
        model: the model, in eval mode (see :func:`curvature_mode`); its device is used for the batches.
        params: the block's parameters (they get ``requires_grad=True`` for the duration of the graph).
        batches: HF batches (dicts of tensors, with ``labels`` or ``start_positions``/``end_positions``).
        loss_fn: ``loss_fn(model, batch) -> scalar``, a mean over what :func:`loss_weight` counts (examples,
            or labelled tokens); defaults to the model's own loss.
        keep_gradient: keep the loss's gradient g over ``params`` (:meth:`gradient`), for a quadratic model of
            the loss (g^T d + 1/2 d^T H d).
        length_buckets: split every batch into at most this many micro-batches of similar length
            (:func:`split_by_length`, with the device's :func:`pass_overhead`; 1: never split). The products
            are the same, computed on less padding.

    Raises:
        QBHError: if a batch's loss is not finite.

    Vectors: ``H v`` takes and returns vectors shaped like ``params``, or like :attr:`like`, where an
    embedding table is cut to the rows the batches look up (:attr:`rows`); :meth:`restrict` and
    :meth:`expand` map between the two. A table is cut only when its gradient is zero off those rows too,
    so a table shared with another layer (tied weights) stays whole.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[nn.Parameter],
        batches: Sequence[Batch],
        loss_fn: LossFn | None = None,
        *,
        length_buckets: int = 4,
        data_parallel: bool = False,
        keep_gradient: bool = False,
    ) -> None:
        self.data_parallel = data_parallel and distributed.world_size() > 1
        if not params:
            raise QBHError("the block has no parameters; choose another block")
        if not batches and not self.data_parallel:
            raise QBHError("no data: the curvature needs at least one batch")
        self.params = list(params)
        loss_fn = loss_fn or model_loss
        device = self.params[0].device
        overhead = pass_overhead(device)
        parts = [part for batch in batches for part in split_by_length(batch, length_buckets, overhead)]
        # A part with nothing labelled (every word truncated away) has weight 0 and a 0/0 loss: leave it out.
        batches = [b for b in parts if loss_weight(b) > 0]
        sizes = [loss_weight(b) for b in batches]
        # N: what the joint loss averages over, on every rank together
        (total,) = distributed.all_reduce_floats([sum(sizes)]) if self.data_parallel else [float(sum(sizes))]
        if total == 0:
            raise QBHError("no labelled token in the data: the loss is empty; raise --max-length or use other data")
        self.weights = [n / total for n in sizes]
        self.grads: list[list[Tensor | None]] = []
        self.losses: list[float] = []
        # g = sum_j (n_j / N) grad L_j, detached: the first-order term of a quadratic model of the loss (kept on
        # request only: it costs one more copy of the parameters)
        self._gradient: list[Tensor] = (
            [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in self.params] if keep_gradient else []
        )
        touched: list[Tensor] = [torch.zeros(0, dtype=torch.bool, device=device)] * len(self.params)
        bad: list[float] = []
        with _record_lookups(model, self.params) as lookups:
            for w, batch in zip(self.weights, batches):
                batch = {k: v.to(device) for k, v in batch.items()}
                loss = loss_fn(model, batch)
                if not torch.isfinite(loss):
                    bad.append(loss.item())
                    if not self.data_parallel:
                        break
                    continue  # every rank must learn of it before raising, or the others wait forever
                self.losses.append(float(loss.detach()))
                grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
                for i in lookups:  # rows with a non-zero gradient, for the check below
                    if grads[i] is not None:
                        nonzero = grads[i].detach().reshape(grads[i].shape[0], -1).ne(0).any(1)
                        touched[i] = nonzero if touched[i].numel() == 0 else touched[i] | nonzero
                for acc, g in zip(self._gradient, grads):
                    if g is not None:
                        acc.add_(g.detach(), alpha=w)
                # A gradient that does not depend on theta (e.g. a bias feeding the loss linearly and alone)
                # contributes no curvature; keep it out of the double backward.
                self.grads.append([g if g is not None and g.requires_grad else None for g in grads])
        (num_bad,) = distributed.all_reduce_floats([len(bad)]) if self.data_parallel else [len(bad)]
        if num_bad:
            self.free()
            shown = f" ({bad[0]})" if bad else ""
            raise QBHError(
                f"the loss is not finite{shown} on a data batch; check the labels and the model (a diverged "
                "fine-tune gives NaN weights)"
            )
        self._loss = math.fsum(w * l for w, l in zip(self.weights, self.losses))
        if self.data_parallel:
            (self._loss,) = distributed.all_reduce_floats([self._loss])
            if self._gradient:
                distributed.all_reduce_(self._gradient)
        self.rows = self._compact_rows(lookups, touched, device)
        self.like: list[Tensor] = [
            p if r is None else p.detach().new_empty((r.numel(), *p.shape[1:])) for p, r in zip(self.params, self.rows)
        ]
        self._dense: list[Tensor | None] = [None] * len(self.params)
        self.num_products = 0

    def _compact_rows(
        self, lookups: dict[int, list[Tensor]], touched: list[Tensor], device: torch.device
    ) -> list[Tensor | None]:
        """For each parameter, the rows its table is cut to (None: kept whole).

        A table is cut to the rows looked up when it is not looked up everywhere and its gradient is zero off
        those rows. Under data parallelism both are decided over every rank's batches: the rows are the union of
        the ranks' rows, and a gradient off that union on any rank keeps the table whole.
        """
        ids = {i: torch.unique(torch.cat(v)).cpu() for i, v in lookups.items()}
        if self.data_parallel:
            union: dict[int, list[Tensor]] = {}
            for theirs in distributed.all_gather_objects(ids):
                for i, r in theirs.items():
                    union.setdefault(i, []).append(r)
            ids = {i: torch.unique(torch.cat(v)) for i, v in sorted(union.items())}
        off_rows = []
        for i, rows in ids.items():
            looked_up = torch.zeros(self.params[i].shape[0], dtype=torch.bool, device=device)
            looked_up[rows.to(device)] = True
            off_rows.append(float(bool(touched[i].numel() and (touched[i] & ~looked_up).any())))
        if self.data_parallel and off_rows:
            off_rows = distributed.all_reduce_floats(off_rows, op="max")
        out: list[Tensor | None] = [None] * len(self.params)
        for (i, rows), off in zip(ids.items(), off_rows):
            if rows.numel() < self.params[i].shape[0] and not off:
                out[i] = rows.to(device)
        return out

    def restrict(self, v: Sequence[Tensor]) -> list[Tensor]:
        """A vector shaped like ``params`` -> shaped like :attr:`like` (the looked-up rows of each table)."""
        return _restrict(v, self.rows)

    def expand(self, v: Sequence[Tensor]) -> list[Tensor]:
        """A vector shaped like :attr:`like` -> shaped like ``params`` (zero on the rows not looked up)."""
        return _expand(v, self.params, self.rows)

    def _full(self, i: int, x: Tensor) -> Tensor:
        """Component i as a whole table; a compact one is written into a zero buffer kept for the purpose."""
        if self.rows[i] is None or x.shape == self.params[i].shape:
            return x
        if self._dense[i] is None:
            self._dense[i] = torch.zeros_like(self.params[i], memory_format=torch.contiguous_format).detach()
        return self._dense[i].index_copy_(0, self.rows[i], x)  # the other rows stay zero

    @property
    def loss(self) -> float:
        """The batch-averaged loss at the current parameters (over every rank's batches under data parallelism)."""
        return self._loss

    def gradient(self, sel: Sequence[int] | None = None) -> list[Tensor]:
        """g = dL/dtheta of the batch-averaged loss, shaped like ``params`` (or the parameters ``sel``), detached.

        Raises:
            QBHError: the operator was built without ``keep_gradient=True``.
        """
        if not self._gradient:
            raise QBHError("this Hessian was built without its gradient; pass keep_gradient=True")
        return list(self._gradient) if sel is None else [self._gradient[i] for i in sel]

    def _product(self, sel: Sequence[int], v: Sequence[Tensor]) -> list[Tensor]:
        """H_ss v for the parameters ``self.params[i], i in sel`` (``v`` aligned with ``sel``), the others fixed:
        one double backward per batch from the gradients of ``sel`` to ``sel``, through the graphs kept."""
        params = [self.params[i] for i in sel]
        compact = [self.rows[i] is not None and x.shape != self.params[i].shape for i, x in zip(sel, v)]
        full = [self._full(i, x) for i, x in zip(sel, v)]
        out: list[Tensor | None] = [None] * len(sel)
        for w, grads in zip(self.weights, self.grads):
            pos = [j for j, i in enumerate(sel) if grads[i] is not None]
            if not pos:
                continue
            hv = torch.autograd.grad(
                [grads[sel[j]] for j in pos],
                params,
                grad_outputs=[full[j] for j in pos],
                retain_graph=True,
                allow_unused=True,
            )
            for j, h in enumerate(hv):
                if h is not None:
                    h = h.detach()
                    h = h.index_select(0, self.rows[sel[j]]) if compact[j] else h  # a compact sum: no whole tables
                    h = h if w == 1.0 else h.mul_(w)
                    out[j] = h if out[j] is None else out[j].add_(h)
        hv = [torch.zeros_like(x) if o is None else o for x, o in zip(v, out)]
        return distributed.all_reduce_(hv) if self.data_parallel else hv

    def __call__(self, v: list[Tensor]) -> list[Tensor]:
        """H v for a vector shaped like ``params`` or like :attr:`like`; the result is shaped like ``v``."""
        self.num_products += 1
        return self._product(range(len(self.params)), v)

    def block(self, params: Sequence[nn.Parameter]) -> BlockView:
        """The Hessian of the same loss restricted to ``params`` (some of this operator's parameters), through
        the graphs already built: a product is one double backward from the gradients of ``params`` to
        ``params``, which visits only what they depend on, so it costs what the block's own graph would cost
        (one graph per draw over every block's parameters then serves every block).

        Raises:
            QBHError: a parameter this operator does not cover.
        """
        index = {id(p): i for i, p in enumerate(self.params)}
        missing = [i for i, p in enumerate(params) if id(p) not in index]
        if missing:
            raise QBHError(
                f"parameter {missing[0]} of the block is not among the {len(self.params)} this Hessian's graphs "
                "were built for; build the BlockHessian over every block's parameters"
            )
        return BlockView(self, [index[id(p)] for p in params])

    def free(self) -> None:
        """Drop the graphs (their memory is released once no other reference holds them)."""
        self.grads = []
        self._dense = [None] * len(self.params)


class BlockView:
    """The diagonal block H_ss of a :class:`BlockHessian` for some of its parameters (:meth:`BlockHessian.block`),
    with the same interface: ``like``, ``rows``, ``restrict``, ``expand``, ``loss``, ``num_products`` and
    ``v -> H_ss v``. It shares the parent's graphs; :meth:`free` is the parent's to call."""

    def __init__(self, parent: BlockHessian, sel: Sequence[int]) -> None:
        self.parent = parent
        self.sel = list(sel)
        self.params = [parent.params[i] for i in self.sel]
        self.rows = [parent.rows[i] for i in self.sel]
        self.like = [parent.like[i] for i in self.sel]
        self.num_products = 0

    @property
    def loss(self) -> float:
        return self.parent.loss

    def gradient(self) -> list[Tensor]:
        """g = dL/dtheta over this view's parameters, shaped like ``params``, detached."""
        return self.parent.gradient(self.sel)

    def restrict(self, v: Sequence[Tensor]) -> list[Tensor]:
        """A vector shaped like ``params`` -> shaped like :attr:`like`."""
        return _restrict(v, self.rows)

    def expand(self, v: Sequence[Tensor]) -> list[Tensor]:
        """A vector shaped like :attr:`like` -> shaped like ``params`` (zero on the rows not looked up)."""
        return _expand(v, self.params, self.rows)

    def __call__(self, v: list[Tensor]) -> list[Tensor]:
        """H_ss v for a vector shaped like ``params`` or like :attr:`like`; the result is shaped like ``v``."""
        self.num_products += 1
        return self.parent._product(self.sel, v)

    def free(self) -> None:
        """Nothing to drop: the graphs are the parent's."""


def _restrict(v: Sequence[Tensor], rows: Sequence[Tensor | None]) -> list[Tensor]:
    return [x if r is None else x.index_select(0, r) for x, r in zip(v, rows)]


def _expand(v: Sequence[Tensor], params: Sequence[nn.Parameter], rows: Sequence[Tensor | None]) -> list[Tensor]:
    return [x if r is None else x.new_zeros(p.shape).index_copy_(0, r, x) for x, p, r in zip(v, params, rows)]
