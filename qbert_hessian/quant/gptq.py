"""Second-order rounding onto a fixed grid: GPTQ (Frantar et al., ICLR 2023), after OBS / OBQ (Hassibi & Stork
1993; Frantar & Alistarh 2022).

A linear layer y = W x with W (out, in) sees calibration inputs X (in, n). Rounding W to Q changes its outputs
by (W - Q) X; GPTQ minimises that change, row by row, under the layer-input Hessian

    H = 2 X X^T  (in, in),      E(Q) = tr((W - Q) H (W - Q)^T) / 2,

one input column at a time: column j is rounded to its nearest level, and its error e_j = w_j - q_j is spread
over the columns not yet rounded by the optimal (OBS) update, the rows of the inverse Hessian restricted to them:

    W[:, F] -= (e_j / [H_F^-1]_jj) [H_F^-1]_{j, F}       (F: the columns after j)

The rows [H_F^-1]_{j, :} / sqrt([H_F^-1]_jj) of every step are the rows of the upper Cholesky factor U of H^-1
(H^-1 = U^T U), so one Cholesky replaces the per-step eliminations, and the updates to columns outside a block of
``block_size`` columns are applied once per block as one matrix product ("lazy batch updates"; the numbers are
those of the plain sweep, only the order of the additions differs).

Choices, as the reference implementation (IST-DASLab/gptq ``fasterquant``) makes them:

- dampening: H + lambda I with lambda = ``damp`` x mean(diag H) (1%), so H is positive definite;
- act-order: columns in order of decreasing diag(H) (the inputs with the most energy first, while the most
  columns are left to absorb their error);
- static groups: the grid (every group's scale and zero point) is fixed beforehand, by the range search of
  ``ranges.py``, whatever the order; act-order then changes which codes are chosen, never a scale, so the packed
  format, the fake-quant modules and export take GPTQ's codes unchanged.
- a dead input (diag(H) = 0: the input is zero on every calibration token) has no curvature: its column is
  decoupled from the others in H^-1 and keeps its nearest rounding (the reference zeroes such weights; keeping
  them costs nothing on the calibration data and keeps the layer right where that input does fire).

GPTQ is greedy: each column's rounding is the best given the columns before it, not jointly. On layer-like
inputs it lowers the layer-output error well below nearest rounding's, but on a small or badly conditioned H its
error feedback (and the clamping at the grid's ends) can lose. :func:`round_layer` therefore keeps nearest's codes
for a layer where GPTQ's error on the calibration inputs would be the larger: the rounding a model gets is never
worse, layer by layer, than nearest on the data it was calibrated on.

A column is rounded by the one encoder of ``ranges.py`` in float32, so a layer whose H is diagonal (no error
feedback) gets exactly round-to-nearest's codes. That is the case of an embedding table: its input is one-hot, so
X X^T is diagonal and GPTQ reduces to round-to-nearest; the tables keep nearest rounding.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..config import GPTQConfig
from ..errors import QBHError
from .functional import Quantized, from_groups, to_groups
from .ranges import code_range, encode

DEFAULT_DAMP = GPTQConfig.damp
DEFAULT_BLOCK_SIZE = GPTQConfig.block_size


class InputHessian:
    """H = 2 X X^T / n accumulated over a layer's calibration inputs, padding excluded.

    ``add(x, mask)`` takes a batch of inputs ``x`` (batch, seq, in) and the real-token mask (batch, seq); only
    real tokens enter X, and H is the mean over all real tokens seen (every token weighs the same, however the
    sequences were batched). Accumulated in float64.
    """

    def __init__(self, num_inputs: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(num_inputs, num_inputs, dtype=torch.float64, device=device)
        self.num_tokens = 0

    @torch.no_grad()
    def add(self, x: Tensor, mask: Tensor | None = None) -> None:
        if mask is not None:
            if tuple(mask.shape) != tuple(x.shape[:-1]):
                raise QBHError(
                    f"a layer input of shape {tuple(x.shape)} does not match its batch's token mask "
                    f"{tuple(mask.shape)}; second-order rounding needs inputs shaped (batch, seq, features)"
                )
            x = x[mask.bool()]  # (real tokens, in)
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum += (x.T @ x).double()  # float32 products, float64 sum
        self.num_tokens += x.shape[0]

    @property
    def H(self) -> Tensor:  # noqa: N802 (the paper's symbol)
        """2 X X^T / n (in, in), float64."""
        if not self.num_tokens:
            raise QBHError("the layer saw no calibration tokens; pass calibration data with real (unpadded) tokens")
        return 2 * self.sum / self.num_tokens


def element_grid(q: Quantized) -> tuple[Tensor, Tensor | None]:
    """The scale (and zero point) of every weight: (out, in) float32 from the per-group ones of ``q``."""
    n = q.codes.shape[1]
    scale = from_groups(q.scale[:, None].expand(-1, n), q.shape, q.grid)
    zero = None if q.zero is None else from_groups(q.zero.float()[:, None].expand(-1, n), q.shape, q.grid)
    return scale, zero


def output_error(w: Tensor, q: Tensor, H: Tensor) -> float:  # noqa: N803
    """tr((W - Q) H (W - Q)^T): the change of the layer's outputs, summed over the calibration tokens (x n / 2).

    The product runs in float32 (a diagnostic and a comparison, not part of the rounding), the sum in float64.
    """
    d = (w.detach().float() - q.float()).to(H.device)
    return float(((d @ H.float()) * d).double().sum())


@dataclasses.dataclass
class LayerRounding:
    """One layer's second-order rounding: the codes kept, and the layer-output errors tr(dW H dW^T) of nearest
    rounding and of GPTQ's sweep on the calibration inputs (``kept``: ``gptq``, or ``nearest`` where the sweep
    would have raised the error)."""

    quantized: Quantized
    error_nearest: float
    error_gptq: float
    kept: str


def round_layer(
    w: Tensor,
    H: Tensor,  # noqa: N803
    nearest: Quantized,
    *,
    damp: float = DEFAULT_DAMP,
    block_size: int = DEFAULT_BLOCK_SIZE,
    act_order: bool = True,
) -> LayerRounding:
    """:func:`gptq_quantize`, keeping ``nearest``'s codes where GPTQ's layer-output error under ``H`` (undamped)
    would be the larger; arguments as there."""
    q = gptq_quantize(w, H, nearest, damp=damp, block_size=block_size, act_order=act_order)
    e_near, e_gptq = output_error(w, nearest.dequantize(), H), output_error(w, q.dequantize(), H)
    if e_gptq > e_near:
        return LayerRounding(nearest, e_near, e_gptq, "nearest")
    return LayerRounding(q, e_near, e_gptq, "gptq")


@torch.no_grad()
def gptq_quantize(
    w: Tensor,
    H: Tensor,  # noqa: N803
    grid: Quantized,
    *,
    damp: float = DEFAULT_DAMP,
    block_size: int = DEFAULT_BLOCK_SIZE,
    act_order: bool = True,
) -> Quantized:
    """Round ``w`` onto the fixed grid of ``grid`` by GPTQ's column sweep under the input Hessian ``H``.

    Args:
        w: the weight (out, in).
        H: the layer-input Hessian 2 X X^T (in, in), e.g. :attr:`InputHessian.H`.
        grid: the weight quantized to nearest on its grid (:func:`~.functional.quantize`): its scales and zero
            points (fixed; the range search chose them) and layout are kept, its codes replaced.
        damp: lambda / mean(diag H), the dampening added to the diagonal (> 0).
        block_size: columns per lazy batch (the codes do not depend on it beyond float rounding).
        act_order: sweep the columns by decreasing diag(H) instead of in order.

    Returns:
        The GPTQ codes on ``grid``'s grid (same scales, zero points, bits, shape and layout).

    Raises:
        QBHError: shapes that do not match, a bad ``damp`` or ``block_size``, or an H that stays indefinite after
            dampening.
    """
    out_f, in_f = grid.shape
    if tuple(w.shape) != (out_f, in_f) or tuple(H.shape) != (in_f, in_f):
        raise QBHError(f"GPTQ needs W {grid.shape} and H ({in_f}, {in_f}); got W {tuple(w.shape)}, H {tuple(H.shape)}")
    if not (isinstance(damp, (int, float)) and damp > 0):
        raise QBHError(f"dampening {damp!r} must be a positive fraction of the mean Hessian diagonal, e.g. 0.01")
    if not (isinstance(block_size, int) and block_size > 0):
        raise QBHError(f"block size {block_size!r} must be a positive integer, e.g. 128")
    device = w.device
    qmin, qmax = code_range(grid.bits, grid.zero is None)
    S, Z = element_grid(grid)  # (out, in) each
    W = w.detach().double().clone()
    H = H.detach().to(device=device, dtype=torch.float64).clone()

    dead = torch.diagonal(H) <= 0
    live = ~dead
    if not bool(live.any()):  # no input ever fired: nothing to compensate with
        codes = encode(w.detach().float()[..., None], S, Z, qmin, qmax)[..., 0]  # each weight its own "group"
        return _with_codes(grid, codes)
    lam = damp * torch.diagonal(H)[live].mean()
    H[dead, :] = 0
    H[:, dead] = 0
    H.diagonal().add_(torch.where(dead, 1.0, lam))  # a dead column: decoupled (its own 1 x 1 block)

    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(in_f)
    perm = perm.to(device)
    W, H, S = W[:, perm], H[perm][:, perm], S[:, perm]
    Z = None if Z is None else Z[:, perm]

    U = _inverse_cholesky(H)  # upper: H^-1 = U^T U
    codes = torch.empty(out_f, in_f, dtype=torch.float32, device=device)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()
        E1 = torch.empty_like(W1)  # (out, block): scaled errors e_j / U_jj
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            s, z = S[:, j], None if Z is None else Z[:, j]  # (out,): each row's level spacing in column j
            c = encode(W1[:, i : i + 1].float(), s, z, qmin, qmax)[:, 0]  # the one rounding rule, in float32
            codes[:, j] = c
            q = ((c if z is None else c - z) * s).double()
            e = (W1[:, i] - q) / U1[i, i]
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            E1[:, i] = e
        W[:, i2:] -= E1 @ U[i1:i2, i2:]  # the lazy batch update of the columns after the block
    codes = codes[:, torch.argsort(perm)]
    return _with_codes(grid, codes)


def _inverse_cholesky(H: Tensor) -> Tensor:  # noqa: N803
    """The upper Cholesky factor of H^-1 (H symmetric positive definite), in float64."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if int(info) != 0:
        raise QBHError(
            "the layer-input Hessian is not positive definite even after dampening; raise --damp (e.g. 0.1) or "
            "calibrate on more sequences (--calib-samples)"
        )
    return U


def _with_codes(grid: Quantized, codes: Tensor) -> Quantized:
    """``grid`` with its codes replaced by ``codes`` (out, in), grouped as the grid's."""
    grouped = to_groups(codes, grid.grid).to(torch.int16)
    return Quantized(grouped, grid.scale, grid.zero, grid.bits, grid.shape, grid.grid)
