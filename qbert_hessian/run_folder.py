"""Where a run's files live in its folder: one layout, shared by the run that writes them (``pipeline``) and the
report that reads them (``report``).

    run.json                        the ledger: the run's config and, per stage, its inputs and its files' hashes
    report.md                       the results table, the plans, the settings
    checkpoint/                     the fine-tuned FP32 model (only when the model had no trained head)
    sensitivity/sensitivity.json    the sensitivity report; profile.json beside it: the allocator's cost table
    plans/<name>.json, <name>.md    each plan; frontier.json and frontier.png
    results/fp32.json               the FP32 baseline's scores and size
    results/<name>/                 direct.json, qat.json, packed/, metrics.json; onnx/ and onnx.json (exported)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

PROFILE_FILE = "profile.json"  # the cost table, beside the sensitivity report it was measured for


@dataclasses.dataclass(frozen=True)
class RunFolder:
    """The paths of one run folder's files (nothing is created or read here)."""

    root: Path

    @property
    def ledger(self) -> Path:
        return self.root / "run.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    @property
    def sensitivity(self) -> Path:
        """The sensitivity stage's folder (its report, the solvers' state, the cost table, the figures)."""
        return self.root / "sensitivity"

    @property
    def sensitivity_report(self) -> Path:
        return self.sensitivity / "sensitivity.json"

    @property
    def profile(self) -> Path:
        return self.sensitivity / PROFILE_FILE

    @property
    def plans(self) -> Path:
        return self.root / "plans"

    def plan(self, name: str) -> Path:
        return self.plans / f"{name}.json"

    @property
    def frontier_data(self) -> Path:
        return self.plans / "frontier.json"

    @property
    def frontier_figure(self) -> Path:
        return self.plans / "frontier.png"

    @property
    def fp32(self) -> Path:
        return self.root / "results" / "fp32.json"

    def results(self, name: str) -> Path:
        """Plan ``name``'s folder of results."""
        return self.root / "results" / name

    def direct(self, name: str) -> Path:
        return self.results(name) / "direct.json"

    def qat_log(self, name: str) -> Path:
        return self.results(name) / "qat.json"

    def packed(self, name: str) -> Path:
        return self.results(name) / "packed"

    def metrics(self, name: str) -> Path:
        """The scores of plan ``name``'s packed checkpoint."""
        return self.results(name) / "metrics.json"

    def onnx(self, name: str) -> Path:
        return self.results(name) / "onnx"

    def onnx_metrics(self, name: str) -> Path:
        return self.results(name) / "onnx.json"
