from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from qbert_hessian.artifacts import SensitivityReport
from qbert_hessian.config import SensitivityConfig
from qbert_hessian.errors import QBHError
from qbert_hessian.models import load_model
from qbert_hessian.sensitivity import draw_indices, estimate_sensitivity
from qbert_hessian.tasks import load_task

FAST = SensitivityConfig(draws=3, batch_size=8, max_iters=15, tol=1e-3, trace_samples=3, max_length=16)


@pytest.fixture(scope="module")
def model_task(tiny_checkpoint, tiny_data):
    model, tok = load_model(str(tiny_checkpoint), num_labels=2)
    return model, load_task("sst2", tok, data_dir=tiny_data, max_length=16)


def test_sensitivity_omega_is_abs_mean_plus_std(model_task):
    model, task = model_task
    report = estimate_sensitivity(model, task, FAST, progress=False)
    assert [b.name for b in report.blocks] == ["embeddings", "encoder.0", "encoder.1"]
    assert report.complete
    for b in report.blocks:
        assert len(b.eigenvalues) == 3
        assert b.mean == pytest.approx(np.mean(b.eigenvalues))
        assert b.std == pytest.approx(np.std(b.eigenvalues, ddof=1))
        assert b.omega == pytest.approx(abs(b.mean) + b.std)
        assert b.trace is not None and b.trace.samples == 9
        assert b.normalized_trace == pytest.approx(b.trace.mean / b.num_params)
    assert report.block("encoder.0").num_params == sum(p.numel() for p in model.bert.encoder.layer[0].parameters())


def test_power_and_lanczos_agree_on_converged_blocks(model_task):
    model, task = model_task
    tight = dataclasses.replace(FAST, draws=2, tol=1e-6, max_iters=400, trace="none")
    a = estimate_sensitivity(model, task, tight, blocks=["embeddings"], progress=False)
    b = estimate_sensitivity(
        model, task, dataclasses.replace(tight, method="power"), blocks=["embeddings"], progress=False
    )
    assert all(a.blocks[0].converged) and all(b.blocks[0].converged)
    assert a.blocks[0].eigenvalues == pytest.approx(b.blocks[0].eigenvalues, rel=1e-3)


def test_sensitivity_is_reproducible_and_resumes(model_task):
    model, task = model_task
    seen, states = [], []

    def on_draw(report, state):
        states.append(None if state is None else (list(report.pending), copy.deepcopy(state)))

    full = estimate_sensitivity(
        model, task, FAST, progress=False, on_block=lambda r: seen.append(len(r.blocks)), on_draw=on_draw
    )
    assert seen == [3]  # the blocks finish together, after the last draw
    assert [s and s[1]["draws_done"] for s in states] == [1, 2, None]  # saved after every draw but the last
    assert states[0][0] == ["embeddings", "encoder.0", "encoder.1"]  # the report written with them: all pending
    again = estimate_sensitivity(model, task, FAST, progress=False)
    for a, b in zip(full.blocks, again.blocks):
        assert a.eigenvalues == b.eigenvalues and a.trace.mean == b.trace.mean  # reproducible to the bit

    # A finished block kept from the report; the others continue from the state saved after draw 1 or 2.
    partial = SensitivityReport.from_dict(full.to_dict())
    partial.blocks = []
    partial.pending = ["embeddings", "encoder.0", "encoder.1"]
    for _, state in states[:2]:
        resumed = estimate_sensitivity(model, task, FAST, progress=False, resume=partial, resume_state=state)
        assert resumed.complete
        for a, b in zip(full.blocks, resumed.blocks):
            assert a.eigenvalues == b.eigenvalues and a.iterations == b.iterations, a.name
            assert a.trace.mean == b.trace.mean and a.trace.samples == b.trace.samples, a.name
    partial.blocks = partial.blocks[:0] + [full.blocks[0]]
    partial.pending = ["encoder.0", "encoder.1"]
    # the saved draws are of three blocks, not these two: not used, the two start over (same numbers)
    resumed = estimate_sensitivity(model, task, FAST, progress=False, resume=partial, resume_state=states[0][1])
    assert resumed.complete
    for a, b in zip(full.blocks, resumed.blocks):
        assert a.eigenvalues == pytest.approx(b.eigenvalues, rel=1e-6)
    assert resumed.blocks[0].seconds == full.blocks[0].seconds  # kept, not recomputed
    other = dataclasses.replace(FAST, seed=FAST.seed + 1)
    with pytest.raises(QBHError, match="cannot resume"):
        estimate_sensitivity(model, task, other, progress=False, resume=partial, resume_state=states[0][1])


