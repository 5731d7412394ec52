"""Quantization-aware training: recover what direct quantization loses (Q-BERT Sec. 3; Q8BERT).

The model carries fake-quant modules (FP32 master weights W, forward with Q(W), straight-through gradient);
activation ranges follow an EMA while training. Training is transformers' ``Trainer`` with these options:

- knowledge distillation from the FP32 model, the student starting as its quantized copy (``distill``):
  ``logits`` (Hinton et al. 2015):
      L = (1 - alpha) * L_task + alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))
  ``hidden`` adds the hidden states of every layer, embedding output included, and ``full`` also the attention
  of every layer (TernaryBERT, Zhang et al. 2020, Eq. 6-7):
      + w_h * sum_l MSE(H_l^s, H_l^t) + w_a * sum_l MSE(A_l^s, A_l^t)
  The KL differs from TernaryBERT's soft cross-entropy -sum p_t log p_s only by the teacher's entropy, a constant:
  the same gradient, and zero for a student equal to its teacher. A_l are the attention *probabilities* HF
  returns with ``output_attentions=True`` (TernaryBERT matches the pre-softmax scores, which HF does not expose);
  only eager attention returns them, so ``full`` switches both models to eager for the run. MSEs are averaged over
  the real (unpadded) tokens. L_task is the model's own loss (cross-entropy for classification and tokens, the
  mean of start and end cross-entropies for QA), so any head with ``logits`` or ``start_logits``/``end_logits``
  works (:func:`output_logits`).
- learned step sizes (LSQ, Esser et al. 2020; ``learn_scales``): every group's step becomes a parameter,
  initialised from the plan's range (max or MSE search), trained with LSQ's scaled gradient.
- Quant-Noise (Fan et al. 2020): each training forward keeps a random share p of every weight's groups in
  FP32 and quantizes the rest; evaluation quantizes everything.

The best checkpoint by the task's main dev metric (accuracy; entity F1; SQuAD F1) is kept
(``load_best_model_at_end``).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import distributed
from .config import QATConfig
from .errors import QBHError
from .models import eager_attention
from .quant.apply import quant_modules, sync_activation_ranges
from .quant.modules import SCALE_PARAM
from .train import on_cpu, quiet_trainer

if TYPE_CHECKING:
    from torch import nn

    from .tasks import Task

logger = logging.getLogger(__name__)


def output_logits(output: Any) -> list[Tensor]:
    """The logit tensors of an HF model output: ``[logits]``, or ``[start_logits, end_logits]`` (QA)."""
    logits = getattr(output, "logits", None)
    if logits is not None:
        return [logits]
    heads = [getattr(output, k, None) for k in ("start_logits", "end_logits")]
    if all(h is not None for h in heads):
        return heads  # type: ignore[return-value]
    raise QBHError("model output has neither logits nor start_logits/end_logits; it cannot be distilled")


def _masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` (same shape as ``x``) is set; plain mean without one."""
    if mask is None or mask.shape != x.shape:
        return x.mean()
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def soft_cross_entropy(student: Tensor, teacher: Tensor, *, temperature: float, mask: Tensor | None = None) -> Tensor:
    """T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) over the last axis, averaged over the others.

    ``student``/``teacher`` (batch, classes), (batch, seq, classes) with ``mask`` (batch, seq) for tokens, or
    (batch, seq) for QA start/end positions.
    """
    log_s = F.log_softmax(student / temperature, dim=-1)
    log_t = F.log_softmax(teacher / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=-1)
    return temperature**2 * _masked_mean(kl, mask)


def hidden_state_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
    """sum_l MSE(H_l^s, H_l^t) over the hidden states (batch, seq, hidden), real tokens only."""
    _same_depth(student, teacher, "hidden states")
    return sum((_masked_mean((s - t).pow(2).mean(dim=-1), mask) for s, t in zip(student, teacher)), torch.zeros(()))


def attention_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
    """sum_l MSE(A_l^s, A_l^t) over the attention maps (batch, heads, query, key), real query tokens only."""
    _same_depth(student, teacher, "attentions")
    per_layer = ((s - t).pow(2).mean(dim=(1, 3)) for s, t in zip(student, teacher))  # (batch, query)
    return sum((_masked_mean(e, mask) for e in per_layer), torch.zeros(()))


def _same_depth(student: Sequence[Tensor] | None, teacher: Sequence[Tensor] | None, what: str) -> None:
    if not student or not teacher:
        raise QBHError(f"the models returned no {what}; distil {what} only from HF encoders that return them")
    if len(student) != len(teacher):
        raise QBHError(f"student has {len(student)} {what}, teacher {len(teacher)}; distil from the same architecture")


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, *, temperature: float, alpha: float
) -> torch.Tensor:
    """(1 - alpha) * CE + alpha * T^2 * KL(teacher || student) on logits (batch, classes)."""
    ce = F.cross_entropy(student, labels)
    return (1 - alpha) * ce + alpha * soft_cross_entropy(student, teacher, temperature=temperature)


