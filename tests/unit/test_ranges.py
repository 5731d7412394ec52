"""quant/ranges.py: the MSE clipping search never loses to max scaling, equals brute force over its grid (its fast
search chooses what trying every ratio chooses, bit for bit), sits within grid resolution of a fine continuous
search, and keeps the fp16 exactness that packing relies on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qbert_hessian.artifacts import BitPlan
from qbert_hessian.errors import QBHError
from qbert_hessian.quant import ranges
from qbert_hessian.quant.functional import QuantSpec, code_range, quant_error, quantize, to_groups
from qbert_hessian.quant.ranges import clip_ratios, mse_range


@st.composite
def weights_with_outliers(draw):
    rg, cg = draw(st.integers(1, 6)), draw(st.integers(1, 3))
    rows, cols = rg * draw(st.integers(1, 6)), cg * draw(st.integers(1, 8))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    w = torch.randn(rows, cols, generator=gen) * draw(st.sampled_from([1e-3, 0.05, 1.0, 30.0]))
    if draw(st.booleans()):  # a few large outliers, the case clipping is for
        idx = torch.randint(0, w.numel(), (max(1, w.numel() // 20),), generator=gen)
        w.view(-1)[idx] *= draw(st.sampled_from([5.0, 20.0, 100.0]))
    if draw(st.booleans()):  # a one-sided group: asymmetric ranges get a nonzero zero point
        w = w.abs()
    return w, (rg, cg)


def group_errors(w: torch.Tensor, grid, bits: int, symmetric: bool, method: str) -> torch.Tensor:
    """||Q(W_g) - W_g||^2 per group, through the same dequantize the packed reload uses."""
    q = quantize(w, bits, grid, symmetric, method)
    return to_groups((q.dequantize() - w).pow(2), grid).sum(dim=1)


@settings(max_examples=80, deadline=None)
@given(weights_with_outliers(), st.integers(2, 8), st.booleans())
def test_mse_never_does_worse_than_max_on_any_group(wg, bits, symmetric):
    w, grid = wg
    e_max, e_mse = (group_errors(w, grid, bits, symmetric, m) for m in ("max", "mse"))
    # The search keeps ratio 1 (the max range, the same fp16 scale) unless another is strictly better.
    assert torch.all(e_mse <= e_max * (1 + 1e-6) + 1e-30), (e_mse, e_max)


@settings(max_examples=60, deadline=None)
@given(weights_with_outliers(), st.integers(2, 8), st.booleans(), st.sampled_from(["max", "mse"]))
def test_searched_scales_are_fp16_and_codes_are_recovered_from_the_weight(wg, bits, symmetric, method):
    """What makes a packed checkpoint reload exactly, for either range method."""
    w, grid = wg
    q = quantize(w, bits, grid, symmetric, method)
    assert torch.equal(q.scale.half().float(), q.scale)
    qmin, qmax = code_range(bits, symmetric)
    assert int(q.codes.min()) >= qmin and int(q.codes.max()) <= qmax
    g = to_groups(q.dequantize(), grid) / q.scale[:, None]
    if q.zero is not None:
        g = g + q.zero[:, None]
    assert torch.equal(torch.round(g).to(torch.int16), q.codes)


def _fp16_up_ref(x: np.ndarray) -> np.ndarray:
    """Independent reference: the smallest float16 >= x (numpy), clamped as ranges.fp16_up clamps."""
    x = np.clip(x, np.float32(2.0**-14), np.float32(60000.0)).astype(np.float32)
    h = x.astype(np.float16)
    return np.where(h.astype(np.float32) < x, np.nextafter(h, np.float16(np.inf)), h).astype(np.float32)


def _errors_ref(g: torch.Tensor, bits: int, symmetric: bool, ratios) -> tuple[np.ndarray, np.ndarray]:
    """Scale and squared error (float64 sum) of one group under each clipping ratio, in numpy float32."""
    qmin, qmax = code_range(bits, symmetric)
    x = g.numpy().astype(np.float32)
    r = np.asarray(ratios, dtype=np.float32)[:, None]
    if symmetric:
        s = _fp16_up_ref(r * np.abs(x).max() / np.float32((2**bits - 1) / 2))
        z = np.zeros_like(s)
    else:
        lo, hi = np.float32(min(x.min(), 0)), np.float32(max(x.max(), 0))
        s = _fp16_up_ref((r * hi - r * lo) / np.float32(2**bits - 1))
        z = np.clip(np.round(-(r * lo) / s), qmin, qmax)
    codes = np.clip(np.round(x[None] / s) + z, qmin, qmax)
    err = ((((codes - z) * s).astype(np.float32) - x[None]).astype(np.float64) ** 2).sum(axis=1)
    return s[:, 0], err


def _brute_force(g: torch.Tensor, bits: int, symmetric: bool, ratios) -> tuple[float, float]:
    """(scale, error) of the best ratio, scanning in order; ties keep the earlier (larger) ratio."""
    scales, errs = _errors_ref(g, bits, symmetric, ratios)
    best = 0
    for k in range(1, len(errs)):
        if errs[k] < errs[best] * (1 - 1e-9):
            best = k
    return float(scales[best]), float(errs[best])


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_search_equals_brute_force_over_the_same_grid(bits, symmetric):
    gen = torch.Generator().manual_seed(bits)
    g = torch.randn(6, 256, generator=gen)
    g[0, :2] = 12.0  # two far outliers: the best ratio is small (0.2-0.4)
    g[1] = g[1].abs() + 0.3  # one-sided
    g[1, 0] = -9.0  # ... with an outlier on the short side
    g[2] = 0.0  # an all-zero group
    g[3] = torch.tan(torch.pi * (torch.rand(256, generator=gen) - 0.5))  # Cauchy: heavy tails
    scale, _ = mse_range(g, bits, symmetric)
    grid = clip_ratios().tolist()
    for i in range(g.shape[0]):
        s_ref, e_ref = _brute_force(g[i], bits, symmetric, grid)
        e_got = float(quant_error(g[i : i + 1], bits, (1, 1), symmetric, "mse"))
        assert e_got == pytest.approx(e_ref, rel=1e-5, abs=1e-12), (i, e_got, e_ref)
        assert float(scale[i]) == s_ref or e_got == pytest.approx(e_ref, rel=1e-6), (i, float(scale[i]), s_ref)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_grid_optimum_is_within_grid_resolution_of_a_fine_search(bits, symmetric):
    gen = torch.Generator().manual_seed(10 + bits)
    g = torch.randn(4, 128, generator=gen)
    g[1, :2] *= 8.0
    g[2, 7] = 30.0  # its best ratio lies near the bottom of the grid
    step = float(clip_ratios()[0] - clip_ratios()[1])
    fine = np.linspace(1.0, ranges.MIN_RATIO, 4000)
    for i in range(g.shape[0]):
        errs = _errors_ref(g[i], bits, symmetric, fine)[1]
        r_star, e_fine = fine[errs.argmin()], errs.min()
        e_grid = quant_error(g[i : i + 1], bits, (1, 1), symmetric, "mse")
        assert e_grid >= e_fine * (1 - 1e-5)  # the fine search sees every grid point's neighbourhood
        # Some grid ratio lies within step/2 of r*, so the grid's optimum is no worse than the worst error there.
        near = errs[np.abs(fine - r_star) <= step / 2 + (fine[0] - fine[1])]
        assert e_grid <= near.max() * (1 + 1e-5), (i, e_grid, near.max())
        assert e_grid <= 1.05 * e_fine, (i, e_grid, e_fine)  # and in practice close to the continuous optimum


def _groups(kind: str, groups: int, n: int, seed: int) -> torch.Tensor:
    """Real-like weight groups: Gaussian, Laplace, Gaussian with 0.3% outliers x20, one-sided, Cauchy; a zero row."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(groups, n, generator=gen) * (0.01 + torch.rand(groups, 1, generator=gen))
    if kind == "laplace":
        u = torch.rand(groups, n, generator=gen) - 0.5
        g = -torch.sign(u) * torch.log1p(-2 * u.abs())
    elif kind == "outliers":
        g.view(-1)[torch.randint(0, g.numel(), (max(1, g.numel() // 300),), generator=gen)] *= 20.0
    elif kind == "one-sided":
        g = g.abs() + 0.1
    elif kind == "cauchy":
        g = torch.tan(torch.pi * (torch.rand(groups, n, generator=gen) - 0.5))
    g[0] = 0.0
    return g


KINDS = ["gauss", "laplace", "outliers", "one-sided", "cauchy"]


@pytest.mark.parametrize("path", ["auto", "binned", "pruned"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("n", [37, 384])
def test_fast_search_chooses_what_trying_every_ratio_chooses_bit_for_bit(monkeypatch, path, symmetric, n):
    """search_ratios skips ratios (a lower bound) or scores them from sorted values (binned), then quantizes the
    survivors; the choice must be search_ratios_dense's exactly, on either path, at every width."""
    if path == "binned":  # every chunk takes the binned path
        monkeypatch.setattr(ranges, "SORT_COST", 0)
        monkeypatch.setattr(ranges, "LEVEL_COST", 0)
    elif path == "pruned":
        monkeypatch.setattr(ranges, "SORT_COST", 10**9)
    used = {"binned": 0, "pruned": 0}
    for name in used:
        real = getattr(ranges, f"_search_{name}")
        monkeypatch.setattr(
            ranges, f"_search_{name}", lambda *a, _f=real, _n=name: used.__setitem__(_n, used[_n] + 1) or _f(*a)
        )
    for seed, kind in enumerate(KINDS):
        g = _groups(kind, 8, n, seed)
        for bits in range(2, 9):
            fast, dense = ranges.search_ratios(g, bits, symmetric), ranges.search_ratios_dense(g, bits, symmetric)
            assert torch.equal(fast, dense), (kind, bits, (fast != dense).nonzero()[:, 0].tolist())
    if path != "auto":  # the path asked for, and only it
        other = "pruned" if path == "binned" else "binned"
        assert used[path] > 0 and used[other] == 0, used


def test_the_tiny_models_cost_table_is_the_dense_searchs_bit_for_bit(tiny_bert, monkeypatch):
    """Every unit, grouping and width of a real (tiny) BERT's profile: the same errors as trying every ratio."""
    from qbert_hessian.quant.profile import measure_profile

    units = ["encoder.0", "encoder.1", "embeddings.word"]
    fast = measure_profile(tiny_bert, units, groups=(1, "heads", "channel"), range_method="mse")
    monkeypatch.setattr(ranges, "search_ratios", ranges.search_ratios_dense)
    dense = measure_profile(tiny_bert, units, groups=(1, "heads", "channel"), range_method="mse")
    assert fast.to_dict() == dense.to_dict()
    errors = [e for u in fast.units.values() for c in u.groups.values() for e in c.error.values()]
    assert len(errors) == 3 * 2 * 7  # 3 units, 1 and channel (heads do not divide the 37-wide FFN), 7 widths


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_binned_errors_equal_quantizing_for_every_ratio(symmetric):
    for seed, kind in enumerate(KINDS):
        g = _groups(kind, 6, 300, seed)
        lo, hi = ranges.group_extent(g, symmetric)
        v, p1, p2 = ranges.sorted_sums(g)
        for bits in (2, 3, 4, 8):
            scale, zero = ranges.clipped_range(lo, hi, clip_ratios()[:, None], bits, symmetric)
            got = ranges.binned_errors(v, p1, p2, scale, zero, bits, symmetric)
            want = ranges.squared_errors(
                g.double(), scale.double(), None if zero is None else zero.double(), bits, symmetric
            )
            assert torch.allclose(got, want, rtol=1e-9, atol=1e-12 * float(p2[:, -1].max())), (kind, bits)


@settings(max_examples=60, deadline=None)
@given(weights_with_outliers(), st.integers(2, 8), st.booleans(), st.integers(1, 40))
def test_clip_bound_never_exceeds_the_error(wg, bits, symmetric, k):
    w, grid = wg
    g = to_groups(w, grid)
    k = min(k, g.shape[1])
    lo, hi = ranges.group_extent(g, symmetric)
    scale, zero = ranges.clipped_range(lo, hi, clip_ratios()[:, None], bits, symmetric)
    bound = ranges.clip_bound(g.topk(k, dim=1).values, (-g).topk(k, dim=1).values, scale, zero, bits, symmetric)
    error = ranges.squared_errors(g, scale, zero, bits, symmetric)
    assert torch.all(bound <= error * (1 + 1e-5) + 1e-30)


def test_mse_search_improves_low_bit_error_with_outliers():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=gen)
    w.view(-1)[torch.randint(0, w.numel(), (40,), generator=gen)] *= 15.0
    for bits in (2, 3, 4):
        e_max, e_mse = (quant_error(w, bits, (16, 1), True, m) for m in ("max", "mse"))
        assert e_mse < 0.8 * e_max, (bits, e_mse, e_max)


@pytest.mark.parametrize("n", [40, 240], ids=["pruned", "binned"])
def test_mse_search_chunking_does_not_change_the_result(monkeypatch, n):
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(13, n, generator=gen) * torch.rand(13, 1, generator=gen)
    for symmetric in (True, False):
        whole = mse_range(g, 2, symmetric)
        monkeypatch.setattr(ranges, "CHUNK_ELEMENTS", 100)  # one group and one or two ratios per block
        chunked = mse_range(g, 2, symmetric)
        monkeypatch.undo()
        assert torch.equal(whole[0], chunked[0])
        assert symmetric or torch.equal(whole[1], chunked[1])


def test_range_method_is_validated_in_specs_and_plans():
    with pytest.raises(QBHError, match="range method 'percentile' is not known; use one of max, mse"):
        QuantSpec(4, 128, True, "percentile")
    with pytest.raises(QBHError, match="plan range_method 'l2' is not known; use one of max, mse"):
        BitPlan(model={}, blocks={}, range_method="l2")
    old = BitPlan(model={}, blocks={"encoder.0": {"bits": 4}}).to_dict()
    del old["range_method"]  # a plan written before range methods existed
    assert BitPlan.from_dict(old).range_method == "max"
    assert BitPlan.from_dict({**old, "range_method": "mse"}).range_method == "mse"


def test_quant_module_searches_mse_ratios_once_and_holds_them_while_training():
    from qbert_hessian.quant.modules import QuantLinear
    from qbert_hessian.quant.ranges import clipped_range, group_extent, search_ratios

    torch.manual_seed(0)
    base = torch.nn.Linear(32, 16)
    with torch.no_grad():
        base.weight.view(-1)[::37] *= 10.0  # outliers, so the ratios are below 1
    spec = QuantSpec(2, "channel", True, "mse")
    m = QuantLinear.from_module(base, spec, (16, 1), "ffn", None)
    assert torch.equal(m.quantized().dequantize(), quantize(base.weight, 2, (16, 1), True, "mse").dequantize())
    held = m.clip_ratio.clone()
    assert bool((held < 1).any())
    assert torch.equal(held, search_ratios(to_groups(base.weight.detach(), (16, 1)), 2, True))
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    x = torch.randn(8, 32)
    for _ in range(2):
        opt.zero_grad()
        m(x).pow(2).sum().backward()
        opt.step()
    assert torch.equal(m.clip_ratio, held)  # no new search while training
    g = to_groups(m.weight.detach(), (16, 1))
    lo, hi = group_extent(g, True)
    assert torch.equal(m.quantized().scale, clipped_range(lo, hi, held, 2, True)[0])  # r * max of the new weight
    train_out = m(x)
    m.eval()
    assert torch.equal(train_out.detach(), m(x))  # training forward and evaluation agree
