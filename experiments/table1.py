"""Q-BERT's Table 1 for this toolkit, built from the measured sections of experiments/RESULTS.md.

python experiments/table1.py      # rewrites the table1 section of experiments/RESULTS.md and of README.md

Per task (SST-2, MNLI-m, CoNLL-03, SQuAD): FP32, direct 8-bit, uniform 2-bit and mixed 2/3 (direct and after QAT;
uniform 2-bit and mixed 2/3 started from GPTQ's codes and TernaryBERT's 2-2-8 where a section has them), beside
Q-BERT's and TernaryBERT's published BERT-base numbers and their deltas to their own baselines. Ours are read from
each section's results table by its column names, never from a run folder: the sections are the written record of
each run (their run folders need not exist here). Where a setting ran at several seeds (plans named
``NAME-seedN``), ours is the mean and the sample standard deviation over the seeds.

A task's main section is the first of :attr:`Task.sections` that exists (a run stopped part-way included: a
required setting it lacks gets a row saying so); a task with none gets one row saying so. Its supplementary
sections (:attr:`Task.supplements`: other runs of the task, each with its own FP32 row, e.g. one that trains on
the full training split) add rows: for each setting, after the main section's row, every supplementary section
that exists and has that setting adds its row, a QAT row labelled with the supplement's suffix (", 1 full
epoch"). A QAT setting that two sections share has a row from each (two training runs, each against its own
FP32); a direct setting that two sections share is one row, the first's (a direct row trains nothing). A
supplement of another model (``other_model``: SQuAD trained on the local split) adds rows only for the settings the
main section and the supplements before it lack, every one of them labelled with its suffix, and stands in README's
short table where they have no row, marked with that suffix. Every delta is
against the FP32 row of the section the row comes from, named in the table's last column. Theirs are in
:data:`PUBLISHED`, each with where it was checked.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from qbert_hessian.errors import QBHError

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
README = HERE.parent / "README.md"
SECTION = "table1"


def _write_results():
    """experiments/write_results.py, whose ``replace_section`` writes every section of RESULTS.md."""
    spec = importlib.util.spec_from_file_location("write_results", HERE / "write_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Supplement:
    """A section that adds rows to a task's main section: another run of the task, scored against its own FP32
    row. ``suffix`` is appended to the labels of its QAT rows (what sets its training apart, e.g. ", 1 full
    epoch"; "" for a run that trains as the main section does); its direct rows keep the setting's label.

    ``other_model``: a run of another FP32 model (``suffix`` says which): it adds rows only for the settings the
    main section and the supplements before it lack, each labelled with ``suffix`` (its direct rows too: they
    measure another model), and README's short table shows them where those have none, marked with ``suffix``."""

    section: str
    suffix: str
    other_model: bool = False

    @property
    def mark(self) -> str:
        """How README's short table marks a cell this supplement stands in for: " (local split)"."""
        return f" ({self.suffix.removeprefix(', ')})"


@dataclass(frozen=True)
class Task:
    """One task of the table: its score column in the sections' tables, the sections that can feed it, in order
    of preference (the first that exists is its main section), and the sections that supplement the main one, in
    the order their rows follow it (a supplement that is the main section adds nothing)."""

    name: str
    metric: str
    sections: tuple[str, ...]
    supplements: tuple[Supplement, ...] = ()


FULL_EPOCH = ", 1 full epoch"  # QAT over every sentence of the task's training split once
LOCAL_SPLIT = ", local split"  # SQuAD's model trained on 11 train articles and half of dev, scored on the other half
LOCAL_MODEL = "another FP32 model: trained on 11 train articles and half of dev, scored on the other half"

TASKS = (
    Task(
        "SST-2",
        "accuracy",
        ("sst2_minilm",),
        (
            Supplement("sst2_minilm_gptq", ""),
            Supplement("sst2_minilm_full", FULL_EPOCH),
            Supplement("sst2_minilm_full_2bit", FULL_EPOCH),
        ),
    ),
    Task("MNLI-m", "accuracy", ("mnli_minilm",)),
    Task("CoNLL-03", "entity F1", ("conll03_minilm",), (Supplement("conll03_minilm_full", FULL_EPOCH),)),
    # trained on SQuAD's train split when that run's section exists (and its rerun with QAT from nearest's codes),
    # the local split's run filling what both lack
    Task(
        "SQuAD v1.1",
        "F1",
        ("squad_full_minilm", "squad_minilm"),
        (Supplement("squad_full_minilm_nearest", ""), Supplement("squad_minilm", LOCAL_SPLIT, other_model=True)),
    ),
)


@dataclass(frozen=True)
class Setting:
    """One row kind: the rows of a section whose method starts with ``stage`` and whose plan, less a ``-seedN``
    suffix, is ``plan``; ``paper`` is the published setting beside it (a key of :data:`PUBLISHED`). A required
    setting the section lacks gets a row saying so; an optional one is left out."""

    label: str
    stage: str
    plan: str
    paper: str | None
    required: bool

    @property
    def trained(self) -> bool:
        """Whether its rows are QAT runs (what a supplement's suffix describes)."""
        return self.stage.startswith("QAT")


SETTINGS = (
    Setting("FP32", "FP32 baseline", "-", "fp32", True),
    Setting("direct 8-bit", "direct,", "uniform-8", "8-bit", True),
    Setting("direct uniform 2-bit", "direct,", "uniform-2", None, True),
    Setting("QAT uniform 2-bit", "QAT,", "uniform-2", "2-bit", True),
    Setting("direct mixed 2/3", "direct,", "mixed-2-3", None, True),
    Setting("QAT mixed 2/3", "QAT,", "mixed-2-3", "mp-2/3", True),
    # the same widths rounded by GPTQ, and QAT started from those codes
    Setting("direct uniform 2-bit, GPTQ rounding", "direct,", "uniform-2-gptq", None, False),
    Setting("QAT uniform 2-bit from GPTQ's codes", "QAT,", "uniform-2-gptq", None, False),
    Setting("direct mixed 2/3, GPTQ rounding", "direct,", "mixed-2-3-gptq", None, False),
    Setting("QAT mixed 2/3 from GPTQ's codes", "QAT,", "mixed-2-3-gptq", None, False),
    Setting("QAT 2-2-8 (TernaryBERT's widths)", "QAT,", "ternarybert-2-2-8", "2-2-8", False),
    Setting("QAT 2-2-8 from GPTQ's codes", "QAT,", "ternarybert-2-2-8-gptq", None, False),
)


@dataclass(frozen=True)
class Published:
    """A published BERT-base score in points. ``source``: a public source seen while building this table that gives
    the same number (``printed``: how it prints it, where it rounds); None when only experiments/README.md quotes
    it (``printed``: how that quotes it)."""

    value: float
    source: str | None
    printed: str = ""

    @property
    def found(self) -> bool:
        return self.source is not None


QBERT_PWC = "Q-BERT's results as Papers with Code lists them (wizwand.com's page of arXiv 1909.05840)"
BINARYBERT = (
    "BinaryBERT's comparison on SQuAD v1.1 and MNLI-m (Bai et al., ACL 2021), as a textbook reprints it (its "
    "Table 5.5), which lists Q-BERT and TernaryBERT to one decimal"
)
QBERT_CODE = "the README of Q-BERT's code (github.com/sIncerass/QBERT): SST-2 dev accuracy 93.00 for its BERT-base"

# (paper, task, setting) -> score. Q-BERT: Shen et al., "Q-BERT: Hessian Based Ultra Low Precision Quantization
# of BERT", AAAI 2020, Table 1 (BERT-base; 8-bit = w8 e8 a8, 2-bit = w2 e8 a8, MP 2/3 = mixed 2/3-bit weights,
# e8 a8). TernaryBERT: Zhang et al., "TernaryBERT: Distillation-aware Ultra-low Bit BERT", EMNLP 2020 (2-2-8:
# 2-bit weights and word embeddings, 8-bit activations). Left out, not verified: Q-BERT's CoNLL-03 8-bit and
# 2-bit rows, its DirectQ rows, MNLI mismatched; TernaryBERT's own MNLI and SQuAD baselines (so no delta there).
# TernaryBERT's MNLI-m is BinaryBERT's 83.5, not the 83.3 experiments/README.md recalls (TernaryBERT reports two
# 2-2-8 variants, TWN and LAT; which one BinaryBERT lists was not checked).
PUBLISHED: dict[tuple[str, str, str], Published] = {
    ("Q-BERT", "SST-2", "fp32"): Published(93.00, QBERT_CODE),
    ("Q-BERT", "SST-2", "8-bit"): Published(92.88, QBERT_PWC),
    ("Q-BERT", "SST-2", "2-bit"): Published(84.63, None, "84.6"),
    ("Q-BERT", "SST-2", "mp-2/3"): Published(92.08, None),
    ("Q-BERT", "MNLI-m", "fp32"): Published(84.00, None),
    ("Q-BERT", "MNLI-m", "8-bit"): Published(83.91, QBERT_PWC),
    ("Q-BERT", "MNLI-m", "2-bit"): Published(76.56, BINARYBERT, "76.6"),
    ("Q-BERT", "MNLI-m", "mp-2/3"): Published(81.75, BINARYBERT, "81.8"),
    ("Q-BERT", "CoNLL-03", "fp32"): Published(95.00, None, "95.0"),
    ("Q-BERT", "CoNLL-03", "mp-2/3"): Published(94.37, None, "a 0.6 loss"),
    ("Q-BERT", "SQuAD v1.1", "fp32"): Published(88.69, None, "about 88.7"),
    ("Q-BERT", "SQuAD v1.1", "8-bit"): Published(88.47, QBERT_PWC),
    ("Q-BERT", "SQuAD v1.1", "2-bit"): Published(79.60, BINARYBERT, "79.6"),
    ("Q-BERT", "SQuAD v1.1", "mp-2/3"): Published(86.95, BINARYBERT, "87.0"),
    ("TernaryBERT", "SST-2", "fp32"): Published(93.1, None),
    ("TernaryBERT", "SST-2", "2-2-8"): Published(92.8, None),
    ("TernaryBERT", "MNLI-m", "2-2-8"): Published(83.5, BINARYBERT),
    ("TernaryBERT", "SQuAD v1.1", "2-2-8"): Published(87.4, BINARYBERT),
}
PAPERS = ("Q-BERT", "TernaryBERT")

COLUMNS = ("method", "plan", "w-bits", "e-bits", "a-bits", "compression", "encoder comp.", "embedding comp.")
COLUMNS += ("examples seen", "seed")
SEED_SUFFIX = re.compile(r"-seed\d+$")


@dataclass
class Section:
    """One measured section of RESULTS.md: its rows (header name -> cell), command and machine lines."""

    name: str
    rows: list[dict[str, str]]
    command: str
    machine: str


@dataclass
class Row:
    """One row of the table: a setting's score in points over its seeds, the section it comes from (``label``: the
    setting's label with that section's suffix; ``baseline``: that section's FP32 score, what its delta is
    against) and that section's other cells."""

    setting: Setting
    values: list[float]
    seeds: list[str]
    cells: dict[str, str]
    section: str
    label: str
    baseline: float | None = None

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def delta(self) -> float:
        assert self.baseline is not None, "a row's baseline is set by build_task"
        return self.mean - self.baseline

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None


@dataclass
class TaskResult:
    task: Task
    section: Section | None
    rows: list[Row]
    passed_over: tuple[str, ...] = ()  # preferred sections not written yet: "NAME not written yet"
    supplements: tuple[Section, ...] = ()  # the supplementary sections that exist, in the task's order


def parse_sections(text: str) -> dict[str, str]:
    """The body of every ``<!-- begin NAME -->`` ... ``<!-- end NAME -->`` section, by name."""
    pattern = re.compile(r"^<!-- begin (\S+) -->\n(.*?)\n<!-- end \1 -->$", re.S | re.M)
    return {m.group(1): m.group(2) for m in pattern.finditer(text)}


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def parse_rows(name: str, body: str) -> list[dict[str, str]]:
    """The results table of a section (the first markdown table whose header has a ``plan`` and a ``method``
    column), each row as header name -> cell; columns are found by name, wherever they stand."""
    lines = body.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("|"):
            continue
        header = _cells(line)
        if "method" not in header or "plan" not in header:
            continue
        rows = []
        for row_line in lines[i + 2 :]:
            if not row_line.startswith("|"):
                break
            cells = _cells(row_line)
            if len(cells) != len(header):
                raise QBHError(f"section '{name}': a table row has {len(cells)} cells, its header {len(header)}")
            rows.append(dict(zip(header, cells, strict=True)))
        return rows
    raise QBHError(f"section '{name}' has no results table (a header with 'method' and 'plan'); rewrite it")


def parse_section(name: str, body: str) -> Section:
    command = re.search(r"^Command: `([^`]+)`", body, re.M)
    machine = re.search(r"^Machine: (.*?)\.(?:\s|$)", body, re.M)
    return Section(
        name,
        parse_rows(name, body),
        command.group(1) if command else "not recorded",
        machine.group(1) if machine else "not recorded",
    )


def _points(name: str, column: str, cell: str) -> float:
    try:
        return 100.0 * float(cell)
    except ValueError:
        raise QBHError(f"section '{name}': '{cell}' in column '{column}' is not a number") from None


def collect(section: Section, task: Task, setting: Setting) -> Row | None:
    """The rows of ``section`` that are ``setting`` (any seed), one value per distinct seed; None if there are none.
    Rows with the same seed must agree (a direct row repeated under each seed's plan name is one measurement)."""
    missing = [c for c in (task.metric, *COLUMNS) if section.rows and c not in section.rows[0]]
    if missing:
        raise QBHError(f"section '{section.name}' has no column {', '.join(repr(c) for c in missing)}")
    by_seed: dict[str, float] = {}
    first = None
    for r in section.rows:
        if not r["method"].startswith(setting.stage) or SEED_SUFFIX.sub("", r["plan"]) != setting.plan:
            continue
        value = _points(section.name, task.metric, r[task.metric])
        seed = r["seed"]
        if seed in by_seed and abs(by_seed[seed] - value) > 1e-9:
            raise QBHError(
                f"section '{section.name}': two '{r['method']}' rows of plan {setting.plan} at seed {seed} "
                f"differ ({by_seed[seed] / 100:.4f}, {value / 100:.4f}); give each run its own seed"
            )
        by_seed[seed] = value
        first = first or r
    if first is None:
        return None
    return Row(setting, list(by_seed.values()), list(by_seed), first, section.name, setting.label)


def _baseline(task: Task, section: Section) -> float:
    """The section's FP32 score in points: every delta of its rows is against it, so there must be one."""
    row = collect(section, task, SETTINGS[0])
    count = 0 if row is None else len(row.values)
    if row is None or count != 1:
        raise QBHError(
            f"section '{section.name}' has {count} FP32 baseline rows; every delta is against its own section's "
            "FP32 row, so the section needs exactly one"
        )
    return row.mean


def _add(rows: list[Row], row: Row, trained: bool) -> None:
    """Add a supplementary section's ``row``: in place of a row saying the main section lacks that setting; after
    the rows of the same label when it is a QAT row (another training run of the setting, against its own FP32);
    not at all when it is a direct row of a label already measured (direct rows train nothing)."""
    same = [i for i, old in enumerate(rows) if old.label == row.label]
    if not same:
        rows.append(row)
    elif not rows[same[0]].values:
        rows[same[0]] = row
    elif trained:
        rows.insert(same[-1] + 1, row)


def build_task(task: Task, sections: dict[str, str]) -> TaskResult:
    """The rows of ``task``: per setting, the main section's (the first of ``task.sections`` that exists; no rows
    when none does), then each supplementary section's that exists, as the module docstring says."""
    name = next((s for s in task.sections if s in sections), None)
    if name is None:
        return TaskResult(task, None, [])
    section = parse_section(name, sections[name])
    passed_over = tuple(f"{s} not written yet" for s in task.sections[: task.sections.index(name)])
    present = (sup for sup in task.supplements if sup.section in sections and sup.section != name)
    supplements = [(sup, parse_section(sup.section, sections[sup.section])) for sup in present]
    base = _baseline(task, section)
    bases = [_baseline(task, parsed) for _, parsed in supplements]
    rows: list[Row] = []
    for setting in SETTINGS:
        row = collect(section, task, setting)
        if row is None and setting.required:
            row = Row(setting, [], [], {}, name, setting.label)  # a row saying the section does not have it
        if row is not None:
            rows.append(replace(row, baseline=base))
        if setting is SETTINGS[0]:
            continue  # each supplement's FP32 row is the baseline of its own rows, not a row of the table
        for (sup, parsed), sup_base in zip(supplements, bases, strict=True):
            if sup.other_model and any(r.label == setting.label and r.values for r in rows):
                continue  # the main section or a supplement of the same model has this setting
            row = collect(parsed, task, setting)
            own_row = setting.trained or sup.other_model  # another training run, or another model's measurement
            if row is not None:
                label = setting.label + (sup.suffix if own_row else "")
                _add(rows, replace(row, label=label, baseline=sup_base), own_row)
    return TaskResult(task, section, rows, passed_over, tuple(parsed for _, parsed in supplements))


def _published(paper: str, task: str, setting: str | None) -> tuple[str, str]:
    """A paper's score and its delta to that paper's own baseline, as table cells ("-" where not verified)."""
    if setting is None or (paper, task, setting) not in PUBLISHED:
        return "-", "-"
    pub = PUBLISHED[paper, task, setting]
    mark = "" if pub.found else " †"
    base = PUBLISHED.get((paper, task, "fp32"))
    if setting == "fp32" or base is None:
        return f"{pub.value:.2f}{mark}", "-" if base is None else "0"
    return f"{pub.value:.2f}{mark}", f"{pub.value - base.value:+.2f}"


def _ours(row: Row) -> str:
    return f"{row.mean:.2f}" + ("" if row.std is None else f" ± {row.std:.2f}")


def _seeds(row: Row) -> str:
    seeds = ", ".join(row.seeds)
    return f"n={len(row.values)}: {seeds}" + (" (mean ± sample std)" if len(row.values) > 1 else "")


def table_lines(results: list[TaskResult]) -> list[str]:
    """The long-format table: one row per task, setting and section that has it; the last column names the
    section."""
    head = (
        "| task | setting | w / e / a bits | ours | Δ ours | Q-BERT | Δ Q-BERT | TernaryBERT | Δ TernaryBERT "
        "| encoder comp. | embedding comp. | whole model comp. | examples seen | seeds | section |"
    )
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for res in results:
        task = f"{res.task.name} ({res.task.metric})"
        if res.section is None:
            names = " or ".join(f"`{s}`" for s in res.task.sections)
            lines.append(f"| {task} | not run yet (no {names} section) |" + " - |" * 13)
            continue
        for row in res.rows:
            if not row.values:
                lines.append(f"| {task} | {row.label} | not in `{row.section}` |" + " - |" * 11 + f" {row.section} |")
                continue
            c = row.cells
            delta = "0" if row.setting.paper == "fp32" else f"{row.delta:+.2f}"
            theirs = [cell for paper in PAPERS for cell in _published(paper, res.task.name, row.setting.paper)]
            lines.append(
                f"| {task} | {row.label} | {c['w-bits']} / {c['e-bits']} / {c['a-bits']} | {_ours(row)} | "
                f"{delta} | {' | '.join(theirs)} | {c['encoder comp.']} | {c['embedding comp.']} | "
                f"{c['compression']} | {c['examples seen']} | {_seeds(row)} | {row.section} |"
            )
    return lines


def results_section(results: list[TaskResult]) -> str:
    """The ``table1`` section of RESULTS.md: the table, where each task came from, and what theirs rest on."""
    used = [s for r in results if r.section is not None for s in (r.section, *r.supplements)]
    machines = sorted({s.machine for s in used})
    machine = machines[0] if len(machines) == 1 else "; ".join(f"{s.name}: {s.machine}" for s in used)
    fed = []
    for r in results:
        if r.section is None:
            fed.append(f"{r.task.name}: not run yet (no {' or '.join(r.task.sections)} section)")
            continue
        note = f" ({', '.join(r.passed_over)})" if r.passed_over else ""
        more = " and ".join(f"{s.name} (run by `{s.command}`)" for s in r.supplements)
        more = f", supplemented by {more}" if more else ""
        fed.append(f"{r.task.name}: {r.section.name}{note}, run by `{r.section.command}`{more}")
    found = sorted({p.source for p in PUBLISHED.values() if p.found})
    lines = [
        "## table1: Q-BERT's Table 1 on MiniLM-L6",
        "",
        "Command: `python experiments/table1.py` (from the sections of this file, not from run folders). "
        f"Machine, as the sections record it: {machine}.",
        "",
        "Ours is MiniLM-L6 (22.7M parameters); Q-BERT's and TernaryBERT's numbers are BERT-base (110M) on GLUE's, "
        "CoNLL-03's and SQuAD's full training sets. The models and the budgets differ, so **only the deltas "
        "compare**: each in points against its own FP32 baseline (ours: the FP32 row of the row's own section, "
        "named in the last column). Q-BERT's 8-bit row (w8 e8 a8) stands beside our direct (post-training) 8-bit, "
        "its 2-bit and MP 2/3 rows beside our QAT uniform 2-bit and QAT mixed 2/3 (from round-to-nearest's codes), "
        "TernaryBERT's 2-2-8 beside our QAT 2-2-8. Compression is each section's: the encoder's weights, the "
        "embedding tables and the whole packed model against FP32. Examples seen is the training budget (QAT "
        "rows: the QAT run's; FP32: the fine-tune's; direct rows train nothing).",
        "",
        "A task's rows come from its main section, then from its supplementary sections where they exist (other "
        "runs of the task, each with its own FP32 row; Sources names them), each setting's rows together. A QAT "
        f"row labelled '{FULL_EPOCH}' trained one epoch over the task's whole training split. A QAT setting that "
        "two sections share has a row from each (two training runs, each against its own FP32); a direct setting "
        f"they share is shown once, from the first. A row labelled '{LOCAL_SPLIT}' comes from SQuAD's run on the "
        f"local split ({LOCAL_MODEL}), shown only for a setting the runs on SQuAD's training split lack.",
        "",
        "Sources: " + "; ".join(fed) + ".",
        "",
        *table_lines(results),
        "",
        "Seeds: where a setting ran at several seeds (plans `NAME`, `NAME-seed1`, ...), ours is the mean ± the "
        "sample standard deviation over them and its delta the mean's; n is in the seeds column (a direct row "
        "is one measurement whatever the plan's QAT seed).",
        "",
        "Their numbers (Q-BERT: Shen et al., AAAI 2020, Table 1; TernaryBERT: Zhang et al., EMNLP 2020), kept with "
        "their sources in `PUBLISHED` in experiments/table1.py. Unmarked ones were found in a public source "
        "while building this table: " + "; ".join(found) + ". † marks one only experiments/README.md quotes "
        "(not found in a public source here). Left out, not verified: Q-BERT's CoNLL-03 8-bit and 2-bit rows and "
        "its DirectQ rows; TernaryBERT's own MNLI and SQuAD baselines (so no delta there). A dash: the paper "
        "has no such row, or it was left out.",
    ]
    return "\n".join(lines)


def readme_table(results: list[TaskResult]) -> str:
    """The short version for README.md: per task our FP32 score and each setting's delta, Q-BERT's beside."""
    settings = ("direct 8-bit", "direct mixed 2/3", "direct mixed 2/3, GPTQ rounding", "QAT uniform 2-bit")
    settings += ("QAT mixed 2/3", "QAT mixed 2/3 from GPTQ's codes")
    full = "QAT mixed 2/3 from GPTQ's codes" + FULL_EPOCH  # a supplement's; "-" where the task has none
    lines = [
        "| task (metric) | FP32 | direct 8-bit | direct mixed 2/3 | + GPTQ rounding | QAT 2-bit | QAT mixed 2/3 "
        "| QAT from GPTQ | QAT mixed 2/3, full data | Q-BERT 2-bit | Q-BERT mixed 2/3 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        task = f"{res.task.name} ({res.task.metric})"
        if res.section is None:
            lines.append(f"| {task} |" + " not run yet |" * 10)
            continue
        rows: dict[str, Row] = {}
        for r in res.rows:  # a setting measured in two sections: the main section's (the first) row
            if r.values:
                rows.setdefault(r.label, r)
        present = {s.name for s in res.supplements}
        stand_ins = [sup for sup in res.task.supplements if sup.other_model and sup.section in present]
        cells = [f"{res.rows[0].mean:.2f}"]
        for label in (*settings, full):
            row, mark = rows.get(label), ""
            for sup in stand_ins if row is None else ():  # another model's row, where the main section has none
                row, mark = rows.get(label + sup.suffix), sup.mark
                if row is not None:
                    break
            spread = "" if row is None or row.std is None else f" (± {row.std:.2f}, n={len(row.values)})"
            missing = "-" if label == full else "not run"
            cells.append(missing if row is None else f"{row.delta:+.2f}{spread}{mark}")
        cells += [_published("Q-BERT", res.task.name, s)[1] for s in ("2-bit", "mp-2/3")]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    sources = ", ".join(
        f"{r.task.name}: " + " + ".join(f"`{s.name}`" for s in (r.section, *r.supplements))
        for r in results
        if r.section is not None
    )
    return "\n".join(
        [
            *lines,
            "",
            "Points against the FP32 baseline of the section each number comes from (the FP32 column: the task's "
            f"main section; sections: {sources}; ± the sample std over n seeds). Full data: QAT mixed 2/3 from "
            "GPTQ's codes trained one epoch over the task's whole training split. A cell marked (local split): where "
            f"SQuAD's runs on its training split have no such row, the run on the local split ({LOCAL_MODEL}), against "
            "its own FP32. Written by "
            "`python experiments/table1.py`, whose full table (TernaryBERT, compression, budgets, seeds, sources) "
            "heads [experiments/RESULTS.md](experiments/RESULTS.md).",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS, help="the RESULTS.md to read and to write table1 into")
    ap.add_argument("--readme", type=Path, default=README, help="a file with table1 markers for the short table")
    args = ap.parse_args(argv)
    write_results = _write_results()
    try:
        if not args.results.exists():
            raise QBHError(f"'{args.results}' does not exist; pass --results with the experiments' RESULTS.md")
        results = [build_task(task, parse_sections(args.results.read_text())) for task in TASKS]
        text = args.readme.read_text() if args.readme.exists() else ""
        if f"<!-- begin {SECTION} -->" not in text:
            raise QBHError(
                f"'{args.readme}' has no '<!-- begin {SECTION} -->' / '<!-- end {SECTION} -->' markers; put the two "
                "lines where the short table goes"
            )
        section, short = results_section(results), readme_table(results)
    except QBHError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_results.replace_section(args.results, SECTION, section, top=True)
    write_results.replace_section(args.readme, SECTION, short)
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
