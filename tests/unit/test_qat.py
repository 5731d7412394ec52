"""qat.py: the distillation loss, the config's checks, and QAT lowering the loss of a 2-bit tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from qbert_hessian.artifacts import BitPlan
from qbert_hessian.errors import QBHError
from qbert_hessian.evaluate import evaluate
from qbert_hessian.qat import (
    QATConfig,
    attention_loss,
    distillation_loss,
    distillation_objective,
    hidden_state_loss,
    kept_score_mismatch,
    output_logits,
    soft_cross_entropy,
    train_qat,
)
from qbert_hessian.quant.apply import calibrate_activations, calibration_batches, quantize_model
from qbert_hessian.quant.modules import QuantLinear
from tests.helpers import random_batch


def test_distillation_loss_limits():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    y = torch.tensor([0, 1, 2, 1, 0])
    ce = torch.nn.functional.cross_entropy(s, y)
    assert torch.allclose(distillation_loss(s, t, y, temperature=2.0, alpha=0.0), ce)
    assert float(distillation_loss(s, s, y, temperature=3.0, alpha=1.0)) == pytest.approx(0.0, abs=1e-6)
    # KL by hand: T^2 * mean over the batch of sum_c p_t (log p_t - log p_s)
    T = 2.0
    pt, ls = torch.softmax(t / T, -1), torch.log_softmax(s / T, -1)
    kl = (pt * (torch.log(pt) - ls)).sum(-1).mean() * T**2
    assert torch.allclose(distillation_loss(s, t, y, temperature=T, alpha=1.0), kl, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 1.5}, "alpha must lie"),
        ({"quant_noise": 1.0}, "quant_noise must lie"),
        ({"lr": 0}, "lr must be a positive number"),
        ({"eval_steps": -1}, "eval_steps"),
    ],
)
def test_qat_config_refuses_bad_values(kwargs, message):
    with pytest.raises(QBHError, match=message):
        QATConfig(**kwargs)


@pytest.fixture(scope="module")
def tiny_task(tiny_checkpoint, tiny_data):
    from qbert_hessian.models import load_model
    from qbert_hessian.tasks import load_raw_task, tokenize_task

    model, tok = load_model(str(tiny_checkpoint), num_labels=2)
    return model, tokenize_task(load_raw_task("sst2", data_dir=tiny_data), tok, max_length=16)


def test_qat_lowers_the_loss_of_a_two_bit_model(tiny_task, tmp_path):
    model, task = tiny_task
    blocks = {f"encoder.{i}": {"bits": 2, "groups": "channel"} for i in range(2)}
    plan = BitPlan(model={}, blocks=blocks, act_range="max")  # static EMA ranges, which QAT moves (checked below)
    q = quantize_model(model, plan)
    calibrate_activations(q, calibration_batches(task, 2, 16))
    before = evaluate(q, task, split="train")["loss"]
    master = q.bert.encoder.layer[0].intermediate.dense.weight.detach().clone()
    amax = float(q.bert.encoder.layer[0].intermediate.dense.act.amax)
    cfg = QATConfig(epochs=8, lr=3e-3, batch_size=16, warmup_ratio=0.0, distill=True, alpha=0.3, quant_noise=0.25)
    result = train_qat(q, task, cfg, work_dir=tmp_path / "w", teacher=model, progress=False)
    after = evaluate(q, task, split="train")["loss"]
    assert after < before - 0.01, (before, after)
    layer = q.bert.encoder.layer[0].intermediate.dense
    assert isinstance(layer, QuantLinear) and not torch.equal(layer.weight, master)  # master weights trained
    assert float(layer.act.amax) != amax  # EMA ranges follow the training activations
    assert layer.noise == 0.0 and not q.training
    assert result["steps"] == 8 * math.ceil(96 / 16) and not (tmp_path / "w").exists()
    assert all(p.requires_grad for p in model.parameters())  # the teacher is left as it was


def test_qat_needs_a_quantized_model_and_a_teacher_for_distillation(tiny_task, tmp_path):
    model, task = tiny_task
    with pytest.raises(QBHError, match="no quantized modules"):
        train_qat(model, task, QATConfig(), work_dir=tmp_path)
    q = quantize_model(model, BitPlan(model={}, blocks={"encoder.0": {"bits": 4, "groups": 1}}, act_bits=None))
    with pytest.raises(QBHError, match="teacher"):
        train_qat(q, task, QATConfig(distill=True), work_dir=tmp_path)


@pytest.mark.parametrize(("value", "mode"), [(True, "logits"), (False, "none"), ("hidden", "hidden"), ("full", "full")])
def test_qat_config_distill_accepts_modes_and_old_booleans(value, mode):
    assert QATConfig(distill=value).distill == mode
    assert QATConfig.from_dict({"distill": value}).to_dict()["distill"] == mode


@pytest.mark.parametrize("bad", ["attention", 1, None, "Full"])
def test_qat_config_refuses_unknown_distill_modes(bad):
    with pytest.raises(QBHError, match=r"QATConfig.distill .* is not valid; use none, logits, hidden or full"):
        QATConfig.from_dict({"distill": bad})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"hidden_weight": -1.0}, "hidden_weight must be >= 0"), ({"group_by_length": "yes"}, "group_by_length must be")],
)
def test_qat_config_refuses_bad_distillation_and_budget_settings(kwargs, message):
    with pytest.raises(QBHError, match=message):
        QATConfig(**kwargs)


def _outputs(model, batch, **extra):
    return model(**batch, output_hidden_states=True, output_attentions=True, **extra)


@pytest.mark.parametrize("mode", ["logits", "hidden", "full"])
def test_distillation_terms_vanish_for_a_student_equal_to_its_teacher(tiny_bert, mode):
    import copy

    batch = random_batch(tiny_bert.config.vocab_size)
    student = copy.deepcopy(tiny_bert)
    cfg = QATConfig(distill=mode, alpha=1.0)
    with torch.no_grad():
        s_out, t_out = _outputs(student, batch), _outputs(tiny_bert, batch)
    assert len(s_out.hidden_states) == 3 and len(s_out.attentions) == 2  # embeddings + 2 layers; 2 attention maps
    assert float(distillation_objective(s_out, t_out, batch["attention_mask"], cfg)) == 0.0
    assert float(hidden_state_loss(s_out.hidden_states, t_out.hidden_states, batch["attention_mask"])) == 0.0
    assert float(attention_loss(s_out.attentions, t_out.attentions, batch["attention_mask"])) == 0.0


def test_distillation_losses_are_positive_and_train_the_student_only(tiny_bert):
    batch = random_batch(tiny_bert.config.vocab_size)
    plan = BitPlan(model={}, blocks={f"encoder.{i}": {"bits": 2, "groups": "channel"} for i in range(2)}, act_bits=None)
    student = quantize_model(tiny_bert, plan)
    student.train()
    s_out = _outputs(student, batch)
    with torch.no_grad():
        t_out = _outputs(tiny_bert, batch)
    mask = batch["attention_mask"]
    hidden = hidden_state_loss(s_out.hidden_states, t_out.hidden_states, mask)
    attn = attention_loss(s_out.attentions, t_out.attentions, mask)
    assert float(hidden.detach()) > 0 and float(attn.detach()) > 0
    # Embedding output is not quantized in this plan: its term is exactly zero, the layers' are not.
    assert float(hidden_state_loss(s_out.hidden_states[:1], t_out.hidden_states[:1], mask).detach()) == 0.0
    full = distillation_objective(s_out, t_out, mask, QATConfig(distill="full", alpha=0.5))
    logits_only = distillation_objective(s_out, t_out, mask, QATConfig(distill="logits", alpha=0.5))
    assert torch.allclose(full, logits_only + hidden + attn)
    tiny_bert.zero_grad()
    full.backward()
    assert all(p.grad is None for p in tiny_bert.parameters())  # the teacher gets nothing
    w = student.bert.encoder.layer[0].attention.self.query.weight
    assert w.grad is not None and float(w.grad.abs().sum()) > 0


def test_padded_tokens_do_not_count_in_the_distillation_terms():
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    t_h, t_a, t_z = torch.randn(2, 4, 8, generator=g), torch.rand(2, 3, 4, 4, generator=g), torch.randn(2, 4, 5)
    pad = (mask == 0)[..., None]
    s_h = torch.where(pad, t_h + 5.0, t_h)
    s_a = torch.where(pad[:, None], t_a + 1.0, t_a)  # differs on the padded query rows only
    s_z = torch.where(pad, t_z - 3.0, t_z)  # token-classification logits (batch, seq, classes)
    assert float(hidden_state_loss([s_h], [t_h], mask)) == 0.0
    assert float(attention_loss([s_a], [t_a], mask)) == 0.0
    assert float(soft_cross_entropy(s_z, t_z, temperature=2.0, mask=mask)) == 0.0
    assert float(hidden_state_loss([s_h], [t_h])) > 0  # without the mask they would count


def test_distillation_uses_both_heads_of_a_qa_output():
    from transformers.modeling_outputs import QuestionAnsweringModelOutput

    g = torch.Generator().manual_seed(0)
    t = QuestionAnsweringModelOutput(
        start_logits=torch.randn(3, 6, generator=g), end_logits=torch.randn(3, 6, generator=g)
    )
    s_start = torch.randn(3, 6, generator=g)
    s = QuestionAnsweringModelOutput(loss=torch.tensor(0.7), start_logits=s_start, end_logits=t.end_logits.clone())
    assert [x.shape for x in output_logits(s)] == [(3, 6), (3, 6)]
    cfg = QATConfig(distill="logits", alpha=0.5, temperature=1.0)
    expected = 0.5 * soft_cross_entropy(s_start, t.start_logits, temperature=1.0) / 2 + 0.5 * 0.7
    assert torch.allclose(distillation_objective(s, t, None, cfg), expected)
    with pytest.raises(QBHError, match="neither logits nor start_logits"):
        output_logits(QuestionAnsweringModelOutput(start_logits=s_start))


def test_qat_with_learned_steps_and_full_distillation(tiny_task, tmp_path):
    model, task = tiny_task
    model.set_attn_implementation("sdpa")  # so the run must switch both models to eager, and back
    try:
        blocks = {f"encoder.{i}": {"bits": 2, "groups": "channel"} for i in range(2)}
        q = quantize_model(model, BitPlan(model={}, blocks=blocks, range_method="mse"))
        calibrate_activations(q, calibration_batches(task, 2, 16))
        layer = q.bert.encoder.layer[1].output.dense
        start = layer.quantized().scale.clone()
        cfg = QATConfig(
            epochs=1, lr=1e-2, batch_size=16, warmup_ratio=0.0, distill="full", learn_scales=True, group_by_length=True
        )
        result = train_qat(q, task, cfg, work_dir=tmp_path / "w", teacher=model, progress=False)
        assert model.config._attn_implementation == q.config._attn_implementation == "sdpa"
    finally:
        model.set_attn_implementation("eager")
    assert layer.weight_scale is not None and not torch.equal(layer.quantized().scale, start)  # the steps learned
    assert result["steps"] == 6 and result["examples_seen"] == 6 * 16
    assert result["config"]["distill"] == "full" and result["config"]["learn_scales"]
    assert all(p.grad is None for p in model.parameters())


def test_qat_training_arguments_follow_the_budget_settings(tmp_path):
    from qbert_hessian.qat import _training_args

    args = _training_args(QATConfig(group_by_length=True, epochs=0.5, batch_size=8), tmp_path, 100, False)
    assert args.train_sampling_strategy == "group_by_length" and args.num_train_epochs == 0.5
    assert args.eval_steps == 7  # ceil(ceil(100 / 8) * 0.5)
    assert _training_args(QATConfig(), tmp_path, 100, False).train_sampling_strategy == "random"


def test_qat_after_gptq_starts_from_the_rounded_model_and_trains_on_its_grid(tiny_task, tmp_path):
    """QAT from second-order rounding: training starts from the GPTQ-rounded weights, keeps each layer on the grid
    GPTQ chose its codes on (the scales do not move with the weight), and exports what it trained."""
    from qbert_hessian.export import load_packed, save_packed
    from qbert_hessian.quant.apply import quantize_calibrated
    from qbert_hessian.quant.functional import quantize_with

    model, task = tiny_task
    blocks = {f"encoder.{i}": {"bits": 2, "groups": "channel"} for i in range(2)}
    plan = BitPlan(model={}, blocks=blocks, range_method="mse", rounding="gptq", gptq={"calib_samples": 32})
    q = quantize_calibrated(model, plan, task, num_batches=2, batch_size=16)
    layer = q.bert.encoder.layer[0].intermediate.dense
    rounded = layer.quantized()
    assert layer.rounding == "gptq" and torch.equal(layer.weight.detach(), rounded.dequantize())
    cfg = QATConfig(epochs=2, lr=3e-3, batch_size=16, warmup_ratio=0.0)
    used: list[bool] = []  # per training forward: the weight it used lies on the grid (the Trainer's fused steps)

    def on_grid(module, args, output):
        if module.training:
            grid = quantize_with(module.weight.detach(), module.grid_scale, module.grid_zero, 2, module.grid)
            used.append(torch.equal(module.qweight().detach(), grid.dequantize()))

    hook = layer.register_forward_hook(on_grid)
    train_qat(q, task, cfg, work_dir=tmp_path / "w", teacher=model, progress=False)
    hook.remove()
    assert len(used) == 12 and all(used)  # 2 epochs of 96 / 16
    trained = layer.quantized()
    assert not torch.equal(layer.weight.detach(), rounded.dequantize())  # the master weights trained
    assert torch.equal(trained.scale, rounded.scale) and not torch.equal(trained.codes, rounded.codes)
    save_packed(q, tmp_path / "packed", plan=plan)
    back = load_packed(tmp_path / "packed")
    batch = random_batch(model.config.vocab_size, seed=3)
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        assert torch.equal(back(**inputs).logits, q(**inputs).logits)


def test_qat_evaluates_in_the_datasets_order_when_training_groups_by_length(tmp_path):
    """transformers 5 groups evaluation batches by length when training does; entity F1 and SQuAD map each row
    back to its sentence, so QAT's Trainer must hand compute_metrics the rows in order (else its checkpoint choice
    rests on noise): its dev predictions equal an in-order pass, and its F1 the one scored from them."""
    from qbert_hessian.models import load_model
    from qbert_hessian.qat import _trainer_class, _training_args
    from qbert_hessian.tasks import load_raw_task, tokenize_task, trainer_setup
    from tests.helpers import make_tiny_checkpoint, write_ner_dir

    raw = load_raw_task("conll03", data_dir=write_ner_dir(tmp_path / "ner", train=8, dev=40))
    model, tok = load_model(
        str(make_tiny_checkpoint(tmp_path / "ckpt")), task_family="token", label_names=raw.label_names, new_head=True
    )
    task = tokenize_task(raw, tok, max_length=16)
    lengths = [len(r) for r in task.dev["input_ids"]]
    assert len(set(lengths)) > 1  # grouping by length would reorder these rows
    cfg = QATConfig(group_by_length=True, batch_size=8)
    setup = trainer_setup(task)
    args = _training_args(cfg, tmp_path / "w", len(task.train), False, setup.metric, True, use_cpu=True)
    trainer = _trainer_class(None, cfg)(
        model=model,
        args=args,
        eval_dataset=task.dev,
        data_collator=setup.collator,
        compute_metrics=setup.compute_metrics,
    )
    out = trainer.predict(task.dev)
    model.eval()
    with torch.no_grad():
        for i, row in enumerate(task.dev):
            ids = torch.tensor([row["input_ids"]])
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
            assert torch.allclose(torch.from_numpy(out.predictions[i, : len(ids[0])]), logits, atol=1e-5), i
    assert out.metrics["test_f1"] == evaluate(model, task)["f1"]


@pytest.mark.parametrize(
    ("family", "best", "metrics", "flagged"),
    [
        ("classification", 0.8934, {"accuracy": 0.8934, "f1": 0.1, "num_examples": 872}, False),
        ("classification", 0.8934, {"accuracy": 0.8865, "num_examples": 872}, True),  # SST-2 as the bug showed
        ("classification", 0.8934, {"accuracy": 0.8911, "num_examples": 872}, False),  # two sentences flipped
        ("qa", 0.579, {"f1": 0.567, "exact_match": 0.579, "num_examples": 2000}, True),  # SQuAD as the bug showed
        ("qa", 0.579, {"f1": 0.5775, "exact_match": 0.3, "num_examples": 2000}, False),
        ("token", 0.70, {"f1": 0.64, "accuracy": 0.70, "num_examples": 24}, False),  # under two of 24 sentences
        ("token", 0.70, {"f1": 0.50, "accuracy": 0.70, "num_examples": 24}, True),
        ("token", None, {"f1": 0.50, "num_examples": 24}, False),  # nothing to compare
    ],
)
def test_a_packed_score_that_disagrees_with_qats_kept_score_is_reported(family, best, metrics, flagged):
    problem = kept_score_mismatch(best, metrics, family)
    assert (problem is not None) == flagged
    if flagged:
        main = "accuracy" if family == "classification" else "f1"
        assert f"{main} {metrics[main]:.4f}" in problem and f"scored {best:.4f}" in problem
