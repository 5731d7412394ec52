"""``--deploy onnx``: the allocator prices the ONNX export, and the prediction holds against the exported file.

The reference is the file ``export_onnx`` writes for the plan: its initializers (read back with ``onnx``) must
equal the predicted initializer bytes exactly, and the whole file must lie within the stated bound
(``onnx_format.graph_tolerance``) of the prediction, on tiny models of every family and grouping.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the deploy extra: pip install 'qbert_hessian[deploy]'")
onnx = pytest.importorskip("onnx", reason="the deploy extra: pip install 'qbert_hessian[deploy]'")

from qbert_hessian.allocate import allocate_bits, build_problem, uniform_plan  # noqa: E402
from qbert_hessian.artifacts import BlockSensitivity, SensitivityReport  # noqa: E402
from qbert_hessian.config import AllocConfig, Budget  # noqa: E402
from qbert_hessian.onnx_format import graph_tolerance, initializer_bytes  # noqa: E402
from tests.helpers import write_vocab  # noqa: E402

HIDDEN, HEADS, FFN = 64, 4, 128  # head size 16 (the smallest ONNX block), FFN divisible by every grouping


def _tiny(family: str, tokenizer, layers: int = 2) -> torch.nn.Module:
    import transformers as tf

    common = dict(vocab_size=len(tokenizer), max_position_embeddings=80)
    if family == "distilbert":
        config = tf.DistilBertConfig(dim=HIDDEN, n_layers=layers, n_heads=HEADS, hidden_dim=FFN, **common)
        model = tf.DistilBertForSequenceClassification(config)
    else:
        cls = tf.RobertaConfig if family == "roberta" else tf.BertConfig
        config = cls(
            hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS, intermediate_size=FFN, **common
        )
        config.pad_token_id = 0
        model = getattr(tf, f"{'Roberta' if family == 'roberta' else 'Bert'}ForSequenceClassification")(config)
    model.config.architectures = [type(model).__name__]
    torch.manual_seed(0)
    with torch.no_grad():  # no two tensors equal (the exporter would share one initializer between them)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def _report(model, profile_units) -> SensitivityReport:
    from qbert_hessian.models import BlockMap

    bm = BlockMap(model)
    rng = np.random.default_rng(0)
    blocks = []
    for u in profile_units:
        if u.startswith("encoder."):
            omega = float(rng.uniform(1, 10))
            n = sum(p.numel() for p in bm.parameters(u))
            blocks.append(BlockSensitivity(u, n, [omega], omega, 0.0, omega, [5], [True], 0.1))
    describe = bm.describe("tiny")
    return SensitivityReport(model=describe, task="t", config={}, draws=[], blocks=blocks, pending=[])


def _export(tmp: Path, model, tokenizer, plan) -> Path:
    from qbert_hessian.deploy.onnx import export_onnx
    from qbert_hessian.export import save_packed
    from qbert_hessian.quant.apply import quantize_model

    save_packed(quantize_model(model, plan), tmp / "packed", plan=plan, tokenizer=tokenizer)
    return export_onnx(tmp / "packed", tmp / "onnx")


def _initializer_bytes(path: Path) -> int:
    graph = onnx.load(str(path)).graph
    return sum(initializer_bytes(t.name, t.dims, len(t.raw_data)) for t in graph.initializer)


CASES = [  # family, groups, symmetric, average bits (None: uniform 2), layers
    ("bert", 1, True, None, 2),
    ("bert", "heads", True, None, 3),
    ("bert", 16, False, None, 2),
    ("bert", "channel", True, 2.5, 4),
    ("roberta", "heads", False, 3.0, 2),
    ("distilbert", "channel", True, 4.0, 2),
    ("distilbert", 32, True, None, 3),
]


@pytest.mark.parametrize(("family", "groups", "symmetric", "avg_bits", "layers"), CASES, ids=lambda v: str(v))
def test_onnx_size_prediction_holds_against_the_exported_file(tmp_path, family, groups, symmetric, avg_bits, layers):
    from transformers import BertTokenizerFast

    from qbert_hessian.models import BlockMap
    from qbert_hessian.quant.profile import measure_profile, profile_units

    tokenizer = BertTokenizerFast(vocab=str(write_vocab(tmp_path / "vocab.txt")), do_lower_case=True)
    model = _tiny(family, tokenizer, layers)
    units = profile_units(BlockMap(model), [f"encoder.{i}" for i in range(layers)])
    profile = measure_profile(model, units, bits=(2, 4, 8), groups=(groups, "channel"), symmetric=symmetric)
    report = _report(model, units)
    # nearest: the model is quantize_model's (no calibration data), and a size does not depend on the rounding
    config = AllocConfig(
        groups=groups, deploy="onnx", act_bits=None, embedding_bits=8, position_bits=4, rounding="nearest"
    )
    if avg_bits is None:
        plan = uniform_plan(report, profile, 2, config)
    else:
        plan = allocate_bits(report, profile, Budget(avg_bits=avg_bits), config)
    path = _export(tmp_path, model, tokenizer, plan)
    pred = plan.predicted
    assert pred["deploy"] == "onnx"
    problem, _ = build_problem(report, profile, dataclasses.replace(config, bits=(2,)) if avg_bits is None else config)
    choice = [problem.bits.index(plan.blocks[u]["bits"]) for u in problem.units]
    expected = {n: (d, b) for n, d, b in problem.onnx_tensors(choice)}
    written = {t.name for t in onnx.load(str(path)).graph.initializer}
    assert written <= set(expected)
    # The exporter shares one initializer between tensors of equal contents: on these models only scales and zero
    # points of a handful of distinct values (groups=1, 2-bit zeros) coincide, never codes or FP32 tensors.
    shared = [n for n in expected if n not in written]
    assert all(n.endswith((".scales", ".zero_points")) for n in shared), shared
    shared_bytes = sum(initializer_bytes(n, *expected[n]) for n in shared)
    assert _initializer_bytes(path) == pred["onnx_initializer_bytes"] - shared_bytes
    actual = path.stat().st_size
    assert (
        -pred["onnx_tolerance_bytes"]
        <= pred["bytes"] - shared_bytes - actual
        <= pred["onnx_tolerance_bytes"]
        == graph_tolerance(layers, family)
    )
