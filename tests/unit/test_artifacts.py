from __future__ import annotations

import dataclasses
import json

import pytest

from qbert_hessian.artifacts import BlockSensitivity, SensitivityReport, TraceStats, atomic_write, read_json, write_json
from qbert_hessian.config import FinetuneConfig, SensitivityConfig, TraceMethod, TraceMode
from qbert_hessian.errors import QBHError
from qbert_hessian.report import (
    curvature_sign_rows,
    curvature_sign_table,
    plot_curvature_signs,
    sensitivity_csv,
    sensitivity_markdown,
    write_sensitivity,
)


def _report(pending=()):
    blocks = [
        BlockSensitivity(
            "encoder.0",
            100,
            [2.0, 4.0],
            3.0,
            1.4142,
            4.4142,
            [5, 3],
            [True, True],
            1.0,
            trace=TraceStats(50.0, 2.0, 8),
            normalized_trace=0.5,
        ),
        BlockSensitivity("embeddings", 300, [-1.0, -3.0], -2.0, 1.4142, 3.4142, [9, 9], [True, False], 2.0),
    ]
    return SensitivityReport(
        {"name": "m", "family": "bert", "num_layers": 2, "num_heads": 2, "num_params": 400},
        "sst2",
        SensitivityConfig(draws=2).to_dict(),
        [{"draw": 0}],
        blocks,
        list(pending),
    )


def test_report_round_trips(tmp_path):
    r = _report(pending=["encoder.1"])
    r.save(tmp_path / "s.json")
    back = SensitivityReport.load(tmp_path / "s.json")
    assert back.to_dict() == r.to_dict() and not back.complete
    assert json.loads((tmp_path / "s.json").read_text())["schema"] == "qbert_hessian.sensitivity/1"


def test_trace_stats_name_their_estimator(tmp_path):
    r = _report()
    r.blocks[1].trace = TraceStats(7.0, 0.5, 8, method="hutchpp", products=24)
    r.save(tmp_path / "s.json")
    back = SensitivityReport.load(tmp_path / "s.json")
    assert back.blocks[1].trace == TraceStats(7.0, 0.5, 8, "hutchpp", 24)
    # A report from before the estimator was recorded: Hutchinson's, one product per probe.
    data = json.loads((tmp_path / "s.json").read_text())
    data["blocks"][0]["trace"] = {"mean": 50.0, "stderr": 2.0, "samples": 8}
    old = SensitivityReport.from_dict(data)
    assert old.blocks[0].trace == TraceStats(50.0, 2.0, 8, "hutchinson", 8)
    assert "(hutchinson, 4 products per draw)" in sensitivity_markdown(r)


def test_a_report_naming_blocks_its_model_lacks_is_refused(tmp_path):
    r = _report(pending=["encoder.1"])
    data = r.to_dict()
    data["model"]["num_layers"] = 1
    write_json(tmp_path / "s.json", data)
    with pytest.raises(QBHError, match="block 'encoder.1' does not exist; this model has encoder.0..encoder.0"):
        SensitivityReport.load(tmp_path / "s.json")