def test_blocks_share_one_graph_per_draw_with_their_own_numbers(model_task):
    """Blocks computed together (one graph per draw) give the numbers each gives alone (its own graphs)."""
    model, task = model_task
    cfg = dataclasses.replace(FAST, max_iters=200)
    together = estimate_sensitivity(model, task, cfg, progress=False)
    for block in together.blocks:
        alone = estimate_sensitivity(model, task, cfg, blocks=[block.name], progress=False).blocks[0]
        assert all(block.converged) and all(alone.converged)
        # The same products up to float32 rounding, which can move a stop by a step: both within the tolerance.
        assert alone.eigenvalues == pytest.approx(block.eigenvalues, rel=2 * cfg.tol), block.name
        if alone.iterations == block.iterations:  # then the trace's probes, drawn after the solver, are the same
            assert alone.trace.mean == pytest.approx(block.trace.mean, rel=1e-3, abs=1e-6), block.name
    separate = estimate_sensitivity(model, task, dataclasses.replace(cfg, shared_graph=False), progress=False)
    assert separate.config == together.config  # how the graphs are built is not a setting of the numbers
    for a, b in zip(separate.blocks, together.blocks):
        assert a.eigenvalues == pytest.approx(b.eigenvalues, rel=2 * cfg.tol), a.name
    assert any(  # (seeded by the block's name: the same probes whichever blocks run beside it)
        estimate_sensitivity(model, task, cfg, blocks=[b.name], progress=False).blocks[0].iterations == b.iterations
        for b in together.blocks
    )


def test_sensitivity_numbers_do_not_depend_on_the_allocator(model_task):
    """Reusing freed memory (the default) changes where tensors live, not a number or a recorded setting."""
    model, task = model_task
    on = estimate_sensitivity(model, task, FAST, progress=False)
    off = estimate_sensitivity(model, task, dataclasses.replace(FAST, reuse_memory=False), progress=False)
    assert on.config == off.config
    for a, b in zip(on.blocks, off.blocks):
        assert a.eigenvalues == b.eigenvalues and a.iterations == b.iterations, a.name
        assert a.trace.mean == b.trace.mean, a.name


def test_sensitivity_with_hutchpp_traces(model_task):
    model, task = model_task
    cfg = dataclasses.replace(FAST, trace_method="hutchpp", trace_samples=6)
    report = estimate_sensitivity(model, task, cfg, blocks=["encoder.0", "encoder.1"], progress=False)
    plain = estimate_sensitivity(model, task, FAST, blocks=["encoder.0", "encoder.1"], progress=False)
    assert report.config["trace_method"] == "hutchpp"
    for b, h in zip(report.blocks, plain.blocks):
        # per draw: a sketch of 2, H Q for 2, 2 residual probes; 3 draws
        assert b.trace.method == "hutchpp" and b.trace.products == 18 and b.trace.samples == 6
        assert h.trace.method == "hutchinson" and h.trace.products == 9
        assert 0 < b.trace.stderr and b.normalized_trace == pytest.approx(b.trace.mean / b.num_params)
        # two unbiased estimates of the same mean trace over the same draws
        assert abs(b.trace.mean - h.trace.mean) <= 4 * (b.trace.stderr**2 + h.trace.stderr**2) ** 0.5
        assert b.eigenvalues == pytest.approx(h.eigenvalues, rel=1e-6)  # the trace comes after the eigen-solver


def test_a_report_from_before_trace_method_resumes(model_task):
    model, task = model_task
    report = estimate_sensitivity(model, task, FAST, blocks=["encoder.0"], progress=False)
    assert "trace_method" not in report.config  # Hutchinson's: written as before the setting existed
    resumed = estimate_sensitivity(model, task, FAST, blocks=["encoder.0", "encoder.1"], resume=report, progress=False)
    assert resumed.complete and resumed.blocks[0].seconds == report.blocks[0].seconds
    with pytest.raises(QBHError, match="cannot resume.*trace_method 'hutchinson' vs 'hutchpp'"):
        estimate_sensitivity(
            model,
            task,
            dataclasses.replace(FAST, trace_method="hutchpp", trace_samples=4),
            blocks=["encoder.0", "encoder.1"],
            resume=report,
            progress=False,
        )


