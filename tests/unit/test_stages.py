"""Stage helpers that see the task family: the data fingerprint and the head check of a loaded model."""

from __future__ import annotations

import dataclasses
import hashlib
from types import SimpleNamespace

import pytest
from transformers import BertConfig

from qbert_hessian.errors import QBHError
from qbert_hessian.stages import check_head, data_fingerprint
from qbert_hessian.tasks import RawTask

RAW = RawTask("t", [["a b", "c d"]], [0, 1], [["e f"]], [1], ["neg", "pos"])


def test_data_fingerprint_of_classification_is_unchanged_and_the_family_enters_otherwise():
    h = hashlib.sha256()
    for part in (RAW.train_texts, RAW.train_labels, RAW.dev_texts, RAW.dev_labels, RAW.label_names):
        h.update(repr(part).encode())
    assert data_fingerprint(RAW) == h.hexdigest()[:16]  # runs cached before task families stay cached
    token, qa = (dataclasses.replace(RAW, family=f) for f in ("token", "qa"))
    assert len({data_fingerprint(RAW), data_fingerprint(token), data_fingerprint(qa)}) == 3
    assert data_fingerprint(token) == data_fingerprint(dataclasses.replace(RAW, family="token"))


def _model(architecture: str, num_labels: int) -> SimpleNamespace:
    return SimpleNamespace(config=BertConfig(architectures=[architecture], num_labels=num_labels))


def test_check_head_refuses_another_family_or_label_count():
    check_head(_model("BertForSequenceClassification", 2), RAW, "m")
    check_head(_model("BertForTokenClassification", 2), dataclasses.replace(RAW, family="token"), "m")
    with pytest.raises(QBHError, match="has a classification head but task 't' is a token task"):
        check_head(_model("BertForSequenceClassification", 2), dataclasses.replace(RAW, family="token"), "m")
    with pytest.raises(QBHError, match="has a qa head but task 't' is a classification task"):
        check_head(_model("BertForQuestionAnswering", 2), RAW, "m")
    with pytest.raises(QBHError, match="has a 3-label head but task 't' has 2 labels"):
        check_head(_model("BertForSequenceClassification", 3), RAW, "m")
