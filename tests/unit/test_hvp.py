from __future__ import annotations

import pytest
import torch

from qbert_hessian.errors import QBHError
from qbert_hessian.hessian import vec
from qbert_hessian.hessian.eigen import lanczos_eigenvalues
from qbert_hessian.hessian.hvp import BlockHessian, _best_cuts, curvature_mode, grads_enabled, split_by_length
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


def ragged_batch(vocab_size: int, lengths: list[int], *, left: bool = False, seed: int = 0) -> dict:
    """Rows of the given lengths, padded (right, or left) to the longest, with per-example labels."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(5, vocab_size, (len(lengths), width), generator=g)
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    if left:
        mask = mask.flip(1)
    return {
        "input_ids": ids * mask,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(ids),
        "labels": torch.randint(0, 3, (len(lengths),), generator=g),
    }


@pytest.mark.parametrize("block", ["encoder.0", "embeddings"])
def test_length_split_keeps_the_batch_hessian(micro_bert, block):
    """Micro-batches of similar length, trimmed, give the padded batch's exact Hessian on fewer tokens."""
    lengths = [3, 9, 2, 12, 4, 11, 3, 10]
    batch = ragged_batch(micro_bert.config.vocab_size, lengths)
    parts = split_by_length(batch, max_parts=3, overhead=0)
    assert len(parts) == 3
    assert sorted(r for p in parts for r in p["attention_mask"].sum(1).tolist()) == sorted(lengths)
    for p in parts:  # each part is trimmed to its own longest row
        assert p["input_ids"].shape[1] == int(p["attention_mask"].sum(1).max())
    assert sum(p["input_ids"].numel() for p in parts) < batch["input_ids"].numel()
    params = BlockMap(micro_bert).parameters(block)
    H = dense_block_hessian(micro_bert, params, batch)
    v = vec.randn_like(params, torch.Generator().manual_seed(1))
    split = BlockHessian(micro_bert, params, parts, length_buckets=1)
    assert torch.allclose(vec.flatten(split(v)), H @ vec.flatten(v), rtol=1e-4, atol=1e-5)
    whole = BlockHessian(micro_bert, params, [batch], length_buckets=1)
    assert split.loss == pytest.approx(whole.loss, rel=1e-5)


def test_length_split_leaves_batches_it_cannot_split_whole(micro_bert):
    batch = ragged_batch(micro_bert.config.vocab_size, [2, 9, 3, 10])
    assert len(split_by_length(batch, max_parts=3, overhead=2)) == 2  # [2, 3] and [9, 10]
    assert split_by_length(batch, max_parts=1) == [batch]
    no_mask = {k: v for k, v in batch.items() if k != "attention_mask"}
    assert split_by_length(no_mask, overhead=0) == [no_mask]
    token_labels = {**batch, "labels": torch.zeros_like(batch["input_ids"])}  # tags on padding: trimming drops them
    assert split_by_length(token_labels, overhead=0) == [token_labels]
    holes = {**batch, "attention_mask": batch["attention_mask"].clone()}
    holes["attention_mask"][1, 0] = 0  # not one run of ones then padding
    assert split_by_length(holes, overhead=0) == [holes]
    left = ragged_batch(micro_bert.config.vocab_size, [2, 9, 3, 10], left=True)  # trimming would move positions
    assert split_by_length(left, overhead=0) == [left]
    full = ragged_batch(micro_bert.config.vocab_size, [6, 6, 6])
    assert split_by_length(full) == [full]  # nothing to trim


@pytest.mark.parametrize("seed", range(5))
def test_best_cuts_equal_brute_force(seed):
    import itertools

    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.sort(rng.integers(1, 40, size=9))
    overhead, max_parts = int(rng.integers(0, 30)), 4

    def cost(cuts):
        return sum((hi - lo) * lengths[hi - 1] + overhead for lo, hi in zip(cuts[:-1], cuts[1:]))

    best = min(
        cost([0, *inner, len(lengths)])
        for k in range(max_parts)
        for inner in itertools.combinations(range(1, len(lengths)), k)
    )
    assert cost(_best_cuts(lengths, max_parts, overhead)) == best


def few_token_batch(vocab_size: int) -> dict:
    """Rows that use only token ids 5..9, so most rows of the word table are never looked up."""
    batch = ragged_batch(vocab_size, [4, 6, 3, 6])
    batch["input_ids"] = (batch["input_ids"] % 5 + 5) * batch["attention_mask"]
    return batch


