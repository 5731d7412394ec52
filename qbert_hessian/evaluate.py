"""Task metrics of a model on a split: accuracy, macro-F1 and mean cross-entropy."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from .tasks import Task


def classification_metrics(pred: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
    """Accuracy and macro-averaged F1 (a class absent from both pred and labels is skipped)."""
    f1s = []
    for c in range(num_labels):
        tp = float(np.sum((pred == c) & (labels == c)))
        fp = float(np.sum((pred == c) & (labels != c)))
        fn = float(np.sum((pred != c) & (labels == c)))
        if tp + fp + fn > 0:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float(np.mean(pred == labels)), "macro_f1": float(np.mean(f1s)) if f1s else 0.0}


@torch.no_grad()
def evaluate(
    model: nn.Module, task: Task, *, split: str = "dev", batch_size: int = 64, progress: bool = False
) -> dict[str, float]:
    """Evaluate ``model`` on ``task``'s ``split`` in eval mode (its previous mode is restored).

    Returns:
        ``{"accuracy", "macro_f1", "loss", "num_examples"}``.
    """
    data = task.dev if split == "dev" else task.train
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds, labels, loss_sum = [], [], 0.0
    try:
        for start in tqdm(range(0, len(data), batch_size), desc=f"evaluate {split}", disable=not progress):
            batch = task.batch(split, range(start, min(start + batch_size, len(data))))
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**batch)
            loss_sum += float(out.loss) * len(batch["labels"])
            preds.append(out.logits.argmax(-1).cpu().numpy())
            labels.append(batch["labels"].cpu().numpy())
    finally:
        model.train(was_training)
    pred, lab = np.concatenate(preds), np.concatenate(labels)
    return {
        **classification_metrics(pred, lab, task.num_labels),
        "loss": loss_sum / len(lab),
        "num_examples": int(len(lab)),
    }
