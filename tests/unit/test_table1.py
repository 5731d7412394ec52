"""experiments/table1.py on a small synthetic RESULTS.md: columns found by name (with and without the rounding
column), seeds aggregated to mean ± sample std, a task without a section says so, reruns replace the section;
supplementary sections add their rows after the main section's, scored against their own FP32 row."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from qbert_hessian.report import results_table

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "table1.py"
TITLE = "# Experiments: measured\n\nEach section below is written by the command it names.\n"
MACHINE = "Machine: x86_64 CPU, 2 threads, torch 2.13.0+cpu, no GPU. Total wall time: 1 min."


@pytest.fixture(scope="module")
def table1():
    spec = importlib.util.spec_from_file_location("table1", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["table1"] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules["table1"]


def _row(method, plan, score, *, w="2", e="8", seed=0, seen=0):
    return {
        "method": method,
        "plan": plan,
        "w_bits": w,
        "e_bits": e,
        "a_bits": "8",
        "groups": "128",
        "rounding": "nearest",
        "family": "classification",
        "accuracy": score,
        "macro_f1": score - 0.001,
        "mib": 15.0,
        "compression": 5.5,
        "encoder_compression": 12.76 if "mixed" in plan else 15.94,
        "embedding_compression": 3.98,
        "examples_seen": seen,
        "seed": seed,
    }


def _section(name: str, table: str) -> str:
    command = f"Command: `qbert-hessian run experiments/{name}.toml` (folder `runs/{name}`)."
    return (
        f"<!-- begin {name} -->\n## {name}\n\n{command}\n{MACHINE}\n\n{table}\n\nWall times: 1 s.\n<!-- end {name} -->"
    )


def _sst2(seeds: tuple[int, int, int] = (0, 1, 2)) -> str:
    """The current format (a rounding column), three QAT seeds of mixed 2/3; each seed's direct row repeats."""
    fp32 = _row("FP32 baseline", "-", 0.8956, w="32", e="32", seen=134698)
    fp32.update(a_bits="32", groups="-", rounding="-", compression=1.0, encoder_compression=1.0)
    rows = [fp32, _row("direct, uniform", "uniform-8", 0.8922, w="8")]
    rows += [_row("direct, uniform", "uniform-2", 0.8383), _row("QAT, uniform", "uniform-2", 0.8647, seen=8000)]
    for suffix, seed, score in zip(("", "-seed1", "-seed2"), seeds, (0.8911, 0.8761, 0.8956), strict=True):
        rows.append(_row("direct, mixed (milp)", f"mixed-2-3{suffix}", 0.8842, w="2/3 (avg 2.50)"))
        rows.append(_row("QAT, mixed (milp)", f"mixed-2-3{suffix}", score, w="2/3 (avg 2.50)", seen=8000, seed=seed))
    # an ablation of the same plan family must not be mistaken for a seed of mixed-2-3
    rows.append(_row("QAT (learned steps), mixed (milp)", "mixed-2-3-lsq", 0.99, w="2/3 (avg 2.50)", seen=8000))
    rows.append(_row("QAT, uniform", "ternarybert-2-2-8", 0.8555, e="2", seen=8000))
    return _section("sst2_minilm", results_table(rows))


def _squad(name: str, fp32: float, qat_2bit: bool = True) -> str:
    """The older format: no rounding column, and the columns in another order than today's."""
    head = "| plan | method | F1 | EM | w-bits | e-bits | a-bits | groups | seed | examples seen | size MiB | "
    head += "compression | encoder comp. | embedding comp. |"
    rows = [
        ("-", "FP32 baseline", fp32, "32", "32", 13400, "1.00x", "1.00x"),
        ("uniform-8", "direct, uniform", fp32 - 0.02, "8", "8", 0, "3.97x", "4.00x"),
        ("uniform-2", "direct, uniform", 0.1473, "2", "8", 0, "6.10x", "15.94x"),
        ("uniform-2", "QAT, uniform", 0.3579, "2", "8", 2816, "6.10x", "15.94x"),
        ("mixed-2-3", "direct, mixed (milp)", 0.3772, "2/3 (avg 2.50)", "8", 0, "5.84x", "12.76x"),
        ("mixed-2-3", "QAT, mixed (milp)", 0.5328, "2/3 (avg 2.50)", "8", 2816, "5.84x", "12.76x"),
    ]
    lines = [head, "|---|---|" + "---:|" * 12]
    for plan, method, f1, w, e, seen, comp, enc in rows[:3] + rows[4 - qat_2bit :]:
        lines.append(
            f"| {plan} | {method} | {f1:.4f} | {f1 - 0.1:.4f} | {w} | {e} | 8 | 128 | 0 | {seen:,} | 14.11 | "
            f"{comp} | {enc} | 3.98x |"
        )
    return _section(name, "\n".join(lines))