def test_embedding_tables_are_cut_to_the_rows_looked_up(micro_bert):
    batch = few_token_batch(micro_bert.config.vocab_size)
    params = BlockMap(micro_bert).parameters("embeddings")
    H = dense_block_hessian(micro_bert, params, batch)
    hvp = BlockHessian(micro_bert, params, [batch])
    word = [i for i, p in enumerate(params) if p is micro_bert.bert.embeddings.word_embeddings.weight][0]
    assert hvp.rows[word].tolist() == sorted(set(batch["input_ids"].flatten().tolist()))
    assert hvp.like[word].shape == (hvp.rows[word].numel(), micro_bert.config.hidden_size)
    v = vec.randn_like(params, torch.Generator().manual_seed(2))
    exact = vec.unflatten(H @ vec.flatten(v), params)
    # whole vectors in, whole vectors out: the exact product
    assert torch.allclose(vec.flatten(hvp(v)), vec.flatten(exact), rtol=1e-4, atol=1e-5)
    # compact vectors: the same product on the rows looked up; nothing lives off them
    compact = hvp(hvp.restrict(v))
    assert [c.shape for c in compact] == [c.shape for c in hvp.like]
    assert torch.allclose(vec.flatten(compact), vec.flatten(hvp.restrict(exact)), rtol=1e-4, atol=1e-5)
    assert torch.allclose(vec.flatten(hvp.expand(hvp.restrict(exact))), vec.flatten(exact), atol=1e-5)
    # so the compact operator has the block's extreme eigenvalue
    top = torch.linalg.eigvalsh(H.double())
    top = top[top.abs().argmax()].item()
    res = lanczos_eigenvalues(hvp, hvp.like, max_iters=60, tol=1e-6, generator=torch.Generator().manual_seed(0))
    assert res.values[0] == pytest.approx(top, rel=1e-3)


def test_a_table_used_elsewhere_stays_whole(micro_bert):
    """A table whose gradient reaches rows no lookup used (here a weight penalty, as tied weights do) is not cut."""
    batch = few_token_batch(micro_bert.config.vocab_size)
    table = micro_bert.bert.embeddings.word_embeddings.weight

    def loss_fn(model, b):
        return model(**b).loss + 1e-2 * (table**2).sum()

    hvp = BlockHessian(micro_bert, [table], [batch], loss_fn)
    assert hvp.rows == [None] and hvp.like[0].shape == table.shape


def test_block_view_of_a_shared_graph_is_the_blocks_own_hessian(micro_bert):
    """One graph over several blocks' parameters; each block's view gives that block's own H_bb v (against the
    block's own operator and the dense Hessian), in the same compact space, on two batches."""
    batches = [random_batch(micro_bert.config.vocab_size, num_labels=3, seed=s) for s in (0, 1)]
    bm = BlockMap(micro_bert)
    # overlapping blocks too: the graph holds each parameter once
    blocks = {name: bm.parameters(name) for name in ("embeddings", "encoder.0.query", "encoder.0.ffn_out", "encoder.0")}
    union = list({id(p): p for params in blocks.values() for p in params}.values())
    joint = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    with grads_enabled(union):
        shared = BlockHessian(micro_bert, union, batches)
        for i, (name, params) in enumerate(blocks.items()):
            view, own = shared.block(params), BlockHessian(micro_bert, params, batches)
            assert [x.shape for x in view.like] == [x.shape for x in own.like], name
            assert any(r is not None for r in view.rows) == (name == "embeddings")  # the word table is cut
            v = vec.randn_like(view.like, torch.Generator().manual_seed(i))
            hv = view(v)
            assert torch.allclose(vec.flatten(hv), vec.flatten(own(v)), rtol=1e-5, atol=1e-7), name
            H = dense_block_hessian(micro_bert, params, joint)
            assert torch.allclose(
                vec.flatten(view.expand(hv)), H @ vec.flatten(view.expand(v)), rtol=1e-4, atol=1e-5
            ), name
            assert view.num_products == 1 and shared.num_products == 0
            own.free()
        with pytest.raises(QBHError, match="not among the .* this Hessian's graphs"):
            shared.block([micro_bert.classifier.weight])
        shared.free()
