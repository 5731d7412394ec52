"""Label names: a fresh head's order, and data renumbered to a trained head's order by name."""

from __future__ import annotations

import pytest

from qbert_hessian.errors import QBHError
from qbert_hessian.tasks import RawTask, match_labels
from qbert_hessian.tasks.labels import head_names, order_labels

RAW = RawTask("t", [["a", "b", "c"]], [0, 1, 2], [["d"]], [2], ["contradiction", "entailment", "neutral"])
TOKENS = RawTask("n", [[["x", "y"]]], [[0, 2]], [[["z"]]], [[1]], ["B-PER", "I-PER", "O"], family="token")


def test_placeholder_names_name_nothing():
    assert head_names({0: "LABEL_0", 1: "LABEL_1"}, 2) is None
    assert head_names({"0": "neg", "1": "pos"}, 2) == ["neg", "pos"]  # JSON keys are strings
    assert head_names({0: "LABEL_1", 1: "LABEL_0"}, 2) == ["LABEL_1", "LABEL_0"]  # swapped: names after all
    assert head_names({0: "a", 1: "b"}, 3) is None  # another count: the head-size check speaks


def test_fresh_order_integers_numeric_strings_alphabetical_mnli_glue():
    assert order_labels(["10", "9", 2], None, "d") == ["2", "9", "10"]
    assert order_labels(["pos", "neg"], None, "d") == ["neg", "pos"]
    assert order_labels(["neutral", "contradiction", "entailment"], None, "d") == [
        "entailment",
        "neutral",
        "contradiction",
    ]


def test_same_names_other_order_are_renumbered():
    head = {0: "entailment", 1: "neutral", 2: "contradiction"}
    got = match_labels(RAW, head, "m")
    assert got.label_names == ["entailment", "neutral", "contradiction"]
    # every example keeps its name
    assert [got.label_names[y] for y in got.train_labels] == [RAW.label_names[y] for y in RAW.train_labels]
    assert [got.label_names[y] for y in got.dev_labels] == ["neutral"]
    tokens = match_labels(TOKENS, {0: "O", 1: "B-PER", 2: "I-PER"}, "m")
    assert tokens.train_labels == [[1, 0]] and tokens.dev_labels == [[2]]
    assert match_labels(RAW, {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}, "m") is RAW


def test_names_that_differ_are_refused_with_both_orders():
    with pytest.raises(QBHError, match=r"\(0=contradiction, 1=entailment, 2=neutral\) are not model 'm''s \(0=a, 1=b"):
        match_labels(RAW, {0: "a", 1: "b", 2: "c"}, "m")
    ints = RawTask("t", [["a", "b"]], [0, 1], [["c"]], [1], ["0", "1"])
    with pytest.raises(QBHError, match="integers without names, while model 'm' names its labels"):
        match_labels(ints, {0: "neg", 1: "pos"}, "m")
    assert match_labels(ints, {0: "0", 1: "1"}, "m") is ints  # a head trained on the same integers
