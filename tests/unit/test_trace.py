from __future__ import annotations

import pytest
import torch

from qbert_hessian.errors import QBHError
from qbert_hessian.hessian.hvp import BlockHessian
from qbert_hessian.hessian.trace import hutchinson_block_traces, hutchinson_trace, summarize
from qbert_hessian.models import BlockMap
from tests.helpers import dense_block_hessian, random_batch


def test_trace_exact_for_diagonal_matrix():
    # Rademacher probes give v^T D v = Tr(D) exactly for a diagonal D: zero variance.
    d = torch.tensor([3.0, -1.0, 2.5, 0.5])
    res = hutchinson_trace(lambda v: [d * v[0]], [d], min_samples=4, max_samples=4)
    assert res.mean == pytest.approx(5.0) and res.stderr == pytest.approx(0.0)


def test_trace_of_tiny_bert_block_within_three_stderr(micro_bert):
    batch = random_batch(micro_bert.config.vocab_size, num_labels=3)
    params = BlockMap(micro_bert).parameters("encoder.0")
    exact = float(torch.trace(dense_block_hessian(micro_bert, params, batch)))
    res = hutchinson_trace(
        BlockHessian(micro_bert, params, [batch]),
        params,
        min_samples=64,
        max_samples=64,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(res.samples) == 64
    assert abs(res.mean - exact) <= 3 * res.stderr


def test_trace_stops_at_min_samples_when_precise():
    d = torch.ones(10)
    res = hutchinson_trace(lambda v: [d * v[0]], [d], min_samples=5, max_samples=100, rtol=1e-2)
    assert len(res.samples) == 5


def test_shared_block_traces_within_three_stderr(micro_bert):
    batch = random_batch(micro_bert.config.vocab_size, num_labels=3)
    bm = BlockMap(micro_bert)
    names = ["embeddings", "encoder.0"]
    blocks = [bm.parameters(n) for n in names]
    params = blocks[0] + blocks[1]
    slices = [slice(0, len(blocks[0])), slice(len(blocks[0]), len(params))]
    results = hutchinson_block_traces(
        BlockHessian(micro_bert, params, [batch]),
        params,
        slices,
        num_samples=96,
        generator=torch.Generator().manual_seed(0),
    )
    for p, res in zip(blocks, results):
        exact = float(torch.trace(dense_block_hessian(micro_bert, p, batch)))
        assert abs(res.mean - exact) <= 3 * res.stderr


def test_trace_argument_errors():
    with pytest.raises(QBHError, match="min_samples"):
        hutchinson_trace(lambda v: v, [torch.ones(2)], min_samples=5, max_samples=2)
    with pytest.raises(QBHError, match="disjoint"):
        hutchinson_block_traces(lambda v: v, [torch.ones(2)], [slice(0, 1), slice(0, 1)])
    with pytest.raises(QBHError, match="no trace samples"):
        summarize([])
