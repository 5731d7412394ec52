"""Quantization-aware training: recover what direct quantization loses (Q-BERT Sec. 3; Q8BERT).

The model carries fake-quant modules (FP32 master weights W, forward with Q(W), straight-through gradient);
activation ranges follow an EMA while training. Training is transformers' ``Trainer`` with two options:

- knowledge distillation from the FP32 model (Hinton et al. 2015):
      L = (1 - alpha) * CE(z_s, y) + alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))
- Quant-Noise (Fan et al. 2020): each training forward keeps a random share p of every weight's groups in
  FP32 and quantizes the rest; evaluation quantizes everything.

The best checkpoint by the task's main dev metric (accuracy; entity F1; SQuAD F1) is kept
(``load_best_model_at_end``).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from .config import _Config, _positive
from .errors import QBHError
from .quant.apply import quant_modules
from .train import cuda_available, quiet_trainer

if TYPE_CHECKING:
    from torch import nn

    from .tasks import Task

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class QATConfig(_Config):
    """Settings of quantization-aware training.

    Args:
        epochs: passes over the training split.
        lr: peak learning rate (linear schedule).
        batch_size: training batch size.
        warmup_ratio: share of the steps with linear warm-up.
        weight_decay: AdamW weight decay.
        eval_steps: evaluate on dev every N steps and keep the best (0: only at the end).
        distill: distil from the FP32 model.
        temperature: distillation temperature T.
        alpha: weight of the distillation term.
        quant_noise: share p of groups left in FP32 per training forward (0: plain QAT).
        max_train_samples: train on a seeded subset of this many examples (None: all).
        seed: seeds the subset and the Trainer.
    """

    epochs: float = 2.0
    lr: float = 2e-5
    batch_size: int = 32
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    eval_steps: int = 0
    distill: bool = False
    temperature: float = 2.0
    alpha: float = 0.5
    quant_noise: float = 0.0
    max_train_samples: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _positive("QATConfig", epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, temperature=self.temperature)
        if self.eval_steps < 0:
            raise QBHError(f"QATConfig.eval_steps must be >= 0, got {self.eval_steps}")
        if not 0 <= self.alpha <= 1:
            raise QBHError(f"QATConfig.alpha must lie in [0, 1], got {self.alpha}")
        for name in ("quant_noise", "warmup_ratio"):
            if not 0 <= getattr(self, name) < 1:
                raise QBHError(f"QATConfig.{name} must lie in [0, 1), got {getattr(self, name)}")


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, *, temperature: float, alpha: float
) -> torch.Tensor:
    """(1 - alpha) * CE + alpha * T^2 * KL(teacher || student) on logits (batch, classes)."""
    ce = F.cross_entropy(student, labels)
    kl = F.kl_div(
        F.log_softmax(student / temperature, dim=-1),
        F.log_softmax(teacher / temperature, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    return (1 - alpha) * ce + alpha * temperature**2 * kl


def _trainer_class(teacher: nn.Module | None, config: QATConfig) -> type:
    from transformers import Trainer

    class QATTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D102
            if teacher is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            outputs = model(**inputs)
            with torch.no_grad():
                t_logits = teacher(**inputs).logits
            loss = distillation_loss(
                outputs.logits, t_logits, inputs["labels"], temperature=config.temperature, alpha=config.alpha
            )
            return (loss, outputs) if return_outputs else loss

    return QATTrainer


def train_qat(
    model: nn.Module,
    task: Task,
    config: QATConfig = QATConfig(),
    *,
    work_dir: Path | str,
    teacher: nn.Module | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Quantization-aware fine-tuning of a fake-quantized model, in place.

    Args:
        model: the output of :func:`~qbert_hessian.quant.apply.quantize_model`, activation ranges calibrated.
        task: the tokenized task (its dev split picks the best checkpoint).
        config: the training settings.
        work_dir: where the Trainer keeps its checkpoints (removed at the end).
        teacher: the FP32 model, needed when ``config.distill``.
        progress: show the Trainer's progress bar.

    Returns:
        ``{"train_seconds", "steps", "best_metric", "log_history"}``; the model holds the best weights and is
        left in eval mode.
    """
    from transformers import TrainingArguments

    from .tasks import trainer_setup

    if not any(True for _ in quant_modules(model)):
        raise QBHError("model has no quantized modules; apply a plan with quantize_model first")
    if config.distill and teacher is None:
        raise QBHError("distillation needs the FP32 teacher model; pass teacher=")
    if config.distill and task.family != "classification":
        raise QBHError(f"distillation is implemented for classification, not {task.family} tasks; drop --distill")
    setup = trainer_setup(task)
    if teacher is not None:
        teacher.eval()  # its forward runs under no_grad; its parameters are left as they are
    for _, module in quant_modules(model):
        module.noise = config.quant_noise
    work = Path(work_dir)
    steps_per_epoch = max(1, -(-len(task.train) // config.batch_size))
    total = int(np.ceil(steps_per_epoch * config.epochs))
    eval_steps = config.eval_steps or total
    args = TrainingArguments(
        output_dir=str(work),
        num_train_epochs=config.epochs,
        learning_rate=config.lr,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=64,
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        lr_scheduler_type="linear",
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model=setup.metric,
        greater_is_better=setup.greater_is_better,
        logging_steps=max(1, min(50, eval_steps)),
        report_to=[],
        seed=config.seed,
        disable_tqdm=not progress,
        use_cpu=not cuda_available(),
    )
    trainer = _trainer_class(teacher if config.distill else None, config)(
        model=model,
        args=args,
        train_dataset=task.train,
        eval_dataset=task.dev,
        data_collator=setup.collator,
        compute_metrics=setup.compute_metrics,
    )
    quiet_trainer(trainer, progress)
    start = time.perf_counter()
    try:
        out = trainer.train()
    finally:
        for _, module in quant_modules(model):
            module.noise = 0.0
        shutil.rmtree(work, ignore_errors=True)
    model.eval()
    return {
        "train_seconds": round(time.perf_counter() - start, 1),
        "steps": int(out.global_step),
        "best_metric": trainer.state.best_metric,
        "log_history": trainer.state.log_history,
        "config": config.to_dict(),
    }