def test_schema_checks(tmp_path):
    write_json(tmp_path / "a.json", {"schema": "qbert_hessian.sensitivity/2"})
    with pytest.raises(QBHError, match="sensitivity/2, this version reads qbert_hessian.sensitivity/1"):
        SensitivityReport.load(tmp_path / "a.json")
    write_json(tmp_path / "b.json", {"schema": "qbert_hessian.plan/1"})
    with pytest.raises(QBHError, match="not a qbert_hessian.sensitivity artifact"):
        read_json(tmp_path / "b.json", "qbert_hessian.sensitivity/1")
    (tmp_path / "c.json").write_text("{oops")
    with pytest.raises(QBHError, match="not valid JSON"):
        read_json(tmp_path / "c.json", "qbert_hessian.sensitivity/1")
    with pytest.raises(QBHError, match="does not exist"):
        read_json(tmp_path / "none.json", "qbert_hessian.sensitivity/1")
    write_json(tmp_path / "d.json", {"schema": "qbert_hessian.sensitivity/1", "model": {}})
    with pytest.raises(QBHError, match="malformed"):
        SensitivityReport.load(tmp_path / "d.json")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    def boom(tmp):
        tmp.write_text("half")
        raise RuntimeError("interrupted")

    (tmp_path / "x.txt").write_text("old")
    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "x.txt", boom)
    assert (tmp_path / "x.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]


def test_report_files(tmp_path):
    r = _report()
    paths = write_sensitivity(r, tmp_path)
    assert sorted(paths) == ["csv", "json", "md", "png"]
    assert (tmp_path / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    md = sensitivity_markdown(r)
    # Ranked by Omega: encoder.0 (4.41) before embeddings (3.41).
    assert md.index("`encoder.0`") < md.index("`embeddings`")
    assert "| 1 | `encoder.0` | 100 |" in md and "1/2" in md
    lines = sensitivity_csv(r).splitlines()
    assert lines[0].startswith("block,num_params,eig_mean") and lines[1].startswith("encoder.0,100,3.0")
    assert "partial" in sensitivity_markdown(_report(pending=["encoder.1"]))


def test_curvature_signs_across_tasks(tmp_path):
    """The saddle table counts the draws whose top eigenvalue is negative and averages the most negative one."""
    a, b = _report(), _report()
    b.blocks[0] = dataclasses.replace(b.blocks[0], eigenvalues=[-2.0, 4.0, -1.0], most_negative=[-3.0, -1.0])
    rows = curvature_sign_rows([a, b], ["SST-2", "SQuAD"])
    assert [(r["task"], r["block"], r["negative_draws"], r["draws"]) for r in rows] == [
        ("SST-2", "encoder.0", 0, 2),
        ("SST-2", "embeddings", 2, 2),
        ("SQuAD", "encoder.0", 2, 3),
        ("SQuAD", "embeddings", 2, 2),
    ]
    assert rows[2]["most_negative"] == -2.0 and rows[0]["most_negative"] is None
    table = curvature_sign_table(rows)
    assert (
        "| SQuAD | encoder.0 | 3 | 1.414 | 2/3 | -2 |" in table
        and "| SST-2 | encoder.0 | 3 | 1.414 | 0/2 | - |" in table
    )
    path = plot_curvature_signs([a, b], ["SST-2", "SQuAD"], tmp_path / "signs.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(QBHError, match="one label per"):
        plot_curvature_signs([a], ["x", "y"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def _configs():
    from qbert_hessian.allocate import AllocConfig, Budget
    from qbert_hessian.config import QATConfig
    from qbert_hessian.landscape import LandscapeConfig

    return [
        SensitivityConfig(),
        SensitivityConfig(trace_method="hutchpp", trace_samples=12),
        FinetuneConfig(),
        AllocConfig(groups="heads", measure="trace"),
        Budget(avg_bits=2.5),
        QATConfig(distill=True, quant_noise=0.1),
        LandscapeConfig(directions="random", dims=1),
    ]


@pytest.mark.parametrize("cfg", _configs(), ids=lambda c: type(c).__name__)
def test_configs_round_trip_and_reject_unknown_keys(cfg):
    cls = type(cfg)
    assert cls.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(QBHError, match="unknown .* key\\(s\\) bogus; valid keys are"):
        cls.from_dict({**cfg.to_dict(), "bogus": 1})


def test_config_validation():
    with pytest.raises(QBHError, match="draws must be a positive number"):
        SensitivityConfig(draws=0)
    with pytest.raises(QBHError, match="unknown trace mode 'full'; choose one of block, shared, none"):
        SensitivityConfig(trace="full")
    assert SensitivityConfig(trace="shared").trace is TraceMode.SHARED
    assert SensitivityConfig(trace_method="hutchpp").trace_method is TraceMethod.HUTCHPP
    with pytest.raises(QBHError, match="unknown trace method 'hutch'; choose one of hutchinson, hutchpp"):
        SensitivityConfig(trace_method="hutch")
    with pytest.raises(QBHError, match="cannot share full-model products; use --trace block"):
        SensitivityConfig(trace_method="hutchpp", trace="shared")
    with pytest.raises(QBHError, match="trace_samples = 3 is too few for Hutch\\+\\+"):
        SensitivityConfig(trace_method="hutchpp", trace_samples=3)
    SensitivityConfig(trace_method="hutchpp", trace_samples=3, trace="none")  # no trace: nothing to refuse
    with pytest.raises(QBHError, match="warmup_ratio"):
        FinetuneConfig(warmup_ratio=1.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        SensitivityConfig().draws = 3  # type: ignore[misc]
