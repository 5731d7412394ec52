"""Fake-quant drop-ins for ``nn.Linear`` and ``nn.Embedding`` that keep FP32 master weights (optimum-quanto's
``QLinear`` idea without tensor subclasses), and the activation quantizer (Q8BERT's EMA range, calibrated
percentile or MSE ranges, or ZeroQuant's per-token ranges).

``QuantLinear`` *is* an ``nn.Linear`` (same forward signature, same ``weight`` and ``bias``), so HF code, the
Trainer and ``save_pretrained`` keep working. Its forward uses Q(W) with the straight-through estimator, so
QAT trains the master weight. Each group's range follows ``spec.range_method``: ``max`` is recomputed from the
current weight; ``mse`` searches each group's clipping ratio once (``ranges.py``; 100 candidates, too slow for
every training step) and then holds the ratio r, the range following the weight as r * max. After
:meth:`~_QuantWeight.learn_scales` the per-group steps are trainable parameters instead (LSQ, Esser et al. 2020),
initialised from that range, and the forward, :meth:`~_QuantWeight.quantized` and the packed file all use
fp16_up(step). After
:meth:`~_QuantWeight.set_quantized` (what loading a packed checkpoint does) the module holds Q(W) itself and its
stored scales, and uses them as they are. After :meth:`~_QuantWeight.set_rounded` (second-order rounding,
``rounding.py``) it holds the chosen codes the same way and, besides, the grid they were chosen on: once the weight
trains (QAT), it is rounded on that fixed grid (straight-through), so training starts from exactly the rounded
model and the scales GPTQ's error feedback assumed do not move under it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..config import DEFAULT_ACT_RANGE, check_act_range
from ..errors import QBHError
from .functional import (
    Kind,
    Quantized,
    QuantSpec,
    fake_quantize,
    fake_quantize_activation,
    fake_quantize_activation_dynamic,
    fake_quantize_learned,
    fake_quantize_with,
    from_groups,
    quantize,
    quantize_with,
    to_groups,
)
from .ranges import lsq_grad_scale, mse_amax, percentile_amax, search_ratios

# The trainable per-group step of a module after ``learn_scales()``; export writes it as the fp16 scale instead.
SCALE_PARAM = "weight_scale"


class ActQuant(nn.Module):
    """Symmetric ``bits``-bit fake quantization of a linear's input, its range set by ``range_method``.

    - ``max`` (Q8BERT): ``amax`` follows an exponential moving average of max|x| (``momentum``) while the module is
      in training mode or ``observing`` (calibration); in evaluation it is fixed.
    - ``percentile`` / ``mse``: ``amax`` is chosen once from the calibration batches (:meth:`begin_sampling`,
      then :meth:`end_sampling`; ``ranges.percentile_amax``, ``ranges.mse_amax``) and then held, in QAT too
      (the weights train under it). While sampling, the input passes unquantized, so every site is calibrated on
      the model with quantized weights and FP32 activations.
    - ``dynamic`` (ZeroQuant; the default): a range per token computed at run time; nothing is calibrated or
      stored.

    ``amax`` (a static range) is saved with the model.
    """

    def __init__(self, bits: int = 8, momentum: float = 0.9, range_method: str = DEFAULT_ACT_RANGE) -> None:
        super().__init__()
        self.bits = bits
        self.momentum = momentum
        self.range_method = check_act_range(range_method)
        self.observing = False
        self.noise = 0.0
        self.register_buffer("amax", None if range_method == "dynamic" else torch.zeros(()))
        self.register_buffer("num_observed", torch.zeros((), dtype=torch.long), persistent=False)
        self._sample: list[Tensor] | None = None  # |x| kept while sampling (percentile, mse)
        self.peak = 0.0  # the largest |x| seen while sampling
        self._per_batch = 0
        self._generator: torch.Generator | None = None

    @property
    def calibrated(self) -> bool:
        return self.amax is None or bool(self.amax > 0)

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        current = x.detach().abs().amax().float()
        if self.training:
            # Under data parallelism each rank sees a share of the batch: the max over every rank's share is the
            # max over the batch, so every rank's EMA is the one a single process would keep (SyncBatchNorm's idea).
            distributed.all_reduce_max_(current)
        if self.num_observed == 0 and not self.calibrated:
            self.amax.copy_(current)
        else:
            self.amax.mul_(self.momentum).add_((1 - self.momentum) * current)
        self.num_observed += 1

    def begin_sampling(self, per_batch: int, seed: int | Sequence[int]) -> None:
        """Start keeping |x| for a ``percentile`` or ``mse`` range: every value of a batch with at most
        ``per_batch`` of them, else ``per_batch`` drawn uniformly (with replacement, seeded by ``seed``)."""
        if self.range_method not in ("percentile", "mse"):
            raise QBHError(f"activation range {self.range_method} is not calibrated from samples")
        self._sample, self.peak, self._per_batch = [], 0.0, per_batch
        self._generator = torch.Generator().manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))

    @torch.no_grad()
    def _collect(self, x: Tensor) -> None:
        v = x.detach().abs().flatten().float()
        if not v.numel():
            return
        self.peak = max(self.peak, float(v.max()))
        if v.numel() > self._per_batch:
            idx = torch.randint(v.numel(), (self._per_batch,), generator=self._generator)
            v = v[idx.to(v.device)]
        assert self._sample is not None
        self._sample.append(v.cpu())

    def end_sampling(self) -> None:
        """Set ``amax`` from the values kept since :meth:`begin_sampling` (none kept: the range stays unset)."""
        sample, self._sample = self._sample, None
        if not sample:
            return
        values = torch.cat(sample)
        if self.range_method == "percentile":
            amax = percentile_amax(values)
        else:
            amax = mse_amax(values, self.peak, self.bits)
        self.amax.copy_(amax.clamp(min=torch.finfo(torch.float32).tiny))  # an all-zero input still calibrates

    def forward(self, x: Tensor) -> Tensor:
        if self.amax is None:
            return fake_quantize_activation_dynamic(x, self.bits)
        if self._sample is not None:
            self._collect(x)
            return x
        if self.range_method == "max" and (self.training or self.observing):
            self.observe(x)
        if not self.calibrated:
            raise QBHError(
                "activation ranges are not calibrated; run calibrate_activations(model, batches) "
                + ("(or train the model) " if self.range_method == "max" else "")
                + "before evaluating it"
            )
        return fake_quantize_activation(x, self.amax, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, range={self.range_method}" + (
            f", momentum={self.momentum}" if self.range_method == "max" else ""
        )


class _QuantWeight:
    """What QuantLinear and QuantEmbedding share: the weight's spec, grid, fake quantization and cache."""

    weight: nn.Parameter
    spec: QuantSpec
    grid: tuple[int, int]
    kind: Kind
    training: bool

    def _init_quant(self, spec: QuantSpec, grid: tuple[int, int], kind: Kind) -> None:
        self.spec, self.grid, self.kind = spec, grid, kind
        self.noise = 0.0  # Quant-Noise: share of groups left in FP32 per training forward (Fan et al. 2020)
        self._frozen: Quantized | None = None
        self._frozen_version: tuple[int, int] | None = None
        self._cache: tuple[Any, Tensor] | None = None
        self.weight_scale: nn.Parameter | None = None  # LSQ step per group, after learn_scales()
        self.register_buffer("weight_zero", None, persistent=False)  # type: ignore[attr-defined]  # its zero points
        self.register_buffer("clip_ratio", None, persistent=False)  # type: ignore[attr-defined]  # mse: held ratios
        # the grid of set_rounded (scales, zero points per group): held while the weight trains
        self.register_buffer("grid_scale", None, persistent=False)  # type: ignore[attr-defined]
        self.register_buffer("grid_zero", None, persistent=False)  # type: ignore[attr-defined]
        self.rounding = "nearest"  # how the codes were chosen: nearest, or gptq (set_rounded)

    def quantized(self) -> Quantized:
        """Integer codes and scales of the current weight (the stored ones after ``set_quantized``)."""
        if self._frozen is not None and self._frozen_key() == self._frozen_version:
            return self._frozen
        if self.weight_scale is not None:
            return quantize_with(self.weight, self.weight_scale, self.weight_zero, self.spec.bits, self.grid)
        if self.grid_scale is not None:
            return quantize_with(self.weight, self.grid_scale, self.grid_zero, self.spec.bits, self.grid)
        spec = self.spec
        return quantize(self.weight, spec.bits, self.grid, spec.symmetric, spec.range_method, self._clip_ratio())

    def _clip_ratio(self) -> Tensor | None:
        """The ``mse`` clipping ratio per group, searched on the first call and held after (None for ``max``)."""
        if self.spec.range_method != "mse":
            return None
        if self.clip_ratio is None:
            g = to_groups(self.weight.detach().float(), self.grid)
            self.clip_ratio = search_ratios(g, self.spec.bits, self.spec.symmetric)
        return self.clip_ratio

    def learn_scales(self) -> None:
        """Make the per-group steps trainable (LSQ), starting from the current range (``spec.range_method``).

        The zero points of an asymmetric spec stay at their initial values (LSQ+ would learn them too).
        """
        if self.weight_scale is not None:
            return
        q = self.quantized()
        self.weight_scale = nn.Parameter(q.scale.clone().to(self.weight.device))  # type: ignore[misc]
        self.weight_zero = None if q.zero is None else q.zero.float().to(self.weight.device)
        self._frozen = None
        self._cache = None

    def _grad_scale(self) -> float:
        rows, cols = self.weight.shape
        return lsq_grad_scale(rows * cols // (self.grid[0] * self.grid[1]), self.spec.bits, self.spec.symmetric)

    def set_quantized(self, q: Quantized) -> None:
        """Hold ``q``: the weight becomes Q(W), and forward uses it as is (a loaded packed checkpoint)."""
        with torch.no_grad():
            self.weight.copy_(q.dequantize().to(self.weight.dtype))
        self._frozen = q
        self._frozen_version = self._frozen_key()

    def set_rounded(self, q: Quantized, rounding: str) -> None:
        """Hold codes chosen by a rounding other than nearest (``rounding``, e.g. ``gptq``) on the module's own grid.

        The weight becomes Q(W) and the forward uses ``q``'s codes as they are (as :meth:`set_quantized`); when the
        weight then trains, it is rounded on ``q``'s grid (scales and zero points fixed), not on a range searched
        afresh, so the codes stay on the grid they were chosen for.
        """
        self.set_quantized(q)
        dev = self.weight.device
        self.grid_scale = q.scale.detach().float().to(dev)
        self.grid_zero = None if q.zero is None else q.zero.detach().to(dev)
        self.rounding = rounding
        self._cache = None

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # Moving the module (``.to(device)``) must keep the stored codes, not re-quantize Q(W).
        valid = self._frozen is not None and self._frozen_key() == self._frozen_version
        out = super()._apply(fn, recurse)  # type: ignore[misc]
        if valid and self._frozen is not None:
            q, dev = self._frozen, self.weight.device
            q.codes, q.scale = q.codes.to(dev), q.scale.to(dev)
            q.zero = q.zero.to(dev) if q.zero is not None else None
            self._frozen_version = self._frozen_key()
        return out

    def _frozen_key(self) -> tuple[int, int]:
        return (self.weight._version, self.weight.data_ptr())

    def qweight(self) -> Tensor:
        """The weight the forward pass uses: Q(W), with the straight-through gradient to W.

        A training forward drops the held codes (:meth:`set_quantized`, :meth:`set_rounded`): the weight is about
        to move, and the version counter cannot be trusted to say when it has (a fused optimizer step, the
        Trainer's default, updates the weight in place without counting a version), so from the first training
        forward on the weight is fake-quantized (on the held grid after :meth:`set_rounded`).
        """
        if self.training and torch.is_grad_enabled():
            self._frozen = None
            self._cache = None
            q = self._fake_quantize()
            if self.noise > 0:
                q = self._quant_noise(q)
            return q
        if self._frozen is not None and self._frozen_key() == self._frozen_version:
            return self.weight
        key = (self._frozen_key(), self.weight.dtype, self._scale_key())
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.quantized().dequantize().to(self.weight.dtype))
        return self._cache[1]

    def _fake_quantize(self) -> Tensor:
        if self.weight_scale is not None:
            return fake_quantize_learned(
                self.weight, self.weight_scale, self.weight_zero, self.spec.bits, self.grid, self._grad_scale()
            )
        if self.grid_scale is not None:
            return fake_quantize_with(self.weight, self.grid_scale, self.grid_zero, self.spec.bits, self.grid)
        spec = self.spec
        return fake_quantize(self.weight, spec.bits, self.grid, spec.symmetric, spec.range_method, self._clip_ratio())

    def _scale_key(self) -> tuple[int, int] | None:
        s = self.weight_scale
        return None if s is None else (s._version, s.data_ptr())

    def _quant_noise(self, q: Tensor) -> Tensor:
        """Keep a random share ``noise`` of the groups in FP32 for this forward (Quant-Noise)."""
        rows = to_groups(q, self.grid).shape[0]
        keep_fp = (torch.rand(rows, 1, device=q.device) < self.noise).to(q.dtype)
        w_g, q_g = to_groups(self.weight, self.grid), to_groups(q, self.grid)
        return from_groups(keep_fp * w_g + (1 - keep_fp) * q_g, tuple(q.shape), self.grid)  # type: ignore[arg-type]


