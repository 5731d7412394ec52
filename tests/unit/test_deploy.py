"""deploy/: the packed model in ONNX Runtime (exact and int8 modes) and in compressed-tensors, for every task family.

References: the fake-quantized model as ``load_packed`` rebuilds it (its logits), the stored codes (the layouts
decode to the same values), and compressed-tensors' own unpacking.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the deploy extra: pip install 'qbert_hessian[deploy]'")
pytest.importorskip("onnx", reason="the deploy extra: pip install 'qbert_hessian[deploy]'")

from qbert_hessian.artifacts import BitPlan  # noqa: E402
from qbert_hessian.errors import QBHError  # noqa: E402
from qbert_hessian.evaluate import evaluate  # noqa: E402
from qbert_hessian.export import load_packed, save_packed  # noqa: E402
from qbert_hessian.quant.apply import calibrate_activations, calibration_batches, quantize_model  # noqa: E402
from qbert_hessian.quant.functional import quantize  # noqa: E402
from tests.helpers import write_ner_dir, write_squad_dir, write_tsv, write_vocab  # noqa: E402

HIDDEN, HEADS = 64, 4  # head size 16: the smallest block ONNX Runtime takes
# Every width, both groupings of the attention output (per-head columns) and of the rest (row buckets, channels).
BLOCKS = {
    "embeddings.word": {"bits": 8, "groups": "channel"},
    "embeddings.position": {"bits": 4, "groups": 1},
    "encoder.0": {"bits": 3, "groups": "channel"},
    "encoder.0.query": {"bits": 2, "groups": "heads"},
    "encoder.0.attn_out": {"bits": 3, "groups": "heads"},
    "encoder.1": {"bits": 4, "groups": "channel"},
    "encoder.1.attn_out": {"bits": 8, "groups": "heads"},
    "encoder.1.ffn_out": {"bits": 2, "groups": 1},
}
# int8 compute quantizes each layer's input per block on the fly: on these models the logits move by at most this
# share of their largest magnitude (measured: under 1 %).
INT8_RTOL = 0.05


@dataclasses.dataclass
class Packed:
    family: str
    path: Path
    raw: object
    symmetric: bool
    act_bits: int | None


def _task(family: str, root: Path):
    from qbert_hessian.tasks import load_raw_task

    if family == "token":
        return load_raw_task("conll03", data_dir=write_ner_dir(root / "ner", train=24, dev=10))
    if family == "qa":
        return load_raw_task("squad", data_dir=write_squad_dir(root / "squad", train=3, dev=3))
    d = root / "sst2"
    write_tsv(d / "train.tsv", 32, seed=0)
    write_tsv(d / "dev.tsv", 24, seed=1)
    return load_raw_task("sst2", data_dir=d)


def _make_packed(
    root: Path, family: str, *, symmetric: bool = True, act_bits: int | None = 8, act_range: str = "max"
) -> Packed:
    import transformers
    from transformers import BertConfig, BertTokenizerFast

    from qbert_hessian.models import TASK_HEADS
    from qbert_hessian.tasks import tokenize_task

    root.mkdir(parents=True, exist_ok=True)
    raw = _task(family, root)
    tokenizer = BertTokenizerFast(vocab=str(write_vocab(root / "vocab.txt")), do_lower_case=True)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        intermediate_size=2 * HIDDEN + 5,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=len(raw.label_names),
        id2label=dict(enumerate(raw.label_names)),
        label2id={n: i for i, n in enumerate(raw.label_names)},
    )
    torch.manual_seed(0)
    model = getattr(transformers, TASK_HEADS[family][0]).from_config(config).eval()
    with torch.no_grad():  # a head with weight, so the logits are O(1) and the tolerances mean something
        head = model.qa_outputs if family == "qa" else model.classifier
        head.weight.normal_(0.0, HIDDEN**-0.5)
    plan = BitPlan(
        model={"num_layers": 2, "num_heads": HEADS, "hidden_size": HIDDEN},
        blocks=BLOCKS,
        symmetric=symmetric,
        act_bits=act_bits,
        act_range=act_range,
    )
    q = quantize_model(model, plan)
    task = tokenize_task(raw, tokenizer, max_length=32)
    if act_bits:
        calibrate_activations(q, calibration_batches(task, 2, 8))
    path = root / "packed"
    save_packed(q, path, plan=plan, tokenizer=tokenizer)
    return Packed(family, path, raw, symmetric, act_bits)


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> dict[str, Packed]:
    root = tmp_path_factory.mktemp("deploy")
    return {
        "classification": _make_packed(root / "cls", "classification"),
        "token": _make_packed(root / "tok", "token"),
        "qa": _make_packed(root / "qa", "qa"),
        "asymmetric": _make_packed(root / "asym", "classification", symmetric=False),
        "no-act": _make_packed(root / "noact", "classification", act_bits=None),
        **{r: _make_packed(root / r, "classification", act_range=r) for r in ACT_RANGES},
        "qa-dynamic": _make_packed(root / "qa-dyn", "qa", act_range="dynamic"),
    }


@pytest.fixture(scope="module")
def exports(packed, tmp_path_factory) -> dict[tuple[str, str], Path]:
    from qbert_hessian.deploy.onnx import export_onnx

    root = tmp_path_factory.mktemp("onnx")
    return {
        (name, mode): export_onnx(p.path, root / f"{name}-{mode}", exact=mode == "exact").parents[1]
        for name, p in packed.items()
        for mode in ("exact", "int8")
    }


def _batch(p: Packed, n: int = 6) -> dict[str, torch.Tensor]:
    from qbert_hessian.models import load_tokenizer
    from qbert_hessian.tasks import tokenize_task

    task = tokenize_task(p.raw, load_tokenizer(str(p.path)), max_length=32)
    batch = task.batch("dev", range(min(n, len(task.dev))))
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def _torch_logits(model, batch) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(**batch)
    names = ("start_logits", "end_logits") if hasattr(out, "start_logits") else ("logits",)
    return [getattr(out, n).numpy() for n in names]


# classification is also act_range max; the other activation ranges on it, and dynamic on QA (its two outputs)
ACT_RANGES = ("percentile", "mse", "dynamic")
FAMILIES = ["classification", "token", "qa", "asymmetric", "no-act", *ACT_RANGES, "qa-dynamic"]


@pytest.mark.parametrize("name", FAMILIES)
def test_onnx_exact_mode_reproduces_the_fake_quantized_logits(packed, exports, name):
    from qbert_hessian.deploy.runtime import OnnxModel

    p = packed[name]
    batch = _batch(p)
    want = _torch_logits(load_packed(p.path), batch)
    got = OnnxModel(exports[name, "exact"]).run(batch)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=1e-3, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_onnx_int8_mode_stays_within_its_stated_tolerance(packed, exports, name):
    from qbert_hessian.deploy.runtime import OnnxModel

    p = packed[name]
    batch = _batch(p)
    want = _torch_logits(load_packed(p.path), batch)
    got = OnnxModel(exports[name, "int8"]).run(batch)
    for g, w in zip(got, want):
        mask = np.isfinite(w) & (np.abs(w) < 1e4)  # QA masks nothing; kept general
        err = np.abs(g - w)[mask].max()
        assert err <= INT8_RTOL * np.abs(w[mask]).max(), err
        assert err > 0  # int8 compute really ran (exact mode is the float path)


def test_onnx_graph_uses_the_packed_kernels_at_the_stored_widths(packed, exports):
    import onnx

    graph = onnx.load(str(exports["classification", "int8"] / "onnx" / "model.onnx")).graph
    nodes = [n for n in graph.node if n.domain == "com.microsoft"]
    ops = sorted({n.op_type for n in nodes})
    assert ops == ["GatherBlockQuantized", "MatMulNBits"]
    bits = sorted({a.i for n in nodes for a in n.attribute if a.name == "bits"})
    assert bits == [2, 4, 8]  # 3-bit layers stored at 4
    levels = {a.i for n in nodes if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}
    meta = json.loads((exports["classification", "int8"] / "export.json").read_text())
    ffn = meta["weights"]["bert.encoder.layer.0.intermediate.dense.weight"]
    assert (ffn["bits"], ffn["stored_bits"], ffn["op"]) == (3, 4, "MatMulNBits")
    attn = meta["weights"]["bert.encoder.layer.0.attention.output.dense.weight"]
    assert attn["block_size"] == HIDDEN // HEADS  # blocks inside one head's columns
    # no FP32 copy of a quantized weight is left in the file
    names = {i.name for i in graph.initializer}
    assert not any(n.endswith("query.weight") or n.endswith("word_embeddings.weight") for n in names)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (exports["classification", "int8"] / f).is_file()
    assert not (exports["classification", "int8"] / "quantization.json").exists()


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("grid", [(8, 1), (1, 4), (2, 4)], ids=str)
def test_3_bit_stored_as_4_bit_decodes_to_the_same_values(symmetric, grid):
    from qbert_hessian.deploy.layout import block_size, onnx_bits, to_nbits

    torch.manual_seed(0)
    w = torch.randn(16, 64)
    for bits in (2, 3, 4, 8):
        q = quantize(w, bits, grid, symmetric)
        stored = onnx_bits(bits)
        assert stored == (4 if bits == 3 else bits)
        block = block_size(64, grid[1], stored, symmetric=symmetric, name="w")
        nb = to_nbits(q, symmetric=symmetric, bits=stored, block=block)
        assert np.array_equal(nb.dequantize(64), q.dequantize().numpy()), bits
        if bits == 3:
            assert nb.data.nbytes == 16 * 64 // 2  # 4 bits a value: 4/3 the packed bytes


def test_block_cannot_straddle_narrow_head_columns():
    from qbert_hessian.deploy.layout import block_size

    assert block_size(384, 12, 4, symmetric=True, name="x") == 32
    assert block_size(133, 1, 4, symmetric=True, name="x") >= 16  # row groups: any block, padded
    with pytest.raises(QBHError, match="encoder.0.attn_out: its rows or column groups are 8 wide"):
        block_size(32, 4, 4, symmetric=True, name="encoder.0.attn_out")


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_compressed_tensors_packing_is_what_compressed_tensors_unpacks(bits):
    unpack = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers").unpack_from_int32
    from qbert_hessian.deploy.layout import ct_pack_int32

    rng = np.random.default_rng(bits)
    values = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), size=(5, 37))
    packed = torch.from_numpy(ct_pack_int32(values, bits))
    assert np.array_equal(unpack(packed, bits, torch.Size([5, 37])).numpy(), values)


@pytest.mark.parametrize("name", FAMILIES)
def test_onnx_scores_equal_the_packed_model_scores(packed, exports, name):
    from qbert_hessian.deploy.runtime import evaluate_onnx
    from qbert_hessian.models import load_tokenizer
    from qbert_hessian.tasks import tokenize_task

    p = packed[name]
    task = tokenize_task(p.raw, load_tokenizer(str(p.path)), max_length=32)
    want = evaluate(load_packed(p.path), task, batch_size=8)
    got = evaluate_onnx(exports[name, "exact"], task, batch_size=8)
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-4), k


def test_onnx_model_predicts_label_names(packed, exports):
    from qbert_hessian.deploy.runtime import OnnxModel

    model = OnnxModel(exports["classification", "int8"], threads=1)
    texts = ["a good fun movie", "bad boring plot"]
    labels = model.predict(texts)
    assert len(labels) == 2 and set(labels) <= set(packed["classification"].raw.label_names)
    label2id = {v: k for k, v in model.id2label.items()}
    assert model.logits(texts).argmax(-1).tolist() == [label2id[x] for x in labels]
    tags = OnnxModel(exports["token", "int8"]).predict(texts)
    assert [len(t) for t in tags] == [len(i) for i in model.tokenizer(texts)["input_ids"]]


RELOAD = textwrap.dedent(
    """
    import sys, numpy as np, torch, transformers
    folder, head, inputs, out = sys.argv[1:]
    model = getattr(transformers, head).from_pretrained(folder).eval()
    with torch.no_grad():
        o = model(**torch.load(inputs))
    names = ("start_logits", "end_logits") if hasattr(o, "start_logits") else ("logits",)
    np.save(out, np.stack([getattr(o, n).numpy() for n in names]))
    assert not any(m.startswith("qbert_hessian") for m in sys.modules), "imported qbert_hessian"
    """
)


def _reload_elsewhere(folder: Path, family: str, batch: dict, tmp: Path) -> np.ndarray:
    from qbert_hessian.models import TASK_HEADS

    torch.save(batch, tmp / "inputs.pt")
    script = tmp / "reload.py"
    script.write_text(RELOAD)
    # a fresh interpreter whose path holds neither the repository nor its editable install's sources
    subprocess.run(
        [
            sys.executable,
            "-I",
            str(script),
            str(folder),
            TASK_HEADS[family][0],
            str(tmp / "inputs.pt"),
            str(tmp / "o.npy"),
        ],
        check=True,
        cwd=tmp,
        capture_output=True,
    )
    return np.load(tmp / "o.npy")


def _clip_at_minus_128(monkeypatch) -> None:
    """The reference with compressed-tensors' int8 range [-128, 127] for the activations (ours is [-127, 127])."""
    import qbert_hessian.quant.modules as modules

    def fake_quantize_activation(x, amax, bits=8):
        qmax = 2 ** (bits - 1) - 1
        scale = amax.clamp(min=1e-8) / qmax
        return torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale

    monkeypatch.setattr(modules, "fake_quantize_activation", fake_quantize_activation)


@pytest.mark.parametrize("name", FAMILIES)
def test_compressed_tensors_reloads_with_plain_transformers(packed, name, tmp_path, monkeypatch):
    pytest.importorskip("compressed_tensors")
    from qbert_hessian.deploy.compressed import export_compressed_tensors

    p = packed[name]
    out = tmp_path / "ct"
    export_compressed_tensors(p.path, out)
    batch = _batch(p)
    got = _reload_elsewhere(out, p.family, batch, tmp_path)
    if p.act_bits:
        _clip_at_minus_128(monkeypatch)  # the one stated difference; weights and everything else as they are
    want = np.stack(_torch_logits(load_packed(p.path), batch))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    widths = {g["weights"]["num_bits"] for g in config["config_groups"].values()}
    assert widths == {2, 3, 4, 8}
