"""Fine-tuning with transformers' ``Trainer``: the FP32 baseline every later stage analyses.

The checkpoint is saved with ``save_pretrained`` (model, tokenizer, config with the label names) plus
``metrics.json`` holding the dev metrics and the settings, so a run can be judged and reproduced from its
folder alone. Trainer checkpoints under ``<out>/trainer`` let an interrupted run resume.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import distributed
from .artifacts import CREATED_BY, METRICS_SCHEMA, publish, write_json
from .config import FinetuneConfig
from .errors import QBHError
from .evaluate import evaluate

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .tasks import Task

logger = logging.getLogger(__name__)


def finetune(
    model: PreTrainedModel,
    task: Task,
    config: FinetuneConfig,
    out_dir: Path | str,
    *,
    model_name: str = "model",
    resume: bool = False,
    progress: bool = True,
    eval_subset: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model`` on ``task.train``, save it to ``out_dir`` and return its metrics.

    Args:
        model: an encoder with the task family's head, matching ``task.num_labels``.
        task: the tokenized task (subset the training split beforehand to train on less).
        config: the training settings.
        out_dir: where the checkpoint, tokenizer and ``metrics.json`` go.
        model_name: the base model's name, recorded in the metrics.
        resume: continue from the newest Trainer checkpoint in ``out_dir/trainer``.
        progress: show the Trainer's progress bar.
        eval_subset: how ``task.dev`` was subset (``max_eval_samples``, ``eval_seed``), recorded in the metrics.

    Returns:
        The content of ``metrics.json`` (on every rank).

    Under torchrun the Trainer trains with DDP: ``config.batch_size`` is the batch of all processes together,
    each taking an equal share; rank 0 evaluates and writes the checkpoint while the others wait.

    Raises:
        QBHError: a batch size that does not split evenly over the processes.
    """
    from transformers import Trainer, TrainingArguments

    from .tasks import collator

    world = distributed.world_size()
    if config.batch_size % world:
        raise QBHError(
            f"FinetuneConfig.batch_size {config.batch_size} is the batch of all {world} processes together and must "
            f"split evenly over them; use a multiple of {world}"
        )
    out = Path(out_dir)
    work = out / "trainer"
    args = TrainingArguments(
        output_dir=str(work),
        num_train_epochs=config.epochs,
        learning_rate=config.lr,
        per_device_train_batch_size=config.batch_size // world,
        warmup_steps=config.warmup_ratio,  # a float below 1 is a share of the steps
        weight_decay=config.weight_decay,
        lr_scheduler_type="linear",
        save_strategy="steps",
        save_steps=200,
        save_total_limit=1,
        logging_steps=50,
        report_to=[],
        seed=config.seed,
        disable_tqdm=not progress,
        use_cpu=on_cpu(model),
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        # BERT heads return a mean loss and ignore num_items_in_batch; the Trainer's default would still multiply
        # it by the number of processes under DDP (a world-size larger gradient, clipped differently).
        average_tokens_across_devices=False,
        # a sentence classifier uses every weight; token and QA heads leave the pooler unused
        ddp_find_unused_parameters=task.family != "classification",
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=task.train,
        data_collator=collator(task.family, task.tokenizer),
    )
    quiet_trainer(trainer, progress)
    start = time.perf_counter()
    has_checkpoint = resume and any(work.glob("checkpoint-*"))
    trainer.train(resume_from_checkpoint=True if has_checkpoint else None)
    seconds = time.perf_counter() - start
    model.config.architectures = [type(model).__name__]
    main = distributed.is_main()
    result = _save_on_main(model, task, config, out, model_name, seconds, eval_subset or {}) if main else None
    distributed.barrier()  # the checkpoint is in place before any rank loads it
    return distributed.broadcast_object(result)


def _save_on_main(
    model: PreTrainedModel,
    task: Task,
    config: FinetuneConfig,
    out: Path,
    model_name: str,
    seconds: float,
    eval_subset: dict[str, Any],
) -> dict[str, Any]:
    """Evaluate on dev, then publish the checkpoint and ``metrics.json`` in ``out`` (rank 0's work)."""
    work = out / "trainer"
    metrics = evaluate(model, task, split="dev")
    # Save beside the final place, then move file by file; metrics.json comes last and marks a complete
    # checkpoint, so an interrupted save never passes for a finished one.
    staging = out / ".saving"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    task.tokenizer.save_pretrained(staging)
    publish(staging)
    for f in staging.iterdir():
        os.replace(f, out / f.name)
    staging.rmdir()
    shutil.rmtree(work, ignore_errors=True)  # Trainer checkpoints only matter while training
    result = {
        "schema": METRICS_SCHEMA,
        "created_by": CREATED_BY,
        "stage": "finetune",
        "model": model_name,
        "task": task.name,
        "split": "dev",
        **eval_subset,
        "metrics": metrics,
        "train_examples": len(task.train),
        "train_seconds": round(seconds, 1),
        "config": config.to_dict(),
    }
    write_json(out / "metrics.json", result)
    return result


def quiet_trainer(trainer: Any, progress: bool) -> None:
    """Without progress output the Trainer still prints every log as a dict (its PrinterCallback): remove it."""
    from transformers.trainer_callback import PrinterCallback

    if not progress:
        trainer.remove_callback(PrinterCallback)


def on_cpu(model: Any) -> bool:
    """Whether ``model`` lives on the CPU: the Trainer then trains there (gloo under torchrun) instead of moving it
    to a GPU the user did not ask for (the device follows the model)."""
    return next(model.parameters()).device.type == "cpu"
