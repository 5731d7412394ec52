from __future__ import annotations

import pytest
import torch

from qbert_hessian.errors import QBHError
from qbert_hessian.models import BlockMap, adapter_for, load_model
from qbert_hessian.names import expand_blocks, validate_block


def _tiny(family: str):
    import transformers as tf

    torch.manual_seed(0)
    if family == "bert":
        return tf.BertForSequenceClassification(
            tf.BertConfig(
                vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24
            )
        )
    if family == "roberta":
        return tf.RobertaForSequenceClassification(
            tf.RobertaConfig(
                vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24
            )
        )
    return tf.DistilBertForSequenceClassification(
        tf.DistilBertConfig(vocab_size=50, dim=16, n_layers=2, n_heads=4, hidden_dim=24)
    )


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_block_map_covers_every_family(family):
    model = _tiny(family)
    bm = BlockMap(model)
    assert bm.num_layers == 2
    for part, shape in [("query", (16, 16)), ("attn_out", (16, 16)), ("ffn_in", (24, 16)), ("ffn_out", (16, 24))]:
        assert bm.module(f"encoder.1.{part}").weight.shape == shape
    layer = sum(p.numel() for p in bm.parameters("encoder.0"))
    assert layer == sum(p.numel() for p in bm.layers[0].parameters())
    assert bm.module("embeddings.word").weight.shape == (50, 16)
    assert ("token_type" in bm.embedding_parts) == (family != "distilbert")
    names = [n for n, _ in bm.named_parameters("encoder.1.value")]
    assert all(n.endswith(("weight", "bias")) and ".1." in n for n in names)


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_block_map_owns_heads_unit_modules_and_the_overlap_check(family):
    bm = BlockMap(_tiny(family))
    assert bm.num_heads == 4 and bm.describe("m")["num_heads"] == 4  # DistilBERT's config says n_heads
    layer = bm.unit_modules("encoder.1")
    assert [n for n, _ in layer] == [
        f"encoder.1.{p}" for p in ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
    ]
    assert all(bm.model.get_submodule(p) is bm.module(n) for n, p in layer)
    assert bm.unit_modules("encoder.1.key") == [layer[1]]
    # the embedding block is the word and position tables; token types are quantized only when named
    assert [n for n, _ in bm.unit_modules("embeddings")] == ["embeddings.word", "embeddings.position"]
    if family != "distilbert":
        assert [n for n, _ in bm.unit_modules("embeddings.token_type")] == ["embeddings.token_type"]
    with pytest.raises(QBHError, match="encoder.7"):
        bm.unit_modules("encoder.7")
    bm.check_disjoint(["encoder.0", "encoder.1.query", "embeddings"], "{a} and {b} overlap")
    with pytest.raises(QBHError, match=r"^encoder.1 and encoder.1.query overlap$"):
        bm.check_disjoint(["encoder.0", "encoder.1", "encoder.1.query"], "{a} and {b} overlap")


def test_unsupported_architecture_is_named():
    import transformers as tf

    gpt2 = tf.GPT2ForSequenceClassification(tf.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(QBHError, match="'gpt2' is not supported; supported families are bert, distilbert"):
        adapter_for(gpt2)


def test_load_model_errors(tmp_path):
    with pytest.raises(QBHError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    import transformers as tf

    tf.GPT2Config(n_embd=16, n_layer=1, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(QBHError, match="'gpt2' is not supported"):
        load_model(str(tmp_path / "gpt2"))


def test_load_model_refuses_to_replace_a_trained_head_unless_asked(tiny_checkpoint):
    with pytest.raises(QBHError, match="has a trained 2-label head but the task has 3 labels"):
        load_model(str(tiny_checkpoint), num_labels=3)
    model, tok = load_model(str(tiny_checkpoint), num_labels=3, label_names=["a", "b", "c"], new_head=True)
    assert model.classifier.out_features == 3 and model.config.id2label[2] == "c"
    assert model.config._attn_implementation == "eager" and not model.training


def test_load_model_refuses_a_trained_head_of_another_task_family_unless_asked(tiny_checkpoint):
    # the tiny checkpoint is a trained sequence classifier; NER and QA need other heads
    for family, num_labels in (("token", 2), ("qa", 2)):
        with pytest.raises(QBHError, match=f"has a trained classification head but the task is {family}"):
            load_model(str(tiny_checkpoint), task_family=family, num_labels=num_labels)
    model, _ = load_model(str(tiny_checkpoint), task_family="token", num_labels=5, new_head=True)
    assert type(model).__name__ == "BertForTokenClassification" and model.classifier.out_features == 5
    model, _ = load_model(str(tiny_checkpoint), task_family="qa", num_labels=2, new_head=True)
    assert type(model).__name__ == "BertForQuestionAnswering" and model.qa_outputs.out_features == 2
    # no family given: the saved head's
    assert type(load_model(str(tiny_checkpoint))[0]).__name__ == "BertForSequenceClassification"
    with pytest.raises(QBHError, match="task family 'ner' is unknown"):
        load_model(str(tiny_checkpoint), task_family="ner")


def test_load_model_refuses_a_folder_without_tokenizer(tiny_checkpoint, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((tiny_checkpoint / name).read_bytes())
    with pytest.raises(QBHError, match="has no tokenizer files"):
        load_model(str(bare))


def test_names_validation_and_groups():
    assert expand_blocks(None, 2) == ["embeddings", "encoder.0", "encoder.1"]
    assert expand_blocks(["layers", "encoder.0", "embedding-parts"], 2, ("word", "position")) == [
        "encoder.0",
        "encoder.1",
        "embeddings.word",
        "embeddings.position",
    ]
    assert len(expand_blocks(["linears"], 2)) == 12
    with pytest.raises(QBHError, match="encoder.0..encoder.5"):
        validate_block("encoder.12", 6)
    with pytest.raises(QBHError, match="query"):
        validate_block("encoder.1.attn", 6)
    with pytest.raises(QBHError, match="embeddings.word, embeddings.position$"):
        validate_block("embeddings.token_type", 6, ("word", "position"))
    with pytest.raises(QBHError, match="a group"):
        validate_block("decoder.0", 6)
