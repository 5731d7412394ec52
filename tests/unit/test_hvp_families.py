"""Block Hessians of the token-classification and QA losses equal the dense Hessian of the whole padded batch."""

from __future__ import annotations

import pytest
import torch

from qbert_hessian.hessian import vec
from qbert_hessian.hessian.hvp import BlockHessian, loss_weight, split_by_length
from qbert_hessian.models import BlockMap
from tests.helpers import dense_block_hessian

LENGTHS = [3, 9, 2, 12, 4, 11, 3, 10]


def micro(head: str, num_labels: int):
    """hidden 8, 1 layer: a dense Hessian of any block in about a second (as conftest's micro_bert)."""
    from transformers import BertConfig, BertForQuestionAnswering, BertForTokenClassification

    cfg = BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        num_labels=num_labels, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(1)
    model = (BertForTokenClassification if head == "token" else BertForQuestionAnswering)(cfg).eval()
    with torch.no_grad():  # larger weights than the 0.02 init: less degenerate curvature
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.5)
    return model


def ragged(lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(5, 30, (len(lengths), width), generator=g) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def token_batch(lengths: list[int] = LENGTHS) -> dict[str, torch.Tensor]:
    """Per-token tags, -100 on padding, on [CLS] (position 0) and on some later sub-tokens."""
    batch = ragged(lengths)
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 4, batch["input_ids"].shape, generator=g)
    labels[batch["attention_mask"] == 0] = -100
    labels[:, 0] = -100
    labels[torch.rand(labels.shape, generator=g) < 0.3] = -100  # continuation sub-tokens
    return {**batch, "labels": labels}


def qa_batch(lengths: list[int] = LENGTHS) -> dict[str, torch.Tensor]:
    batch = ragged(lengths)
    g = torch.Generator().manual_seed(6)
    starts = torch.tensor([int(torch.randint(0, n, (1,), generator=g)) for n in lengths])
    ends = torch.minimum(starts + torch.randint(0, 3, (len(lengths),), generator=g), torch.tensor(lengths) - 1)
    return {**batch, "start_positions": starts, "end_positions": ends}


@pytest.mark.parametrize("block", ["encoder.0", "embeddings.position", "encoder.0.value"])
def test_token_loss_buckets_weighted_by_labelled_tokens_give_the_dense_hessian(block):
    model = micro("token", 4)
    batch = token_batch()
    parts = split_by_length(batch, max_parts=3, overhead=0)
    assert len(parts) == 3 and all(p["labels"].shape == p["input_ids"].shape for p in parts)
    tokens = [loss_weight(p) for p in parts]
    rows = [len(p["labels"]) for p in parts]
    assert sum(tokens) == int(batch["labels"].ne(-100).sum())
    assert [t / sum(tokens) for t in tokens] != pytest.approx([r / sum(rows) for r in rows], abs=0.02)
    params = BlockMap(model).parameters(block)
    H = dense_block_hessian(model, params, batch)
    v = vec.randn_like(params, torch.Generator().manual_seed(3))
    exact = H @ vec.flatten(v)
    whole = BlockHessian(model, params, [batch], length_buckets=1)
    split = BlockHessian(model, params, parts, length_buckets=1)
    for hvp in (whole, split):
        assert torch.allclose(vec.flatten(hvp(v)), exact, rtol=1e-4, atol=1e-5)
    assert split.loss == pytest.approx(whole.loss, rel=1e-5)
    # weighting the same parts by rows (the classification rule) is a different, wrong operator
    split.weights = [r / sum(rows) for r in rows]
    assert not torch.allclose(vec.flatten(split(v)), exact, rtol=1e-3, atol=1e-4)


def test_token_batch_with_a_label_on_padding_is_not_trimmed():
    batch = token_batch()
    batch["labels"][2, -1] = 1  # row 2 has length 2: position 11 is padding
    assert split_by_length(batch, max_parts=3, overhead=0) == [batch]


@pytest.mark.parametrize("block", ["encoder.0", "embeddings.word"])
def test_qa_loss_hessian_with_length_buckets_is_the_dense_one(block):
    model = micro("qa", 2)
    batch = qa_batch()
    params = BlockMap(model).parameters(block)
    H = dense_block_hessian(model, params, batch, forward_mode=False)  # the PAD row reaches the QA loss
    v = vec.randn_like(params, torch.Generator().manual_seed(4))
    hvp = BlockHessian(model, params, [batch], length_buckets=4)  # QA batches are kept whole
    assert torch.allclose(vec.flatten(hvp(v)), H @ vec.flatten(v), rtol=1e-4, atol=1e-5)
    # several QA batches are weighted by examples: the joint batch's loss and Hessian
    parts = [{k: t[:3] for k, t in batch.items()}, {k: t[3:] for k, t in batch.items()}]
    split = BlockHessian(model, params, parts, length_buckets=4)
    assert torch.allclose(vec.flatten(split(v)), H @ vec.flatten(v), rtol=1e-4, atol=1e-5)


def test_trimming_a_qa_batch_would_change_its_loss():
    """Why QA batches stay whole: the start/end softmax runs over padding positions too."""
    model = micro("qa", 2)
    batch = qa_batch()
    assert split_by_length(batch, max_parts=3, overhead=0) == [batch]
    short = {k: t[[2]] for k, t in batch.items()}  # the length-2 row, padded to 12
    trimmed = {k: (t[:, :2] if t.dim() == 2 else t) for k, t in short.items()}
    with torch.no_grad():
        assert float(model(**short).loss) != pytest.approx(float(model(**trimmed).loss), rel=1e-3)
