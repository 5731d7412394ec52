"""Serving and scoring the exported ONNX model: the tokenizer and an ONNX Runtime session, nothing of the toolkit's
training code.

``OnnxModel(dir)`` gives logits (``model(**batch)``, ``model.logits(texts)``) and predictions
(``model.predict(texts)``: label names per text, or per word piece for a token tagger); :func:`evaluate_onnx`
scores a task's dev split from the file with the very batches and metric code ``evaluate`` uses for the torch
model (accuracy, entity F1 with the same label alignment, SQuAD spans with the same n-best search).
"""

from __future__ import annotations

import json
import os
import types
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import QBHError
from ..evaluate import evaluate_forward
from ..models import load_tokenizer
from .onnx import ONNX_SCHEMA
from .output import EXPORT_FILE, require

if TYPE_CHECKING:
    from ..tasks import Task


def read_export(path: Path) -> dict[str, Any]:
    """``export.json`` of an ONNX export folder, or one line saying what the folder is not."""
    meta_path = path / EXPORT_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = {}
    if meta.get("schema") != ONNX_SCHEMA:
        raise QBHError(
            f"'{path}' is not an ONNX export (no {EXPORT_FILE} of schema {ONNX_SCHEMA}); "
            "write one with qbert-hessian export --format onnx"
        )
    return meta


def task_loss(family: str, out: types.SimpleNamespace, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The loss transformers' heads compute from these logits (cross-entropy; QA: the mean of start and end)."""
    if family == "qa":
        if "start_positions" not in batch:
            return None
        width = out.start_logits.shape[1]
        start = batch["start_positions"].clamp(0, width)
        end = batch["end_positions"].clamp(0, width)
        return (
            F.cross_entropy(out.start_logits, start, ignore_index=width)
            + F.cross_entropy(out.end_logits, end, ignore_index=width)
        ) / 2
    if "labels" not in batch:
        return None
    logits = out.logits
    if family == "classification" and logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1), batch["labels"].float())
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), ignore_index=-100)


class OnnxModel:
    """An exported model ready to serve: its tokenizer and an ONNX Runtime CPU session.

    Args:
        path: a folder written by ``qbert-hessian export --format onnx``.
        threads: intra-op threads (default: ONNX Runtime's choice, all cores).

    Example:
        >>> model = OnnxModel("runs/sst2/deploy")  # doctest: +SKIP
        >>> model.predict(["a fun and smart movie"])  # doctest: +SKIP
        ['positive']
    """

    def __init__(self, path: Path | str, *, threads: int | None = None) -> None:
        require("onnxruntime")
        import onnxruntime as ort

        self.path = Path(path)
        meta = read_export(self.path)
        self.family: str = meta["family"]
        self.inputs: tuple[str, ...] = tuple(meta["inputs"])
        self.outputs: tuple[str, ...] = tuple(meta["outputs"])
        self.mode: str = meta["mode"]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.path / meta["model"]), options, providers=["CPUExecutionProvider"])
        self.tokenizer = load_tokenizer(str(self.path))
        config = json.loads((self.path / "config.json").read_text(encoding="utf-8"))
        self.id2label = {int(k): v for k, v in (config.get("id2label") or {}).items()}

    @property
    def file_bytes(self) -> int:
        return os.path.getsize(self.path / "onnx" / "model.onnx")

    def run(self, batch: dict[str, Any]) -> list[np.ndarray]:
        """The session's outputs (``self.outputs``) for a batch of int64 inputs (tensors or arrays)."""
        feed = {
            n: np.asarray(batch[n].cpu() if hasattr(batch[n], "cpu") else batch[n], dtype=np.int64) for n in self.inputs
        }
        return self.session.run(list(self.outputs), feed)

    def __call__(self, **batch: Any) -> types.SimpleNamespace:
        """An HF-style output for a tokenized batch: ``logits`` (QA: ``start_logits``, ``end_logits``) as torch
        tensors, and ``loss`` when the batch holds targets."""
        out = types.SimpleNamespace(**{n: torch.from_numpy(a) for n, a in zip(self.outputs, self.run(batch))})
        out.loss = task_loss(self.family, out, batch)
        return out

    def logits(self, texts: Sequence[str], pairs: Sequence[str] | None = None, *, max_length: int = 128) -> np.ndarray:
        """Logits of raw texts (and second segments ``pairs``), tokenized with the model's tokenizer."""
        enc = self.tokenizer(
            list(texts),
            list(pairs) if pairs is not None else None,
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="np",
        )
        return self.run(dict(enc))[0]

    def predict(self, texts: Sequence[str], *, max_length: int = 128) -> list[Any]:
        """Label names: one per text (classification), or one per token of each text (token tagging)."""
        if self.family == "qa":
            raise QBHError("predict serves classification and token models; for QA call the model on a batch")
        ids = self.logits(texts, max_length=max_length).argmax(-1)
        name = lambda i: self.id2label.get(int(i), str(int(i)))  # noqa: E731
        if self.family == "classification":
            return [name(i) for i in ids]
        enc = self.tokenizer(list(texts), truncation=True, max_length=max_length)
        return [[name(i) for i in row[: len(tokens)]] for row, tokens in zip(ids, enc["input_ids"])]


def evaluate_onnx(
    model: OnnxModel | Path | str,
    task: Task,
    *,
    split: str = "dev",
    batch_size: int = 64,
    threads: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """The task's metrics computed from the ONNX file (``evaluate``'s batches and metric code).

    ``model`` is an :class:`OnnxModel` or its folder; ``task`` must be tokenized with its tokenizer.
    """
    if not isinstance(model, OnnxModel):
        model = OnnxModel(model, threads=threads)
    if model.family != task.family:
        raise QBHError(
            f"'{model.path}' is a {model.family} model but task '{task.name}' is a {task.family} task; "
            "export the model fine-tuned on this task"
        )
    return evaluate_forward(lambda batch: model(**batch), task, split=split, batch_size=batch_size, progress=progress)