def distillation_objective(student: Any, teacher: Any, attention_mask: Tensor | None, config: QATConfig) -> Tensor:
    """The QAT loss of ``config.distill`` from the student's and the teacher's HF outputs (see the module doc)."""
    logit_pairs = list(zip(output_logits(student), output_logits(teacher)))
    kd = sum(
        (soft_cross_entropy(s, t, temperature=config.temperature, mask=attention_mask) for s, t in logit_pairs),
        torch.zeros(()),
    ) / len(logit_pairs)
    loss = config.alpha * kd
    if config.alpha < 1:
        if student.loss is None:
            raise QBHError("the student returned no task loss (no labels in the batch); set QATConfig.alpha=1")
        loss = loss + (1 - config.alpha) * student.loss
    if config.distill in ("hidden", "full"):
        hidden = hidden_state_loss(student.hidden_states, teacher.hidden_states, attention_mask)
        loss = loss + config.hidden_weight * hidden
    if config.distill == "full":
        loss = loss + config.attention_weight * attention_loss(student.attentions, teacher.attentions, attention_mask)
    return loss


def _without_internals(output: Any) -> Any:
    """The output without hidden states and attentions, so evaluation gathers only the logits."""
    keep = {k: v for k, v in output.items() if k not in ("hidden_states", "attentions")}
    return type(output)(**keep)


def _batch_rows(inputs: Mapping[str, Any]) -> int:
    """The number of examples in a training batch (the first dimension of its tensors)."""
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 0


