from __future__ import annotations

import pytest
import torch

from tests.helpers import make_tiny_checkpoint, write_tsv


@pytest.fixture(autouse=True)
def _threads(request):
    """One thread for the tiny models (thread start-up dominates their ops); all cores for the slow tests."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_bert_config():
    from transformers import BertConfig

    return BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        type_vocab_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
        attn_implementation="eager",
    )


@pytest.fixture(scope="session")
def tiny_bert(tiny_bert_config):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config).eval()


@pytest.fixture(scope="session")
def micro_bert():
    """Small enough for a dense Hessian of any block in about a second (hidden 8, 1 layer, 2 heads)."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=30,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=12,
        max_position_embeddings=16,
        type_vocab_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
        attn_implementation="eager",
    )
    torch.manual_seed(1)
    model = BertForSequenceClassification(cfg).eval()
    # Larger weights than the 0.02 init make the curvature less degenerate, so the tests have teeth.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data") / "toy"
    write_tsv(d / "train.tsv", 96, seed=0)
    write_tsv(d / "dev.tsv", 24, seed=1)
    return d
