"""Stochastic Lanczos quadrature against exact spectra; loss landscapes against the Hessian they should show."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from qbert_hessian.errors import QBHError
from qbert_hessian.hessian import vec
from qbert_hessian.hessian.density import slq_density
from qbert_hessian.hessian.hvp import BlockHessian
from qbert_hessian.landscape import Landscape, LandscapeConfig, filter_normalized, loss_landscape
from qbert_hessian.models import BlockMap
from tests.helpers import dense_block_hessian, random_batch


def sym(values, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=g, dtype=torch.float64))
    return Q @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ Q.T


def test_slq_is_a_gauss_quadrature_exact_to_degree_2m_minus_1():
    values = np.linspace(-2.0, 9.0, 40)
    A = sym(values.tolist())
    hvp = lambda v: [A @ v[0]]  # noqa: E731
    params = [torch.zeros(40, dtype=torch.float64)]
    res = slq_density(hvp, params, steps=6, num_probes=1, generator=torch.Generator().manual_seed(0))
    v = vec.rademacher_like(params, torch.Generator().manual_seed(0))[0]
    v = v / v.norm()
    for k in range(0, 12):  # 2m - 1 = 11
        exact = float(v @ torch.linalg.matrix_power(A, k) @ v)
        assert res.moment(k) == pytest.approx(exact, rel=1e-8, abs=1e-8)
    assert sum(res.weights[0]) == pytest.approx(1.0, abs=1e-12)


def test_slq_density_has_unit_mass_and_the_exact_extremes():
    values = [-3.0, -1.0, 0.5, 0.5, 2.0, 4.0, 10.0] + [0.1] * 13
    A = sym(values, seed=2)
    res = slq_density(
        lambda v: [A @ v[0]],
        [torch.zeros(20, dtype=torch.float64)],
        steps=20,
        num_probes=3,
        generator=torch.Generator().manual_seed(1),
    )
    assert res.extremes == pytest.approx((-3.0, 10.0), abs=1e-8)
    assert np.trapezoid(res.density, res.grid) == pytest.approx(1.0, abs=1e-3)
    # the mean over probes of the first moment estimates tr(A)/n
    assert res.moment(1) == pytest.approx(np.mean(values), abs=1.0)


def test_slq_on_a_tiny_bert_block_finds_the_dense_spectrum_ends(micro_bert):
    batch = random_batch(micro_bert.config.vocab_size, num_labels=3)
    params = BlockMap(micro_bert).parameters("encoder.0.query")
    H = dense_block_hessian(micro_bert, params, batch)
    exact = torch.linalg.eigvalsh(H.double())
    res = slq_density(
        BlockHessian(micro_bert, params, [batch]),
        params,
        steps=H.shape[0],
        num_probes=1,
        generator=torch.Generator().manual_seed(0),
    )
    lo, hi = res.extremes
    scale = float(exact.abs().max())
    assert lo == pytest.approx(float(exact[0]), abs=1e-3 * scale)
    assert hi == pytest.approx(float(exact[-1]), abs=1e-3 * scale)


def test_filter_normalized_rows_match_the_weights():
    w = [torch.randn(6, 4) * torch.arange(1.0, 7.0)[:, None], torch.randn(6)]
    d = filter_normalized(w, torch.Generator().manual_seed(0))
    assert torch.allclose(d[0].norm(dim=1), w[0].norm(dim=1), rtol=1e-5)
    assert torch.equal(d[1], torch.zeros(6))


@pytest.fixture(scope="module")
def model_task(tiny_checkpoint, tiny_data):
    from qbert_hessian.models import load_model
    from qbert_hessian.tasks import load_raw_task, tokenize_task

    model, tok = load_model(str(tiny_checkpoint), num_labels=2)
    # Larger weights than the init make the curvature visible above float32 noise.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(0))
    return model, tokenize_task(load_raw_task("sst2", data_dir=tiny_data), tok, max_length=16)


def test_eigen_line_has_the_top_eigenvalue_as_curvature(model_task):
    model, task = model_task
    before = [p.detach().clone() for p in model.parameters()]
    h = 0.05
    cfg = LandscapeConfig(dims=1, grid=3, radius=h, batch_size=16, num_batches=2, max_iters=200, tol=1e-6)
    ls = loss_landscape(model, task, cfg, block="encoder.1.ffn_in", progress=False)
    lam = ls.directions["eigenvalues"][0]
    left, mid, right = ls.loss[0]
    assert mid == pytest.approx(ls.center_loss, abs=1e-7)
    # L(w + a v) = L(w) + a g.v + a^2 lam / 2 + O(a^3): the second difference gives lam.
    assert (left - 2 * mid + right) / h**2 == pytest.approx(lam, rel=0.05)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # weights restored


def test_extreme_plane_has_the_largest_and_smallest_eigenvalues_as_its_curvatures(model_task):
    from qbert_hessian.landscape import _batches

    model, task = model_task
    h = 0.05
    cfg = LandscapeConfig(directions="extreme", grid=3, radius=h, batch_size=16, num_batches=1, max_iters=400, tol=1e-7)
    block = "encoder.1.ffn_in"
    ls = loss_landscape(model, task, cfg, block=block, progress=False)
    params = BlockMap(model).parameters(block)
    model.eval()
    exact = torch.linalg.eigvalsh(dense_block_hessian(model, params, _batches(task, cfg)[0]).double())
    top, bottom = ls.directions["eigenvalues"]
    assert ls.directions["kind"] == "extreme" and float(exact[0]) < 0 < float(exact[-1])
    assert top == pytest.approx(float(exact[-1]), rel=1e-3) and bottom == pytest.approx(float(exact[0]), rel=1e-3)
    z = np.asarray(ls.loss)
    # the plane curves up along the first axis by the largest eigenvalue and down along the second by the smallest
    assert (z[1, 0] - 2 * z[1, 1] + z[1, 2]) / h**2 == pytest.approx(top, rel=0.05)
    assert (z[0, 1] - 2 * z[1, 1] + z[2, 1]) / h**2 == pytest.approx(bottom, rel=0.05)
    line = loss_landscape(model, task, dataclasses.replace(cfg, dims=1), block=block, progress=False)
    assert line.directions["eigenvalues"] == pytest.approx([bottom], rel=1e-6)


def test_two_d_grid_centre_resume_and_settings_check(model_task, tmp_path):
    model, task = model_task
    cfg = LandscapeConfig(directions="random", grid=5, radius=0.3, batch_size=16, num_batches=1)
    rows = []
    full = loss_landscape(model, task, cfg, block="encoder.0", on_row=lambda ls: rows.append(1), progress=False)
    assert len(rows) == 5 and full.complete and len(full.loss) == 5 and len(full.loss[0]) == 5
    assert full.loss[2][2] == pytest.approx(full.center_loss, abs=1e-7)
    partial = Landscape.from_dict(full.to_dict())
    partial.loss[3] = [math.nan] * 5
    partial.loss[4] = [math.nan] * 5
    assert not partial.complete
    partial.save(tmp_path / "l.json")
    resumed = loss_landscape(
        model, task, cfg, block="encoder.0", resume=Landscape.load(tmp_path / "l.json"), progress=False
    )
    assert np.allclose(resumed.loss, full.loss, atol=1e-7)
    with pytest.raises(QBHError, match="cannot resume"):
        loss_landscape(model, task, LandscapeConfig(grid=3), block="encoder.0", resume=full, progress=False)


def test_gradient_directions_are_orthogonal(model_task):
    model, task = model_task
    ls = loss_landscape(
        model,
        task,
        LandscapeConfig(directions="gradient", grid=3, radius=0.01, batch_size=16, num_batches=1),
        block="encoder.0.query",
        progress=False,
    )
    assert ls.directions["kind"] == "gradient" and ls.directions["gradient_norm"] > 0
    # moving along the (filter-normalised) gradient raises the loss on one side and lowers it on the other
    row = ls.loss[1]
    assert row[0] < row[1] < row[2]


def test_landscape_config_checks():
    with pytest.raises(QBHError, match="dims must be 1 or 2"):
        LandscapeConfig(dims=3)
    with pytest.raises(QBHError, match="unknown direction kind 'hessian'"):
        LandscapeConfig(directions="hessian")


def test_smooth_alike_gives_every_density_one_kernel_width():
    from qbert_hessian.hessian.density import smooth_alike

    narrow, wide = sym([0.0, 0.1, 0.2, 0.3]), sym([-5.0, 0.0, 1.0, 20.0], seed=1)
    res = [
        slq_density(
            lambda v, A=A: [A @ v[0]],
            [torch.zeros(4, dtype=torch.float64)],
            steps=4,
            generator=torch.Generator().manual_seed(0),
        )
        for A in (narrow, wide)
    ]
    assert res[0].sigma != res[1].sigma
    smooth_alike(res)
    assert res[0].sigma == res[1].sigma == pytest.approx(25.0 / 200)
    for r in res:
        assert np.trapezoid(r.density, r.grid) == pytest.approx(1.0, abs=1e-3)
