"""The second-order kernels (hessian/kernels.py) and the model swap that uses them (models.curvature_kernels):
the same values and first and second derivatives as PyTorch's, checked in float64 and through a BERT against
the dense Hessian, with padding (the attention mask must reach the swapped attention)."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from qbert_hessian.hessian import vec
from qbert_hessian.hessian.hvp import BlockHessian, curvature_mode, grads_enabled
from qbert_hessian.hessian.kernels import gelu, softmax
from qbert_hessian.models import BlockMap, curvature_kernels
from tests.helpers import dense_block_hessian, random_batch
from tests.unit.test_hvp import ragged_batch


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).requires_grad_()


@pytest.mark.parametrize("fn", [gelu, softmax, lambda x: softmax(x, dim=0)], ids=["gelu", "softmax", "softmax-dim0"])
def test_first_and_second_derivatives_match_finite_differences(fn):
    x = _x(3, 5) * 3  # GELU's curvature lives within a few units of 0
    x = x.detach().requires_grad_()
    assert gradcheck(fn, (x,))
    assert gradgradcheck(fn, (x,))


@pytest.mark.parametrize(
    "fn,stock,masked",
    [
        (gelu, torch.nn.functional.gelu, False),
        (softmax, lambda t: torch.softmax(t, -1), False),
        (softmax, lambda t: torch.softmax(t, -1), True),
    ],
    ids=["gelu", "softmax", "softmax-masked"],
)
def test_hessian_vector_products_equal_pytorchs(fn, stock, masked):
    """A loss that is not linear in the output (squares); masked: scores at padding, as HF's additive mask writes
    them (dtype min)."""
    x = _x(4, 6)
    offset = torch.zeros(4, 6, dtype=torch.float64)
    if masked:
        offset[:, 4:] = torch.finfo(torch.float64).min
    w, v = _x(4, 6, seed=1).detach(), _x(4, 6, seed=2).detach()

    def hvp(f):
        (g,) = torch.autograd.grad((f(x + offset) ** 2 * w).sum(), x, create_graph=True)
        return torch.autograd.grad(g, x, v)[0]

    torch.testing.assert_close(hvp(fn), hvp(stock), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fn(x), stock(x), rtol=0, atol=0)


def test_gelu_stays_finite_where_its_square_would_overflow():
    """PyTorch's own double backward of GELU gives NaN at -1.7e308; the product there is 0."""
    x = torch.tensor([-1.7e308, -40.0, 3.0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(gelu(x).pow(2).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g, x, torch.ones(3, dtype=torch.float64))
    assert torch.isfinite(h).all() and h[0] == 0.0


@pytest.mark.parametrize("fn,stock", [(gelu, torch.nn.functional.gelu), (softmax, lambda t: torch.softmax(t, -1))])
def test_third_derivatives_are_exact_too(fn, stock):
    """Differentiating a product again must not see the cached second derivatives as constants."""
    x, w = _x(3, 4), _x(3, 4, seed=1).detach()

    def third(f):
        (g,) = torch.autograd.grad((f(x) ** 2 * w).sum(), x, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), x, create_graph=True)
        return torch.autograd.grad(h.sum(), x)[0]

    torch.testing.assert_close(third(fn), third(stock), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("block", ["encoder.0", "embeddings"])
def test_products_through_the_swapped_model_equal_the_dense_hessian(micro_bert, block):
    """Padded rows included: a swapped attention that lost the mask would fail here."""
    batch = ragged_batch(micro_bert.config.vocab_size, [3, 9, 5, 12])
    params = BlockMap(micro_bert).parameters(block)
    H = dense_block_hessian(micro_bert, params, batch)
    v = vec.randn_like(params, torch.Generator().manual_seed(5))
    with curvature_kernels(micro_bert), curvature_mode(micro_bert), grads_enabled(params):
        hv = BlockHessian(micro_bert, params, [batch], length_buckets=1)(v)
    assert torch.allclose(vec.flatten(hv), H @ vec.flatten(v), rtol=1e-4, atol=1e-5)


def test_the_swap_changes_no_output_and_is_undone(micro_bert):
    batch = random_batch(micro_bert.config.vocab_size, num_labels=3)
    act = micro_bert.bert.encoder.layer[0].intermediate.intermediate_act_fn
    before = micro_bert.config._attn_implementation
    with torch.no_grad():
        expected = micro_bert(**batch).logits
        with curvature_kernels(micro_bert):
            assert micro_bert.bert.encoder.layer[0].intermediate.intermediate_act_fn is not act
            assert micro_bert.config._attn_implementation != before
            swapped = micro_bert(**batch).logits
    torch.testing.assert_close(swapped, expected, rtol=1e-5, atol=1e-6)
    assert micro_bert.bert.encoder.layer[0].intermediate.intermediate_act_fn is act
    assert micro_bert.config._attn_implementation == before


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_every_family_swaps_both_kernels_and_keeps_its_hessian(family):
    import transformers as tf

    torch.manual_seed(0)
    if family == "roberta":
        config = tf.RobertaConfig(
            vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12,
            max_position_embeddings=20, attn_implementation="eager",
        )  # fmt: skip
        model = tf.RobertaForSequenceClassification(config).eval()
    else:
        config = tf.DistilBertConfig(
            vocab_size=30, dim=8, n_layers=1, n_heads=2, hidden_dim=12, max_position_embeddings=16,
            attn_implementation="eager",
        )  # fmt: skip
        model = tf.DistilBertForSequenceClassification(config).eval()
    batch = ragged_batch(30, [3, 9, 5, 12])
    if family == "distilbert":
        del batch["token_type_ids"]
    else:
        batch["input_ids"] = batch["input_ids"] + 2 * batch["attention_mask"]  # RoBERTa: ids >= 2 (1 is padding)
    batch["labels"] = batch["labels"] % 2
    params = BlockMap(model).parameters("encoder.0")
    H = dense_block_hessian(model, params, batch)
    v = vec.randn_like(params, torch.Generator().manual_seed(2))
    gelus = sum(type(m).__name__ == "GELUActivation" for m in model.modules())
    with curvature_kernels(model), curvature_mode(model), grads_enabled(params):
        assert model.config._attn_implementation != "eager"
        assert gelus and not any(type(m).__name__ == "GELUActivation" for m in model.modules())
        hv = BlockHessian(model, params, [batch], length_buckets=1)(v)
    assert torch.allclose(vec.flatten(hv), H @ vec.flatten(v), rtol=1e-4, atol=1e-5)
