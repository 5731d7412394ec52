"""A damaged or edited packed checkpoint is refused at load, never scored: the checksum over the weights file
and the manifest's settings, exact tensor sizes, finite positive scales, settings cross-checked with the plan
(the last three also for folders written before checksums)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from qbert_hessian.artifacts import BitPlan
from qbert_hessian.errors import QBHError
from qbert_hessian.export import load_packed, save_packed
from qbert_hessian.quant.apply import calibrate_activations, quantize_model
from tests.helpers import random_batch

QUERY = "bert.encoder.layer.0.attention.self.query.weight"


@pytest.fixture(scope="module", params=[True, False], ids=["sym", "asym"])
def packed(request, tiny_checkpoint, tmp_path_factory) -> tuple[Path, torch.Tensor, dict]:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint).eval()
    plan = BitPlan(model={}, blocks={"encoder.0": {"bits": 3, "groups": "channel"}}, symmetric=request.param)
    q = quantize_model(model, plan)
    batch = random_batch(model.config.vocab_size, batch_size=4, seq_len=9)
    calibrate_activations(q, [batch])
    out = tmp_path_factory.mktemp("packed") / "p"
    save_packed(q, out, plan=plan)
    with torch.no_grad():
        logits = load_packed(out)(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return out, logits, batch


def _copy(src: Path, dst: Path, *, old_format: bool = False) -> Path:
    import shutil

    shutil.copytree(src, dst)
    if old_format:  # as written before checksums
        path = dst / "quantization.json"
        data = json.loads(path.read_text())
        del data["sha256"]
        path.write_text(json.dumps(data))
    return dst


def _edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        metadata = fh.metadata()
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"), metadata=metadata)


def _scale(value: float) -> Callable[[dict], None]:
    def edit(state: dict) -> None:
        state[QUERY + ".scale"][1] = value

    return edit


def _cut_codes(state: dict) -> None:
    codes = state[QUERY + ".codes"]
    state[QUERY + ".codes"] = codes[: codes.numel() // 2].clone()


def _flip_code(state: dict) -> None:
    state[QUERY + ".codes"][0] ^= 1


def _manifest(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        path = folder / "quantization.json"
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))

    return apply


def _flip_symmetric(data: dict) -> None:
    data["plan"]["symmetric"] = not data["plan"]["symmetric"]
    for e in data["tensors"].values():
        e["symmetric"] = not e["symmetric"]


def _flip_plan_symmetric(data: dict) -> None:
    data["plan"]["symmetric"] = not data["plan"]["symmetric"]


def _bits(data: dict) -> None:
    data["plan"]["blocks"]["encoder.0"]["bits"] = 4
    for e in data["tensors"].values():
        e["bits"] = 4


DAMAGE = {
    "scale-nan": (lambda f: _edit_tensors(f, _scale(float("nan"))), "finite and positive"),
    "scale-inf": (lambda f: _edit_tensors(f, _scale(float("inf"))), "finite and positive"),
    "scale-zero": (lambda f: _edit_tensors(f, _scale(0.0)), "finite and positive"),
    "scale-negative": (lambda f: _edit_tensors(f, _scale(-0.01)), "finite and positive"),
    "codes-cut-in-half": (lambda f: _edit_tensors(f, _cut_codes), "truncated or edited"),
    "symmetric-flipped": (_manifest(_flip_symmetric), "zero points"),
    "plan-symmetric-flipped": (_manifest(_flip_plan_symmetric), "contradicts itself"),
    "bits-edited": (_manifest(_bits), "truncated or edited"),
}


@pytest.mark.parametrize("old_format", [False, True], ids=["checksum", "no-checksum"])
@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_damaged_packed_checkpoint_is_refused(packed, tmp_path, damage, old_format):
    folder = _copy(packed[0], tmp_path / "p", old_format=old_format)
    apply, message = DAMAGE[damage]
    apply(folder)
    # with a checksum the first failing check may be the checksum itself; without one, the named check
    with pytest.raises(QBHError, match=message if old_format else f"{message}|damaged or was edited"):
        load_packed(folder)


def test_a_flipped_code_is_caught_by_the_checksum(packed, tmp_path):
    folder = _copy(packed[0], tmp_path / "p")
    _edit_tensors(folder, _flip_code)
    with pytest.raises(QBHError, match="damaged or was edited: model.safetensors and quantization.json"):
        load_packed(folder)


def test_an_edited_setting_outside_the_weights_is_caught_by_the_checksum(packed, tmp_path):
    folder = _copy(packed[0], tmp_path / "p")
    _manifest(lambda d: d["plan"].update(act_bits=6))(folder)  # consistent with itself, not with the file
    with pytest.raises(QBHError, match="damaged or was edited"):
        load_packed(folder)


def test_an_intact_folder_without_checksum_loads_to_the_same_logits_with_a_warning(packed, tmp_path, caplog):
    folder = _copy(packed[0], tmp_path / "p", old_format=True)
    _, logits, batch = packed
    with caplog.at_level(logging.WARNING, logger="qbert_hessian.export"):
        model = load_packed(folder)
    assert "records no checksum" in caplog.text
    with torch.no_grad():
        assert torch.equal(model(**{k: v for k, v in batch.items() if k != "labels"}).logits, logits)


def test_the_checksum_is_recorded_and_verified(packed):
    from qbert_hessian.artifacts import PackedManifest

    manifest = PackedManifest.load(packed[0] / "quantization.json")
    assert manifest.sha256 is not None and len(manifest.sha256) == 64
    assert manifest.digest(packed[0] / "model.safetensors") == manifest.sha256
