"""GELU and softmax whose double backward is cheap: kernels for Hessian-vector products.

A Hessian-vector product by double backward (:mod:`.hvp`) differentiates the graph of the create-graph
gradient once per product. PyTorch's derivative formulas for ``gelu_backward`` and ``_softmax_backward_data``
recompute, on every product, what does not depend on the product's vector: GELU's second derivative (an
``exp`` and a dozen elementwise passes over the FFN's widest activation) and softmax's output-dependent terms
over every attention score. The functions here give the same values and the same derivatives, arranged so
that the vector-independent parts are computed once per graph:

- :class:`Gelu` (exact, erf form): its gradient ``g * GELU'(x)`` is :class:`_GeluGradient`, which keeps
  ``GELU'(x)`` and ``g * GELU''(x)`` from the create-graph backward, so a product pays two multiplications.
- :class:`Softmax` (last dimension): its gradient ``y * (g - <g, y>)`` is :class:`_SoftmaxGradient`, which
  keeps ``g - <g, y>``; a product pays one fused softmax backward and a few elementwise passes.

With GELU(x) = x Phi(x): GELU'(x) = Phi(x) + x phi(x) and GELU''(x) = phi(x) (2 - x^2), phi and Phi the standard
normal density and distribution. Differentiated once more (a third derivative, which no product needs), they
recompute their formulas with a graph instead of using the kept values, so every order stays exact.

Checked against PyTorch's derivatives in float64 (gradcheck, gradgradcheck, third derivatives) and, through a
BERT, against dense Hessians (tests/unit/test_kernels.py). What it buys is measured in benchmarks/PRODUCTS.md.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _gelu_second(x: Tensor) -> Tensor:
    """GELU''(x) = phi(x) (2 - x^2), written so that it is 0 wherever phi underflows, even for an |x| whose square
    would overflow (PyTorch's own formula gives NaN at -1.7e308)."""
    pdf = torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return 2.0 * pdf - x * (x * pdf)


def _gelu_first(x: Tensor) -> Tensor:
    """GELU'(x) = Phi(x) + x phi(x)."""
    return 0.5 * (1.0 + torch.erf(x * _INV_SQRT_2)) + x * (torch.exp(-0.5 * x * x) * _INV_SQRT_2PI)


class _GeluGradient(torch.autograd.Function):
    """(g, x) -> g * GELU'(x), the GELU gradient, with its derivative in closed form.

    For an incoming u: the derivative along g is u * GELU'(x), along x it is u * g * GELU''(x). The
    vector-independent GELU'(x) and g * GELU''(x) are kept from the forward: a product pays two multiplications.
    """

    @staticmethod
    def forward(ctx: Any, g: Tensor, x: Tensor) -> Tensor:
        first = _gelu_first(x)  # once per graph
        ctx.save_for_backward(g, x, first, g * _gelu_second(x))
        return g * first

    @staticmethod
    def backward(ctx: Any, u: Tensor) -> tuple[Tensor, Tensor]:
        g, x, first, g_second = ctx.saved_tensors
        if torch.is_grad_enabled():  # a third derivative is wanted: the formulas with their graph
            return u * _gelu_first(x), u * g * _gelu_second(x)
        return u * first, u * g_second


class Gelu(torch.autograd.Function):
    """The exact GELU, x Phi(x); its gradient is :class:`_GeluGradient` (closed-form derivative)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.nn.functional.gelu(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        if not torch.is_grad_enabled():  # a plain backward: no graph to keep, one fused kernel
            return torch.ops.aten.gelu_backward(grad, x)
        return _GeluGradient.apply(grad, x)


def _softmax_backward(grad: Tensor, y: Tensor) -> Tensor:
    """y * (grad - <grad, y>) over the last dimension, PyTorch's fused kernel."""
    return torch.ops.aten._softmax_backward_data(grad, y, -1, y.dtype)


class _SoftmaxGradient(torch.autograd.Function):
    """(g, y) -> y * (g - <g, y>), the softmax gradient, with its derivative in closed form.

    For an incoming u: the derivative along g is y * (u - <u, y>) (the softmax gradient of u), along y it is
    u * (g - <g, y>) - g <u, y>. The vector-independent g - <g, y> is kept from the forward.
    """

    @staticmethod
    def forward(ctx: Any, g: Tensor, y: Tensor) -> Tensor:
        centered = g - (g * y).sum(-1, keepdim=True)  # once per graph
        ctx.save_for_backward(g, y, centered)
        return y * centered

    @staticmethod
    def backward(ctx: Any, u: Tensor) -> tuple[Tensor, Tensor]:
        g, y, centered = ctx.saved_tensors
        if torch.is_grad_enabled():  # a third derivative is wanted: the same formulas with their graph
            centered = g - (g * y).sum(-1, keepdim=True)
            along_g = y * (u - (u * y).sum(-1, keepdim=True))
        else:
            along_g = _softmax_backward(u, y)
        return along_g, u * centered - g * (u * y).sum(-1, keepdim=True)


class Softmax(torch.autograd.Function):
    """Softmax over the last dimension; its gradient is :class:`_SoftmaxGradient` (closed-form derivative)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        y = torch.softmax(x, dim=-1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        if not torch.is_grad_enabled():
            return _softmax_backward(grad, y)
        return _SoftmaxGradient.apply(grad, y)


def gelu(x: Tensor) -> Tensor:
    """The exact GELU (as ``torch.nn.functional.gelu``) with a cheap double backward."""
    return Gelu.apply(x)


def softmax(x: Tensor, dim: int = -1) -> Tensor:
    """``torch.softmax(x, dim)`` with a cheap double backward."""
    if dim not in (-1, x.dim() - 1):
        return Softmax.apply(x.transpose(dim, -1)).transpose(dim, -1)
    return Softmax.apply(x)
