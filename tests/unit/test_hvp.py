from __future__ import annotations

import pytest
import torch

from qbert_hessian.errors import QBHError
from qbert_hessian.hessian import vec
from qbert_hessian.hessian.hvp import BlockHessian, curvature_mode, grads_enabled
from qbert_hessian.models import BlockMap
from tests.helpers import dense_block_hessian, random_batch


@pytest.mark.parametrize("block", ["encoder.0", "embeddings.position", "encoder.0.ffn_out"])
def test_hvp_equals_dense_hessian_times_vector(micro_bert, block):
    batch = random_batch(micro_bert.config.vocab_size, num_labels=3)
    params = BlockMap(micro_bert).parameters(block)
    H = dense_block_hessian(micro_bert, params, batch)
    v = vec.randn_like(params, torch.Generator().manual_seed(3))
    hv = BlockHessian(micro_bert, params, [batch])(v)
    assert torch.allclose(vec.flatten(hv), H @ vec.flatten(v), rtol=1e-4, atol=1e-5)


def test_hvp_averages_batches_by_size(micro_bert):
    """Two batches (sizes 2 and 4) give the Hessian of the size-weighted mean loss, i.e. of the joint batch."""
    full = random_batch(micro_bert.config.vocab_size, batch_size=6, num_labels=3)
    parts = [{k: t[:2] for k, t in full.items()}, {k: t[2:] for k, t in full.items()}]
    params = BlockMap(micro_bert).parameters("encoder.0.value")
    v = vec.randn_like(params, torch.Generator().manual_seed(0))
    joint = BlockHessian(micro_bert, params, [full])
    split = BlockHessian(micro_bert, params, parts)
    assert torch.allclose(vec.flatten(joint(v)), vec.flatten(split(v)), rtol=1e-4, atol=1e-6)
    assert split.loss == pytest.approx(joint.loss, rel=1e-5)


def test_hvp_rejects_non_finite_loss(micro_bert):
    import copy

    broken = copy.deepcopy(micro_bert)
    with torch.no_grad():
        broken.classifier.weight.fill_(float("nan"))
    batch = random_batch(broken.config.vocab_size, num_labels=3)
    with pytest.raises(QBHError, match="not finite"):
        BlockHessian(broken, BlockMap(broken).parameters("encoder.0"), [batch])


def test_hvp_rejects_empty_block_and_no_data(micro_bert):
    with pytest.raises(QBHError, match="no parameters"):
        BlockHessian(micro_bert, [], [random_batch(30)])
    with pytest.raises(QBHError, match="at least one batch"):
        BlockHessian(micro_bert, BlockMap(micro_bert).parameters("encoder.0"), [])


def test_curvature_mode_restores_training_state(micro_bert):
    micro_bert.train()
    with curvature_mode(micro_bert):
        assert not micro_bert.training
    assert micro_bert.training
    micro_bert.eval()


def test_grads_enabled_on_frozen_block(micro_bert):
    params = BlockMap(micro_bert).parameters("encoder.0.key")
    for p in params:
        p.requires_grad_(False)
    with grads_enabled(params):
        hv = BlockHessian(micro_bert, params, [random_batch(30, num_labels=3)])(vec.randn_like(params))
    assert all(not p.requires_grad for p in params)
    assert vec.norm(hv) > 0
    for p in params:
        p.requires_grad_(True)


def test_hvp_of_a_parameter_without_curvature_is_zero():
    """A bias feeding the loss linearly has a constant gradient: its rows of H are zero, and so is its Hv."""
    w, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    model = torch.nn.Module()
    loss_fn = lambda m, batch: (batch["x"] @ w) ** 2 + batch["x"].sum() * b.sum()  # noqa: E731
    H = BlockHessian(model, [w, b], [{"x": torch.tensor([1.0, 2.0, 3.0])}], loss_fn)
    hv = H([torch.ones(3), torch.ones(3)])
    x = torch.tensor([1.0, 2.0, 3.0])
    assert torch.allclose(hv[0], 2 * x * x.sum()) and torch.equal(hv[1], torch.zeros(3))
