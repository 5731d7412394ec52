"""experiments/table1.py on a small synthetic RESULTS.md: columns found by name (with and without the rounding
column), seeds aggregated to mean ± sample std, a task without a section says so, reruns replace the section;
supplementary sections add their rows after the main section's, scored against their own FP32 row."""

from __future__ import annotations

import importlib.util
import sys
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


def test_rerun_replaces_the_section_at_the_top_and_prefers_the_full_squad_run(table1, tmp_path):
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
    # a preferred section without one of the table's settings (a run stopped part-way) yields to a complete one
    results.write_text(first.rstrip() + "\n\n" + _squad("squad_full_minilm", 0.80, qat_2bit=False) + "\n")
    assert table1.main(argv) == 0
    text = results.read_text()
    assert "SQuAD v1.1: squad_minilm (squad_full_minilm incomplete), run by" in text
    assert _row_of(text, "SQuAD", "FP32")[3] == "62.97"
    # where no section is complete, the preferred one feeds the rows it has, and a row says what it lacks
    results, readme = _write(tmp_path, _sst2(), _squad("squad_full_minilm", 0.80, qat_2bit=False))
    assert table1.main(argv) == 0
    assert _row_of(results.read_text(), "SQuAD", "QAT uniform 2-bit")[2:4] == ["not in `squad_full_minilm`", "-"]
    row = "| SQuAD v1.1 (F1) | 80.00 | -2.00 | -42.28 | not run | not run | -26.72 | not run | - | -9.09 | -1.74 |"
    assert row in readme.read_text()


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