def test_resume_refuses_other_settings(model_task):
    model, task = model_task
    report = estimate_sensitivity(model, task, FAST, blocks=["encoder.1"], progress=False)
    with pytest.raises(QBHError, match="cannot resume.*draws"):
        estimate_sensitivity(
            model, task, dataclasses.replace(FAST, draws=2), blocks=["encoder.1"], resume=report, progress=False
        )


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_sensitivity_options_topk_negative_shared(model_task, method):
    model, task = model_task
    cfg = dataclasses.replace(FAST, draws=2, top_k=2, most_negative=True, trace="shared", max_iters=200, method=method)
    report = estimate_sensitivity(
        model, task, cfg, blocks=["embeddings.word", "encoder.0.query", "encoder.1"], progress=False
    )
    assert any(all(b.converged) for b in report.blocks)
    for b in report.blocks:
        assert len(b.top_k) == 2 and [x[0] for x in b.top_k] == b.eigenvalues
        for topk, neg, ok in zip(b.top_k, b.most_negative, b.converged):
            # The ordering holds for converged eigenpairs above float32 noise (dense checks are in test_eigen).
            if ok and abs(topk[0]) > 1e-5:
                assert abs(topk[0]) >= abs(topk[1]) * (1 - 1e-2)
                assert neg <= topk[0] + 1e-6
        assert b.trace.samples == 6


def test_sensitivity_errors(model_task):
    model, task = model_task
    with pytest.raises(QBHError, match="encoder.7.*encoder.0..encoder.1"):
        estimate_sensitivity(model, task, FAST, blocks=["encoder.7"], progress=False)
    with pytest.raises(QBHError, match="overlap"):
        estimate_sensitivity(
            model,
            task,
            dataclasses.replace(FAST, trace="shared"),
            blocks=["encoder.0", "encoder.0.key"],
            progress=False,
        )
    with pytest.raises(QBHError, match="training examples"):
        draw_indices(10, dataclasses.replace(FAST, batch_size=16))


def test_draws_are_seeded_and_distinct():
    a = draw_indices(1000, FAST)
    assert a == draw_indices(1000, FAST)
    assert a != draw_indices(1000, dataclasses.replace(FAST, seed=1))
    assert len({tuple(x) for x in a}) == 3 and all(len(set(x)) == 8 for x in a)


# ------------------------------------------------------------------------- draw fraction and parallel modes


@pytest.mark.parametrize(
    ("fraction", "examples", "batches", "sizes"),
    [(0.25, 24, 3, [8, 8, 8]), (0.3, 29, 4, [8, 8, 8, 5]), (1.0, 96, 12, [8] * 12), (0.001, 1, 1, [1])],
    ids=["quarter", "uneven", "all", "tiny"],
)
def test_draw_fraction_gives_exact_batch_counts(model_task, fraction, examples, batches, sizes):
    from qbert_hessian.sensitivity import _draw_batches, batches_in_draw, draw_size

    _, task = model_task
    cfg = SensitivityConfig(draws=2, batch_size=8, draw_fraction=fraction)
    assert len(task.train) == 96
    assert draw_size(96, cfg) == examples and batches_in_draw(96, cfg) == batches
    draws = draw_indices(96, cfg)
    assert [len(d) for d in draws] == [examples, examples] and all(len(set(d)) == examples for d in draws)
    assert [len(b["labels"]) for b in _draw_batches(task, draws[0], 8)] == sizes


