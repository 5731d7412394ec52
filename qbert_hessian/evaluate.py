"""Task metrics of a model on a split, by task family, and the mean task loss.

  classification  accuracy, macro_f1
  token           entity-level precision / recall / f1 (seqeval, CoNLL rules) and token accuracy
  qa              SQuAD v1.1 exact_match and f1 after n-best span search over each example's features

``loss`` is the task's training loss averaged like the curvature averages it: over examples (classification),
labelled tokens (token) or features (qa); see ``hessian.hvp.loss_weight``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .artifacts import METRIC_COLUMNS
from .hessian.hvp import loss_weight
from .tasks import classification_metrics, pad_stack, task_scores

if TYPE_CHECKING:
    from .tasks import Task

__all__ = ["METRIC_COLUMNS", "classification_metrics", "evaluate", "evaluate_forward", "summary"]


def summary(metrics: dict[str, float], family: str) -> str:
    """``accuracy 0.9123, macro_f1 0.9101`` (the family's columns present in ``metrics``)."""
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in METRIC_COLUMNS[family] if k in metrics)


def _outputs(out, family: str) -> list[np.ndarray]:
    """The prediction arrays of one forward: logits, or (start, end) logits for QA."""
    if family == "qa":
        return [out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()]
    return [out.logits.float().cpu().numpy()]


@torch.no_grad()
def evaluate(
    model: nn.Module, task: Task, *, split: str = "dev", batch_size: int = 64, progress: bool = False
) -> dict[str, float]:
    """Evaluate ``model`` on ``task``'s ``split`` in eval mode (its previous mode is restored).

    Returns:
        classification: ``{"accuracy", "macro_f1", "loss", "num_examples"}``; token: ``{"precision", "recall",
        "f1", "accuracy", "loss", "num_examples"}`` (examples are sentences); qa: ``{"exact_match", "f1",
        "loss", "num_examples"}`` (examples are questions). Scores are fractions in [0, 1].
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        return evaluate_forward(
            lambda batch: model(**{k: v.to(device) for k, v in batch.items()}),
            task,
            split=split,
            batch_size=batch_size,
            progress=progress,
        )
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_forward(
    forward: Callable[[dict[str, torch.Tensor]], Any],
    task: Task,
    *,
    split: str = "dev",
    batch_size: int = 64,
    progress: bool = False,
) -> dict[str, float]:
    """:func:`evaluate` for any forward: ``forward(batch)`` returns an HF-style output (``logits``, or
    ``start_logits``/``end_logits`` for QA, and ``loss``), e.g. an ONNX Runtime session's; same batches, same
    metric code."""
    data = task.dev if split == "dev" else task.train
    preds: list[list[np.ndarray]] = []
    labels: list[np.ndarray] = []
    losses: list[tuple[float, int]] = []
    for start in tqdm(range(0, len(data), batch_size), desc=f"evaluate {split}", disable=not progress):
        batch = task.batch(split, range(start, min(start + batch_size, len(data))))
        out = forward(batch)
        weight = loss_weight(batch)
        if weight:  # a token batch whose words were all truncated away has no loss
            losses.append((float(out.loss), weight))
        preds.append(_outputs(out, task.family))
        if "labels" in batch:
            labels.append(batch["labels"].cpu().numpy())
    stacked = [pad_stack([p[i] for p in preds]) for i in range(len(preds[0]))]
    predictions = tuple(stacked) if task.family == "qa" else stacked[0]
    label_ids = pad_stack(labels) if labels else None
    metrics = task_scores(task, split, predictions, label_ids)
    total = sum(w for _, w in losses)
    metrics["loss"] = math.fsum(loss * w for loss, w in losses) / total if total else float("nan")
    metrics["num_examples"] = metrics.get("num_examples", len(data))
    return metrics