def _trainer_class(teacher: nn.Module | None, config: QATConfig) -> type:
    from transformers import Trainer

    extra = {
        "output_hidden_states": config.distill in ("hidden", "full"),
        "output_attentions": config.distill == "full",
    }

    class QATTrainer(Trainer):
        examples_seen = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D102
            if teacher is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            outputs = model(**inputs, **extra)
            with torch.no_grad():
                t_out = teacher(**inputs, **extra)
            loss = distillation_objective(outputs, t_out, inputs.get("attention_mask"), config)
            return (loss, _without_internals(outputs)) if return_outputs else loss

        def training_step(self, model, inputs, *args, **kwargs):  # noqa: D102
            self.examples_seen += _batch_rows(inputs)  # this process's share of the batch
            return super().training_step(model, inputs, *args, **kwargs)

        def _get_eval_sampler(self, eval_dataset):
            # transformers 5 also groups evaluation batches by length when training does, and hands
            # compute_metrics the predictions in that order: the scores that map rows back to their sentences
            # (entity F1, SQuAD) would pair them with the wrong ones and pick the checkpoint on noise. Evaluate in
            # the dataset's order (one process: sequentially; several: the Trainer's own in-order sharding).
            from torch.utils.data import SequentialSampler

            if eval_dataset is None:
                return None
            return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None

        def get_decay_parameter_names(self, model) -> list[str]:  # noqa: D102
            # LSQ steps are not weights: decaying them would shrink every range towards zero.
            return [n for n in super().get_decay_parameter_names(model) if not n.endswith(SCALE_PARAM)]

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

    Under torchrun the HF Trainer trains with DDP: ``config.batch_size`` is the batch of all processes together
    (each takes an equal share, so the steps are those of one process), the activation ranges follow the maximum
    over the ranks' shares and are averaged over the ranks at the end, so every rank holds the same model. It is
    one process's model to float tolerance, except that a range can differ slightly where its maximum lay on a
    padded position: each rank pads its share of a batch to its own longest row.

    Args:
        model: the output of :func:`~qbert_hessian.quant.apply.quantize_model`, activation ranges calibrated.
        task: the tokenized task (its dev split picks the best checkpoint).
        config: the training settings.
        work_dir: where the Trainer keeps its checkpoints (removed at the end).
        teacher: the FP32 model, needed unless ``config.distill`` is ``none``.
        progress: show the Trainer's progress bar.

    Returns:
        ``{"train_seconds", "steps", "examples_seen", "best_metric", "log_history", "config"}``
        (``examples_seen``: the training examples the steps took, every process's share together); the model
        holds the best weights and is left in eval mode.

    Raises:
        QBHError: no quantized module, no teacher for distillation, or a batch that does not split over the
            processes.
    """
    from .tasks import trainer_setup

    if not any(True for _ in quant_modules(model)):
        raise QBHError("model has no quantized modules; apply a plan with quantize_model first")
    distill = config.distill != "none"
    if distill and teacher is None:
        raise QBHError(f"distillation ({config.distill}) needs the FP32 teacher model; pass teacher=")
    world = distributed.world_size()
    if config.batch_size % world:
        raise QBHError(
            f"QATConfig.batch_size {config.batch_size} is the batch of all {world} processes together and must split "
            f"evenly over them; use a multiple of {world}"
        )
    setup = trainer_setup(task)
    if teacher is not None:
        teacher.eval()  # its forward runs under no_grad; its parameters are left as they are
    for _, module in quant_modules(model):
        module.noise = config.quant_noise
        if config.learn_scales:
            module.learn_scales()
    work = Path(work_dir)
    args = _training_args(
        config,
        work,
        len(task.train),
        progress,
        setup.metric,
        setup.greater_is_better,
        use_cpu=on_cpu(model),
        every_weight_used=task.family == "classification",
    )
    trainer = _trainer_class(teacher if distill else None, config)(
        model=model,
        args=args,
        train_dataset=task.train,
        eval_dataset=task.dev,
        data_collator=setup.collator,
        compute_metrics=setup.compute_metrics,
    )
    quiet_trainer(trainer, progress)
    start = time.perf_counter()
    trained = False
    with contextlib.ExitStack() as attention:
        if config.distill == "full":  # only eager attention returns the attention maps distilled
            for m in (model, teacher):
                attention.enter_context(eager_attention(m))
        try:
            out = trainer.train()
            trained = True
        finally:
            for _, module in quant_modules(model):
                module.noise = 0.0
            if trained:
                distributed.barrier()  # every rank has loaded the best checkpoint before rank 0 removes it
            if distributed.is_main():
                shutil.rmtree(work, ignore_errors=True)
    sync_activation_ranges(model)
    model.eval()
    return {
        "train_seconds": round(time.perf_counter() - start, 1),
        "steps": int(out.global_step),
        # the examples the steps trained on, counted as they came (a last batch of an epoch can be short),
        # over every process
        "examples_seen": int(distributed.all_reduce_floats([trainer.examples_seen])[0]),
        "best_metric": trainer.state.best_metric,
        "log_history": trainer.state.log_history,
        "config": config.to_dict(),
    }


def kept_score_mismatch(best_metric: float | None, metrics: Mapping[str, float], family: str) -> str | None:
    """Where the packed checkpoint's score disagrees with the score QAT kept its model by, what to say; else None.

    The Trainer scores the trained fake-quantized model on the dev split and keeps the best checkpoint by the
    family's main metric; the packed checkpoint made from that model, scored on the same split, must score the
    same. Float noise may flip a prediction or two, and under torchrun the activation ranges are averaged over
    the ranks after that score was taken: a difference is reported only beyond 0.005 or two examples' worth,
    whichever is larger. (A QAT bug that trained unrounded weights showed exactly this way: 0.007 to 0.015.)

    Args:
        best_metric: the Trainer's score of the kept model (``train_qat``'s ``best_metric``; None: nothing to
            compare).
        metrics: the packed checkpoint's scores (:func:`~qbert_hessian.evaluate.evaluate`).
        family: the task family (picks the main metric).
    """
    from .tasks import main_metric

    metric = main_metric(family)
    if best_metric is None or metric not in metrics:
        return None
    packed = float(metrics[metric])
    tolerance = max(0.005, 2 / max(1, int(metrics.get("num_examples", 1))))
    if abs(packed - best_metric) <= tolerance:
        return None
    return (
        f"the packed checkpoint scores {metric} {packed:.4f} where QAT's own evaluation of the model it kept scored "
        f"{best_metric:.4f} (tolerance {tolerance:.4f}): the packed weights are not the model that was trained and "
        "scored; the row holds the packed checkpoint's score; please report this with the run folder's qat.json"
    )


def _training_args(
    config: QATConfig,
    work: Path,
    num_train: int,
    progress: bool,
    metric: str = "accuracy",
    greater_is_better: bool = True,
    *,
    use_cpu: bool = True,
    every_weight_used: bool = False,
) -> Any:
    """The Trainer's arguments for ``config``: linear schedule, dev evaluation, the best checkpoint kept."""
    from transformers import TrainingArguments

    world = distributed.world_size()
    steps_per_epoch = max(1, -(-num_train // config.batch_size))
    total = int(np.ceil(steps_per_epoch * config.epochs))
    eval_steps = config.eval_steps or total
    return TrainingArguments(
        output_dir=str(work),
        num_train_epochs=config.epochs,
        learning_rate=config.lr,
        per_device_train_batch_size=config.batch_size // world,  # the global batch is config.batch_size
        per_device_eval_batch_size=64,
        warmup_steps=config.warmup_ratio,  # a float in [0, 1) is a share of the steps
        weight_decay=config.weight_decay,
        lr_scheduler_type="linear",
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model=metric,
        greater_is_better=greater_is_better,
        logging_steps=max(1, min(50, eval_steps)),
        report_to=[],
        seed=config.seed,
        disable_tqdm=not progress,
        use_cpu=use_cpu,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        # The encoders' heads return a mean loss and ignore num_items_in_batch; the Trainer's default would still
        # multiply it by the number of processes under DDP (a world-size larger gradient, clipped differently).
        average_tokens_across_devices=False,
        # DDP's search for unused weights costs a graph traversal per step; a sentence classifier has none
        ddp_find_unused_parameters=not every_weight_used,
    )
