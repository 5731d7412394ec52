"""quant/functional.py: rounding and grouping properties (hypothesis) and the grids of BERT-shaped matrices."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qbert_hessian.errors import QBHError
from qbert_hessian.quant.functional import (
    QuantSpec,
    code_range,
    fake_quantize,
    fake_quantize_activation,
    from_groups,
    group_layout,
    quantize,
    to_groups,
)


@st.composite
def grouped_weights(draw):
    rg, cg = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    rows, cols = rg * draw(st.integers(1, 5)), cg * draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([1e-3, 0.05, 1.0, 30.0]))
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    return w, (rg, cg)


SETTINGS = settings(max_examples=60, deadline=None)


@SETTINGS
@given(grouped_weights(), st.integers(2, 8), st.booleans())
def test_quantize_error_within_half_a_step(wg, bits, symmetric):
    w, grid = wg
    q = quantize(w, bits, grid, symmetric)
    err = to_groups((q.dequantize() - w).abs(), grid)
    # Scales come from the group's range, so nothing is clipped: every weight lies inside the range.
    assert torch.all(err <= q.scale[:, None] / 2 * (1 + 1e-6) + 1e-12)


@SETTINGS
@given(grouped_weights(), st.integers(2, 8), st.booleans())
def test_codes_stay_in_range_and_use_at_most_2_to_the_b_levels(wg, bits, symmetric):
    w, grid = wg
    q = quantize(w, bits, grid, symmetric)
    qmin, qmax = code_range(bits, symmetric)
    assert int(q.codes.min()) >= qmin and int(q.codes.max()) <= qmax
    assert (qmin, qmax) == ((-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1))
    deq = to_groups(q.dequantize(), grid)
    assert all(len(torch.unique(row)) <= 2**bits for row in deq)


@SETTINGS
@given(grouped_weights(), st.integers(2, 8), st.booleans())
def test_stored_codes_are_recovered_from_the_dequantized_weight(wg, bits, symmetric):
    """What makes a packed checkpoint reload exactly: round(Q(w) / s) + z gives back the codes."""
    w, grid = wg
    q = quantize(w, bits, grid, symmetric)
    g = to_groups(q.dequantize(), grid) / q.scale[:, None]
    if q.zero is not None:
        g = g + q.zero[:, None]
    assert torch.equal(torch.round(g).to(torch.int16), q.codes)
    # Scales are stored as float16: they must be exactly representable.
    assert torch.equal(q.scale.half().float(), q.scale)


@SETTINGS
@given(grouped_weights())
def test_ungroup_of_group_is_identity(wg):
    w, grid = wg
    g = to_groups(w, grid)
    assert g.shape == (grid[0] * grid[1], w.numel() // (grid[0] * grid[1]))
    assert torch.equal(from_groups(g, tuple(w.shape), grid), w)


def test_groups_are_contiguous_head_blocks():
    w = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6)
    g = to_groups(w, (2, 3))  # 2 row buckets x 3 column blocks
    assert torch.equal(g[1], w[0:4, 2:4].reshape(-1))
    assert torch.equal(g[3], w[4:8, 0:2].reshape(-1))


@pytest.mark.parametrize(
    ("kind", "shape", "groups", "grid"),
    [
        ("qkv", (768, 768), "heads", (12, 1)),
        ("attn_out", (768, 768), "heads", (1, 12)),
        ("ffn", (3072, 768), "heads", (12, 1)),
        ("qkv", (768, 768), 128, (128, 1)),
        ("attn_out", (768, 768), 128, (128, 1)),  # 128 is no multiple of 12: output-row buckets
        ("attn_out", (768, 768), 48, (4, 12)),  # 4 row buckets inside each head's columns
        ("ffn", (3072, 768), 128, (128, 1)),
        ("ffn", (768, 3072), 128, (128, 1)),
        ("qkv", (768, 768), "channel", (768, 1)),
        ("qkv", (768, 768), 1, (1, 1)),
        ("embedding", (30522, 768), "channel", (30522, 1)),
    ],
    ids=lambda v: str(v),
)
def test_group_layout_on_bert_base_shapes(kind, shape, groups, grid):
    assert group_layout(shape, groups, kind=kind, num_heads=12) == grid
    w = torch.randn(*shape) if shape[0] * shape[1] < 3_000_000 else None
    if w is not None:
        assert quantize(w, 4, grid).scale.numel() == grid[0] * grid[1]


def test_group_layout_refuses_groups_that_do_not_divide():
    with pytest.raises(QBHError, match=r"encoder\.0\.ffn_in: groups=heads do not divide its 37x32"):
        group_layout((37, 32), "heads", kind="ffn", num_heads=4, name="encoder.0.ffn_in")
    with pytest.raises(QBHError, match="groups=5"):
        group_layout((32, 32), 5, kind="qkv", num_heads=4)
    with pytest.raises(QBHError, match="needs attention heads"):
        group_layout((99, 32), "heads", kind="embedding", num_heads=4)


@pytest.mark.parametrize("bad", [0, 1, 9, "4", 2.5, True])
def test_spec_refuses_bits_out_of_range(bad):
    with pytest.raises(QBHError, match="out of range|is not an integer"):
        QuantSpec(bad)


@pytest.mark.parametrize("bad", ["rows", 0, -3, "1.5"])
def test_spec_refuses_unknown_groups(bad):
    with pytest.raises(QBHError, match="not valid"):
        QuantSpec(4, bad)


def test_fake_quantize_equals_quantize_dequantize_and_passes_gradients():
    w = torch.randn(12, 8, requires_grad=True)
    out = fake_quantize(w, 3, (4, 1))
    assert torch.equal(out.detach(), quantize(w, 3, (4, 1)).dequantize())
    (out * torch.arange(96.0).reshape(12, 8)).sum().backward()
    assert torch.equal(w.grad, torch.arange(96.0).reshape(12, 8))  # straight through


def test_activation_quantizer_clips_and_masks_gradients_outside_the_range():
    x = torch.tensor([-3.0, -1.0, 0.3, 0.999, 2.0], requires_grad=True)
    y = fake_quantize_activation(x, torch.tensor(1.0), bits=8)
    assert torch.allclose(y[[0, 4]], torch.tensor([-1.0, 1.0]))
    assert torch.all((y[1:4] - x[1:4]).abs() <= 0.5 / 127 + 1e-7)
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))