def test_draw_fraction_hessian_is_the_dense_hessian_of_the_union(model_task):
    """A draw of 30% of the data is 4 batches; its operator (and its top eigenvalue) is the Hessian of the loss
    of all 29 examples as one batch (the token-type table: small enough for a dense Hessian in a second)."""
    import torch

    from qbert_hessian.hessian import vec
    from qbert_hessian.hessian.hvp import BlockHessian, curvature_mode, grads_enabled
    from qbert_hessian.models import BlockMap
    from qbert_hessian.sensitivity import _draw_batches
    from tests.helpers import dense_block_hessian

    model, task = model_task
    cfg = SensitivityConfig(draws=1, batch_size=8, draw_fraction=0.3, tol=1e-7, max_iters=200, trace="none")
    (idx,) = draw_indices(len(task.train), cfg)
    params = BlockMap(model).parameters("embeddings.token_type")
    union = task.batch("train", idx)
    with curvature_mode(model), grads_enabled(params):
        H = dense_block_hessian(model, params, union)
        hvp = BlockHessian(model, params, _draw_batches(task, idx, 8))
        v = vec.randn_like(params, torch.Generator().manual_seed(0))
        assert len(hvp.grads) >= 4  # the four batches (or their length buckets)
        assert torch.allclose(vec.flatten(hvp(v)), H @ vec.flatten(v), rtol=1e-4, atol=1e-6)
        assert hvp.loss == pytest.approx(float(model(**union).loss.detach()), rel=1e-5)
    eig = torch.linalg.eigvalsh(H.double())
    top = eig[eig.abs().argmax()].item()
    report = estimate_sensitivity(model, task, cfg, blocks=["embeddings.token_type"], progress=False)
    assert report.block("embeddings.token_type").eigenvalues[0] == pytest.approx(top, rel=1e-4)
    assert report.config["draw_fraction"] == 0.3 and len(report.draws[0]["indices"]) == 29
    from qbert_hessian.report import sensitivity_markdown

    assert "1 draws of 0.3 of the training split (29 examples, in batches of 8)" in sensitivity_markdown(report)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"draw_fraction": 0.0}, r"draw_fraction must lie in \(0, 1\]"),
        ({"draw_fraction": 1.5}, r"draw_fraction must lie in \(0, 1\]"),
        ({"draw_fraction": float("nan")}, r"draw_fraction must lie in \(0, 1\]"),
        ({"draw_fraction": True}, r"draw_fraction must lie in \(0, 1\]"),
        ({"draw_fraction": 0.1, "batches_per_draw": 2}, "draw_fraction or SensitivityConfig.batches_per_draw, not"),
        ({"parallel": "ranks"}, "unknown parallel mode 'ranks'; choose one of auto, data, blocks"),
    ],
    ids=["zero", "above-one", "nan", "bool", "both", "parallel"],
)
def test_sensitivity_config_refuses_bad_draws_and_modes(kwargs, message):
    with pytest.raises(QBHError, match=message):
        SensitivityConfig(**kwargs)


def test_the_protocol_leaves_out_how_ranks_share_the_work():
    base = SensitivityConfig()
    assert "parallel" not in base.protocol() and "draw_fraction" not in base.protocol()
    assert base.protocol() == SensitivityConfig(parallel="blocks").protocol()
    assert base.protocol() == SensitivityConfig(reuse_memory=False, shared_graph=False).protocol()
    assert SensitivityConfig(draw_fraction=0.1).protocol()["draw_fraction"] == 0.1
    assert SensitivityConfig.from_dict(SensitivityConfig(parallel="data").to_dict()).parallel.value == "data"
    # Hutchinson's traces (the default) leave the protocol as it was before trace_method existed: caches still hold.
    assert "trace_method" not in base.protocol()
    assert SensitivityConfig(trace_method="hutchpp", trace_samples=6).protocol()["trace_method"] == "hutchpp"


def test_resume_refuses_another_draw_fraction(model_task):
    model, task = model_task
    cfg = dataclasses.replace(FAST, draws=1, draw_fraction=0.25, trace="none")
    report = estimate_sensitivity(model, task, cfg, blocks=["encoder.1"], progress=False)
    with pytest.raises(QBHError, match="cannot resume.*draw_fraction 0.25 vs None"):
        estimate_sensitivity(
            model, task, dataclasses.replace(cfg, draw_fraction=None), blocks=["encoder.1"], resume=report
        )


@pytest.mark.parametrize(
    ("parallel", "batches", "blocks", "world", "mode"),
    [
        ("auto", 1, 3, 1, "data"),
        ("auto", 2, 3, 2, "data"),
        ("auto", 1, 3, 2, "blocks"),
        ("blocks", 4, 2, 2, "blocks"),
        ("data", 2, 1, 2, "data"),
    ],
)
def test_parallel_mode_resolves_auto(parallel, batches, blocks, world, mode):
    from qbert_hessian.sensitivity import parallel_mode

    cfg = SensitivityConfig(batch_size=8, batches_per_draw=batches, parallel=parallel)
    assert parallel_mode(cfg, 96, blocks, world).value == mode


@pytest.mark.parametrize(
    ("parallel", "batches", "blocks", "message"),
    [
        ("data", 1, 3, "a draw has 1 batch"),
        ("blocks", 4, 1, "1 block"),
        ("auto", 1, 1, "1 block"),
    ],
)
def test_parallel_mode_refuses_idle_ranks(parallel, batches, blocks, message):
    from qbert_hessian.sensitivity import parallel_mode

    cfg = SensitivityConfig(batch_size=8, batches_per_draw=batches, parallel=parallel)
    with pytest.raises(QBHError, match=message):
        parallel_mode(cfg, 96, blocks, 2)