def _write(tmp_path: Path, *sections: str) -> tuple[Path, Path]:
    results = tmp_path / "RESULTS.md"
    results.write_text(TITLE + "\n" + "\n\n".join(sections) + "\n")
    readme = tmp_path / "README.md"
    readme.write_text("# tool\n\n## Compression, measured\n\n<!-- begin table1 -->\n<!-- end table1 -->\n\nMore.\n")
    return results, readme


def _row_of(text: str, task: str, setting: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 2 and cells[0].startswith(task) and cells[1] == setting:
            return cells
    raise AssertionError(f"no row {task} / {setting} in:\n{text}")


def test_columns_by_name_seeds_aggregated_and_missing_tasks_say_so(table1, tmp_path):
    results, readme = _write(tmp_path, _sst2(), _squad("squad_minilm", 0.6297))
    assert table1.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = results.read_text()
    # SST-2: three QAT seeds -> mean 88.76, sample std 1.02 (not the population std 0.83); delta of the mean
    mixed = _row_of(text, "SST-2", "QAT mixed 2/3")
    assert mixed[3] == "88.76 ± 1.02" and mixed[4] == "-0.80"
    assert mixed[-2].startswith("n=3: 0, 1, 2") and mixed[-3] == "8,000" and mixed[-1] == "sst2_minilm"
    assert mixed[2] == "2/3 (avg 2.50) / 8 / 8" and mixed[9] == "12.76x"
    # Q-BERT's MP 2/3 beside it, its delta to Q-BERT's own baseline (92.08 - 93.00)
    assert mixed[5].startswith("92.08") and mixed[6] == "-0.92"
    # the direct row repeated under each seed's plan name is one measurement
    direct = _row_of(text, "SST-2", "direct mixed 2/3")
    assert direct[3] == "88.42" and direct[-2] == "n=1: 0"
    assert _row_of(text, "SST-2", "QAT 2-2-8 (TernaryBERT's widths)")[3] == "85.55"
    # SQuAD from the older table (no rounding column, other column order): F1 read by name, not EM
    squad = _row_of(text, "SQuAD", "QAT mixed 2/3")
    assert squad[3] == "53.28" and squad[4] == "-9.69" and squad[-3] == "2,816" and squad[11] == "5.84x"
    assert "SQuAD v1.1: squad_minilm (squad_full_minilm not written yet)" in text
    # no section for MNLI or CoNLL-03: one row each, no numbers
    for task, name in (("MNLI-m", "mnli_minilm"), ("CoNLL-03", "conll03_minilm")):
        rows = [line for line in text.splitlines() if line.startswith(f"| {task} ")]
        assert rows == [
            f"| {task} ({'accuracy' if task == 'MNLI-m' else 'entity F1'}) | not run yet (no `{name}` "
            "section) |" + " - |" * 13
        ]
    assert "python experiments/table1.py" in text and "x86_64 CPU, 2 threads" in text
    short = readme.read_text()
    assert "| SST-2 (accuracy) | 89.56 | -0.34 |" in short and "-0.80 (± 1.02, n=3) | not run | - |" in short
    assert "| MNLI-m (accuracy) | not run yet |" in short and short.endswith("\n\nMore.\n")


def test_rerun_replaces_the_section_at_the_top_and_prefers_the_squad_run_on_its_training_split(table1, tmp_path):
    results, readme = _write(tmp_path, _sst2(), _squad("squad_minilm", 0.6297))
    argv = ["--results", str(results), "--readme", str(readme)]
    assert table1.main(argv) == 0
    first = results.read_text()
    assert first.index("<!-- begin table1 -->") < first.index("<!-- begin sst2_minilm -->")
    assert first.startswith(TITLE + "\n<!-- begin table1 -->")
    assert table1.main(argv) == 0
    assert results.read_text() == first and readme.read_text().count("<!-- begin table1 -->") == 1
    # the full-data SQuAD section, once written, feeds the SQuAD rows instead of the local split's
    results.write_text(first.rstrip() + "\n\n" + _squad("squad_full_minilm", 0.80) + "\n")
    assert table1.main(argv) == 0
    text = results.read_text()
    assert text.count("<!-- begin table1 -->") == 1 and "SQuAD v1.1: squad_full_minilm, run by" in text
    assert _row_of(text, "SQuAD", "FP32")[3] == "80.00"
    # the preferred section without one of the table's settings (a run stopped part-way) still feeds the task; the
    # local split's run (another FP32 model) adds a row for that setting only, labelled so, against its own FP32
    results.write_text(first.rstrip() + "\n\n" + _squad("squad_full_minilm", 0.80, qat_2bit=False) + "\n")
    assert table1.main(argv) == 0
    text = results.read_text()
    assert "SQuAD v1.1: squad_full_minilm, run by `qbert-hessian run experiments/squad_full_minilm.toml`, " in text
    assert "supplemented by squad_minilm (run by" in text
    assert _rows_of(text, "SQuAD") == [
        ("FP32", "squad_full_minilm"),
        ("direct 8-bit", "squad_full_minilm"),
        ("direct uniform 2-bit", "squad_full_minilm"),
        ("QAT uniform 2-bit", "squad_full_minilm"),  # not in it
        ("QAT uniform 2-bit, local split", "squad_minilm"),
        ("direct mixed 2/3", "squad_full_minilm"),
        ("QAT mixed 2/3", "squad_full_minilm"),
    ]
    assert _row_of(text, "SQuAD", "FP32")[3] == "80.00"
    assert _row_of(text, "SQuAD", "QAT uniform 2-bit")[2:4] == ["not in `squad_full_minilm`", "-"]
    assert _row_of(text, "SQuAD", "QAT uniform 2-bit, local split")[3:5] == ["35.79", "-27.18"]
    row = "| SQuAD v1.1 (F1) | 80.00 | -2.00 | -42.28 | not run | -27.18 (local split) | -26.72 | not run | - |"
    assert row in readme.read_text()
    # where no section is complete, the preferred one feeds the rows it has, and a row says what it lacks
    results, readme = _write(tmp_path, _sst2(), _squad("squad_full_minilm", 0.80, qat_2bit=False))
    assert table1.main(argv) == 0
    assert _row_of(results.read_text(), "SQuAD", "QAT uniform 2-bit")[2:4] == ["not in `squad_full_minilm`", "-"]
    row = "| SQuAD v1.1 (F1) | 80.00 | -2.00 | -42.28 | not run | not run | -26.72 | not run | - | -9.09 | -1.74 |"
    assert row in readme.read_text()


def test_a_rerun_on_squads_training_split_fills_its_qat_rows_before_the_local_split(table1, tmp_path):
    # squad_full_minilm has no QAT row; its rerun (its own FP32, 78.00) has both, from nearest's codes: they stand
    # against that FP32, its direct rows are not repeated, and the local split's run adds nothing
    full = "\n".join(line for line in _squad("squad_full_minilm", 0.80).splitlines() if "| QAT, " not in line)
    rerun = _squad("squad_full_minilm_nearest", 0.78)
    results, readme = _write(tmp_path, _sst2(), _squad("squad_minilm", 0.6297), full, rerun)
    assert table1.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = results.read_text()
    assert _rows_of(text, "SQuAD") == [
        ("FP32", "squad_full_minilm"),
        ("direct 8-bit", "squad_full_minilm"),
        ("direct uniform 2-bit", "squad_full_minilm"),
        ("QAT uniform 2-bit", "squad_full_minilm_nearest"),
        ("direct mixed 2/3", "squad_full_minilm"),
        ("QAT mixed 2/3", "squad_full_minilm_nearest"),
    ]
    assert _row_of(text, "SQuAD", "QAT mixed 2/3")[3:5] == ["53.28", "-24.72"]
    assert "supplemented by squad_full_minilm_nearest (run by" in text and "squad_minilm (run by" in text
    row = "| SQuAD v1.1 (F1) | 80.00 | -2.00 | -42.28 | not run | -42.21 | -24.72 | not run | - |"
    assert row in readme.read_text()
    # a rerun stopped before its uniform 2-bit QAT: the local split's run fills that row alone
    part = "\n".join(line for line in rerun.splitlines() if "| QAT, uniform" not in line)
    results, readme = _write(tmp_path, _sst2(), _squad("squad_minilm", 0.6297), full, part)
    assert table1.main(["--results", str(results), "--readme", str(readme)]) == 0
    rows = _rows_of(results.read_text(), "SQuAD")
    assert rows[3:5] == [("QAT uniform 2-bit", "squad_full_minilm"), ("QAT uniform 2-bit, local split", "squad_minilm")]
    assert rows[-1] == ("QAT mixed 2/3", "squad_full_minilm_nearest")
    assert "| -27.18 (local split) | -24.72 |" in readme.read_text()


def test_bad_inputs_exit_2_and_write_nothing(table1, tmp_path, capsys):
    # two rows of one plan at one seed that disagree: which is the measurement is not knowable
    results, readme = _write(tmp_path, _sst2(seeds=(0, 1, 1)))
    before = results.read_text()
    assert table1.main(["--results", str(results), "--readme", str(readme)]) == 2
    assert "mixed-2-3 at seed" in capsys.readouterr().err and results.read_text() == before
    # a README without the markers: nothing is written anywhere
    results, readme = _write(tmp_path, _sst2())
    readme.write_text("# tool\n")
    before = results.read_text()
    assert table1.main(["--results", str(results), "--readme", str(readme)]) == 2
    assert "markers" in capsys.readouterr().err and results.read_text() == before
    # a section without its FP32 row: no delta can be computed
    results, readme = _write(tmp_path, _squad("squad_minilm", 0.6297).replace("| FP32 baseline |", "| FP32 |"))
    assert table1.main(["--results", str(results), "--readme", str(readme)]) == 2
    assert "0 FP32 baseline rows" in capsys.readouterr().err


GPTQ = "gptq (128 seq, damp 0.01)"
W23 = "2/3 (avg 2.50)"
SEEDS = (("", 0), ("-seed1", 1), ("-seed2", 2))


def _fp32(score: float, seed: int = 0) -> dict:
    fp32 = _row("FP32 baseline", "-", score, w="32", e="32", seen=134698, seed=seed)
    fp32.update(a_bits="32", groups="-", rounding="-", compression=1.0, encoder_compression=1.0)
    return fp32


def _gptq(method: str, plan: str, score: float, **kw) -> dict:
    return {**_row(method, plan, score, **kw), "rounding": GPTQ}


def _sst2_gptq(fp32: tuple[dict, ...] = (_fp32(0.9000),)) -> str:
    """sst2_minilm_gptq with its own FP32 (90.00, not the main section's 89.56): 8-bit and nearest's mixed 2/3 again
    (other scores than the main section's, so a repeat would show), GPTQ's mixed 2/3 direct and at 3 QAT seeds."""
    rows = [
        *fp32,
        _row("direct, uniform", "uniform-8", 0.8900, w="8"),
        _gptq("direct, uniform", "uniform-8-gptq", 0.89, w="8"),
    ]
    for (suffix, seed), score in zip(SEEDS, (0.8800, 0.8900, 0.9000), strict=True):
        rows.append(_row("direct, mixed (milp)", f"mixed-2-3{suffix}", 0.8700, w=W23))
        rows.append(_row("QAT, mixed (milp)", f"mixed-2-3{suffix}", 0.8500, w=W23, seen=8000, seed=seed))
        rows.append(_gptq("direct, mixed (milp)", f"mixed-2-3-gptq{suffix}", 0.8850, w=W23))
        rows.append(_gptq("QAT, mixed (milp)", f"mixed-2-3-gptq{suffix}", score, w=W23, seen=8000, seed=seed))
    return _section("sst2_minilm_gptq", results_table(rows))


def _sst2_full(
    num_qat: int = 5, fp32: tuple[dict, ...] = (_fp32(0.9050),), name: str = "sst2_minilm_full", first: int = 0
) -> str:
    """A full-epoch section (``name``) with its own FP32 (90.50): plans from GPTQ's codes, one epoch of all 67,349
    training sentences; of its 5 QAT runs (mixed 2/3 at 3 seeds, uniform 2-bit, 2-2-8) the ``num_qat`` from the
    ``first`` (fewer: a run stopped part-way, or the runs split between two sections)."""
    runs = [
        (f"mixed-2-3-gptq{suffix}", "mixed (milp)", W23, "8", seed, 0.8860, score)
        for (suffix, seed), score in zip(SEEDS, (0.8960, 0.9010, 0.9060), strict=True)
    ]
    runs += [("uniform-2-gptq", "uniform", "2", "8", 0, 0.8600, 0.8800)]
    runs += [("ternarybert-2-2-8-gptq", "uniform", "2", "2", 0, 0.8000, 0.8700)]
    rows = list(fp32)
    for plan, kind, w, e, seed, direct, qat in runs[first : first + num_qat]:
        rows.append(_gptq(f"direct, {kind}", plan, direct, w=w, e=e))
        rows.append(_gptq(f"QAT, {kind}", plan, qat, w=w, e=e, seen=67349, seed=seed))
    return _section(name, results_table(rows))


def _rows_of(text: str, task: str) -> list[tuple[str, str]]:
    """(setting, section) of each row of ``task`` in the long table, in order."""
    table = text[text.index("<!-- begin table1 -->") : text.index("<!-- end table1 -->")]
    cells = ([c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines())
    return [(c[1], c[-1]) for c in cells if len(c) > 2 and c[0].startswith(task)]


def _without_sources(text: str) -> list[str]:
    """The table1 section of a RESULTS.md text, less its Sources line."""
    table = text[text.index("<!-- begin table1 -->") : text.index("<!-- end table1 -->")]
    return [line for line in table.splitlines() if not line.startswith("Sources: ")]


def test_supplements_add_rows_with_their_suffix_against_their_own_fp32(table1, tmp_path):
    # the full epoch's mixed 2/3 seeds in one section, its 2-bit runs in another with its own FP32 (90.00)
    full_2bit = _sst2_full(num_qat=2, first=3, fp32=(_fp32(0.9000),), name="sst2_minilm_full_2bit")
    sections = (_sst2(), _squad("squad_minilm", 0.6297), _sst2_gptq(), _sst2_full(num_qat=3), full_2bit)
    results, readme = _write(tmp_path, *sections)
    assert table1.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = results.read_text()
    full = ", 1 full epoch"
    assert _rows_of(text, "SST-2") == [
        ("FP32", "sst2_minilm"),  # the supplements' FP32 rows are their baselines, not rows
        ("direct 8-bit", "sst2_minilm"),  # sst2_minilm_gptq's 8-bit is not repeated
        ("direct uniform 2-bit", "sst2_minilm"),
        ("QAT uniform 2-bit", "sst2_minilm"),
        ("direct mixed 2/3", "sst2_minilm"),
        ("QAT mixed 2/3", "sst2_minilm"),
        ("QAT mixed 2/3", "sst2_minilm_gptq"),  # its QAT from nearest's codes: another training run, its own row
        ("direct uniform 2-bit, GPTQ rounding", "sst2_minilm_full_2bit"),  # a direct row trains nothing: no suffix
        ("QAT uniform 2-bit from GPTQ's codes" + full, "sst2_minilm_full_2bit"),
        ("direct mixed 2/3, GPTQ rounding", "sst2_minilm_gptq"),  # the first supplement's; the full run's not again
        ("QAT mixed 2/3 from GPTQ's codes", "sst2_minilm_gptq"),
        ("QAT mixed 2/3 from GPTQ's codes" + full, "sst2_minilm_full"),
        ("QAT 2-2-8 (TernaryBERT's widths)", "sst2_minilm"),
        ("QAT 2-2-8 from GPTQ's codes" + full, "sst2_minilm_full_2bit"),
    ]
    # the main section's rows are its own, against its FP32 (89.56)
    assert _row_of(text, "SST-2", "direct mixed 2/3")[3:5] == ["88.42", "-1.14"]
    assert _row_of(text, "SST-2", "QAT mixed 2/3")[3:5] == ["88.76 ± 1.02", "-0.80"]
    again = [line for line in text.splitlines() if "| QAT mixed 2/3 |" in line and line.endswith("sst2_minilm_gptq |")]
    assert len(again) == 1 and "| 85.00 ± 0.00 | -5.00 |" in again[0]  # against its own FP32 (90.00)
    # each supplement's against its own FP32 (90.00, 90.50), its seeds averaged as the main section's are
    direct = _row_of(text, "SST-2", "direct mixed 2/3, GPTQ rounding")
    assert direct[3:5] == ["88.50", "-1.50"] and direct[-2] == "n=1: 0"
    gptq = _row_of(text, "SST-2", "QAT mixed 2/3 from GPTQ's codes")
    assert gptq[3:5] == ["89.00 ± 1.00", "-1.00"] and gptq[-2].startswith("n=3: 0, 1, 2") and gptq[-3] == "8,000"
    epoch = _row_of(text, "SST-2", "QAT mixed 2/3 from GPTQ's codes" + full)
    assert epoch[3:5] == ["90.10 ± 0.50", "-0.40"] and epoch[-2].startswith("n=3") and epoch[-3] == "67,349"
    assert _row_of(text, "SST-2", "QAT uniform 2-bit from GPTQ's codes" + full)[3:5] == ["88.00", "-2.00"]
    assert _row_of(text, "SST-2", "direct uniform 2-bit, GPTQ rounding")[3:5] == ["86.00", "-4.00"]
    ternary = _row_of(text, "SST-2", "QAT 2-2-8 from GPTQ's codes" + full)
    assert ternary[2:5] == ["2 / 2 / 8", "87.00", "-3.00"]
    assert "SST-2: sst2_minilm, run by `qbert-hessian run experiments/sst2_minilm.toml`, supplemented by " in text
    assert "sst2_minilm_gptq (run by `qbert-hessian run experiments/sst2_minilm_gptq.toml`) and " in text
    assert "sst2_minilm_full (run by `qbert-hessian run experiments/sst2_minilm_full.toml`) and " in text
    assert "sst2_minilm_full_2bit (run by `qbert-hessian run experiments/sst2_minilm_full_2bit.toml`); MNLI-m" in text
    # README: the full-data column is the full run's mixed 2/3 from GPTQ's codes; "-" where a task has none
    short = readme.read_text()
    assert "| SST-2 (accuracy) | 89.56 | -0.34 | -1.14 | -1.50 | -3.09 | -0.80 (± 1.02, n=3) | " in short
    assert "| -1.00 (± 1.00, n=3) | -0.40 (± 0.50, n=3) | -8.37 | -0.92 |" in short
    assert (
        "| SQuAD v1.1 (F1) | 62.97 | -2.00 | -25.25 | not run | -27.18 | -9.69 | not run | - | -9.09 | -1.74 |" in short
    )
    assert "SST-2: `sst2_minilm` + `sst2_minilm_gptq` + `sst2_minilm_full` + `sst2_minilm_full_2bit`, SQuAD" in short


def test_a_supplement_stopped_part_way_adds_what_it_has(table1, tmp_path):
    # the full run stopped after its first QAT plan; no sst2_minilm_gptq section; the main section lacks QAT 2-bit
    main = "\n".join(line for line in _sst2().splitlines() if "| QAT, uniform | uniform-2 |" not in line)
    gptq = _sst2_gptq().replace("| direct, mixed (milp) | mixed-2-3 |", "| direct, uniform | uniform-2 |", 1)
    gptq = gptq.replace("| QAT, mixed (milp) | mixed-2-3 |", "| QAT, uniform | uniform-2 |", 1)
    results, readme = _write(tmp_path, main, _sst2_full(num_qat=1))
    assert table1.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = results.read_text()
    assert _rows_of(text, "SST-2")[5:] == [
        ("QAT mixed 2/3", "sst2_minilm"),
        ("direct mixed 2/3, GPTQ rounding", "sst2_minilm_full"),
        ("QAT mixed 2/3 from GPTQ's codes, 1 full epoch", "sst2_minilm_full"),
        ("QAT 2-2-8 (TernaryBERT's widths)", "sst2_minilm"),
    ]
    assert _row_of(text, "SST-2", "QAT uniform 2-bit")[2:4] == ["not in `sst2_minilm`", "-"]
    epoch = _row_of(text, "SST-2", "QAT mixed 2/3 from GPTQ's codes, 1 full epoch")
    assert epoch[3:5] == ["89.60", "-0.90"] and epoch[-2] == "n=1: 0"
    assert "| not run | -0.90 | -8.37 | -0.92 |" in readme.read_text()
    # a supplement that has a setting the main section lacks, under the same label, fills that row in place
    results, readme = _write(tmp_path, main, gptq)
    assert table1.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = results.read_text()
    assert _rows_of(text, "SST-2")[3] == ("QAT uniform 2-bit", "sst2_minilm_gptq")
    assert _row_of(text, "SST-2", "QAT uniform 2-bit")[3:5] == ["85.00", "-5.00"]


def test_absent_or_empty_supplements_change_nothing(table1, tmp_path, monkeypatch):
    sections = (_sst2(), _squad("squad_minilm", 0.6297))
    argv = ["--results", str(tmp_path / "RESULTS.md"), "--readme", str(tmp_path / "README.md")]
    _write(tmp_path, *sections)
    assert table1.main(argv) == 0
    declared = (tmp_path / "RESULTS.md").read_text(), (tmp_path / "README.md").read_text()
    # a supplement holding only its FP32 row (a run just started) adds no row; only the sources name it
    _write(tmp_path, *sections, _sst2_full(num_qat=0))
    assert table1.main(argv) == 0
    started = (tmp_path / "RESULTS.md").read_text()
    assert "supplemented by sst2_minilm_full" in started
    assert _without_sources(started) == _without_sources(declared[0])
    # the same main sections without any supplement declared: byte for byte what they give with them declared
    assert any(task.supplements for task in table1.TASKS)
    monkeypatch.setattr(table1, "TASKS", tuple(replace(task, supplements=()) for task in table1.TASKS))
    _write(tmp_path, *sections)
    assert table1.main(argv) == 0
    assert ((tmp_path / "RESULTS.md").read_text(), (tmp_path / "README.md").read_text()) == declared


@pytest.mark.parametrize("section", ["sst2_minilm_gptq", "sst2_minilm_full"])
@pytest.mark.parametrize("fp32", [(), (_fp32(0.9000), _fp32(0.9050, seed=1))], ids=["no-fp32", "two-fp32"])
def test_a_supplement_needs_exactly_one_fp32_row(table1, tmp_path, capsys, section, fp32):
    bad = _sst2_gptq(fp32=fp32) if section == "sst2_minilm_gptq" else _sst2_full(fp32=fp32)
    results, readme = _write(tmp_path, _sst2(), bad)
    before = results.read_text(), readme.read_text()
    assert table1.main(["--results", str(results), "--readme", str(readme)]) == 2
    assert f"section '{section}' has {len(fp32)} FP32 baseline rows" in capsys.readouterr().err
    assert (results.read_text(), readme.read_text()) == before