class QuantLinear(_QuantWeight, nn.Linear):
    """``nn.Linear`` with group-wise fake-quantized weights and, optionally, 8-bit fake-quantized inputs."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        spec: QuantSpec,
        grid: tuple[int, int],
        kind: Kind,
        act_bits: int | None = 8,
        act_range: str = DEFAULT_ACT_RANGE,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._init_quant(spec, grid, kind)
        self.act = ActQuant(act_bits, range_method=act_range) if act_bits else None

    @classmethod
    def from_module(
        cls,
        module: nn.Linear,
        spec: QuantSpec,
        grid: tuple[int, int],
        kind: Kind,
        act_bits: int | None,
        act_range: str = DEFAULT_ACT_RANGE,
    ) -> QuantLinear:
        """A QuantLinear sharing ``module``'s weight and bias parameters."""
        q = cls(
            module.in_features,
            module.out_features,
            module.bias is not None,
            spec=spec,
            grid=grid,
            kind=kind,
            act_bits=act_bits,
            act_range=act_range,
            device="meta",
        )
        q.weight, q.bias = module.weight, module.bias
        if q.act is not None:
            q.act.to(module.weight.device)
        q.train(module.training)
        return q

    def forward(self, x: Tensor) -> Tensor:
        if self.act is not None:
            x = self.act(x)
        return F.linear(x, self.qweight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.spec.bits}, groups={self.spec.groups}, grid={self.grid}"


class QuantEmbedding(_QuantWeight, nn.Embedding):
    """``nn.Embedding`` with a fake-quantized table (its own bits; rows grouped per ``spec.groups``)."""

    @classmethod
    def from_module(cls, module: nn.Embedding, spec: QuantSpec, grid: tuple[int, int]) -> QuantEmbedding:
        q = cls(module.num_embeddings, module.embedding_dim, module.padding_idx, device="meta")
        q.weight = module.weight
        q.max_norm, q.norm_type = module.max_norm, module.norm_type
        q.scale_grad_by_freq, q.sparse = module.scale_grad_by_freq, module.sparse
        q._init_quant(spec, grid, "embedding")
        q.train(module.training)
        return q

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (nn.Embedding's signature)
        return F.embedding(
            input, self.qweight(), self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.spec.bits}, groups={self.spec.groups}"


QUANT_MODULES = (QuantLinear, QuantEmbedding)
