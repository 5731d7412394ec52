"""Bad inputs around artifacts and run folders, as a table in test_bad_inputs.py's manner: the command, the
expected exit code, a fragment of its one-line message, and the whole workspace compared file by file before
and after (nothing written, changed or deleted).

The groups follow the issue that listed them: damaged packed checkpoints, run folders (locks, artifacts copied
in), refused runs that must not drop the cache, ``--force`` / ``--out`` that must not destroy a person's files,
tracebacks, and misleading or late refusals. What a refusal cannot show (a second process, a signal, a rerun
that must recompute, a file that must survive) has its own test below the table.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from qbert_hessian.cli import main
from tests.cli.test_bad_inputs import (  # the shared world (a checkpoint, data, a report, a plan, a packed folder)
    RUN_TOML,
    SENS,
    Case,
    World,
    _copy,
    _exit_code,
    _partial,
    _quantize,
    _run,
    _set,
    _snapshot,
    world,  # noqa: F401  (the fixture, used by name)
)

CHANNEL = _set("allocate", 'groups = "channel"')  # the tiny model's matrices divide into no 128 groups

QUERY = "bert.encoder.layer.0.attention.self.query.weight"
REPO = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------------- case builders


def _packed(w: World, tmp: Path, *, old_format: bool = False, tensors=None, manifest=None) -> Path:
    """A copy of the world's packed checkpoint, damaged by ``tensors`` (an edit of its tensors) and/or
    ``manifest`` (an edit of quantization.json); ``old_format``: as written before checksums."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    d = _copy(w.packed, tmp / "packed")
    if tensors is not None:
        path = str(d / "model.safetensors")
        with safe_open(path, "pt") as fh:
            metadata = fh.metadata()
        state = load_file(path)
        tensors(state)
        save_file(state, path, metadata=metadata)
    path = d / "quantization.json"
    data = json.loads(path.read_text())
    if old_format:
        del data["sha256"]
    if manifest is not None:
        manifest(data)
    path.write_text(json.dumps(data))
    return d


def _scale(value: float) -> Callable[[dict], None]:
    def edit(state: dict) -> None:
        state[QUERY + ".scale"][0] = value

    return edit


def _cut_codes(state: dict) -> None:
    state[QUERY + ".codes"] = state[QUERY + ".codes"][: state[QUERY + ".codes"].numel() // 2].clone()


def _flip_code(state: dict) -> None:
    state[QUERY + ".codes"][0] ^= 1


def _asymmetric(data: dict) -> None:  # "symmetric": false, everywhere the manifest says it
    data["plan"]["symmetric"] = False
    for e in data["tensors"].values():
        e["symmetric"] = False


def _eval(w: World, model: Path) -> list[str]:
    return ["evaluate", *w.model(model), "--quiet"]


_HELD: list[int] = []  # lock file descriptors held for the length of the module


def _locked(folder: Path) -> Path:
    """``folder`` with its run lock held (by this process, through its own open file, as another run would)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".run.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"4242\n")
    _HELD.append(fd)
    return folder


@pytest.fixture(scope="module", autouse=True)
def _release_held():
    yield
    while _HELD:
        os.close(_HELD.pop())


@pytest.fixture(scope="module")
def done_run(world: World, tmp_path_factory) -> Path:  # noqa: F811
    """A finished run folder (rerunning its config reuses every stage)."""
    root = tmp_path_factory.mktemp("done")
    cfg = root / "run.toml"
    cfg.write_text(CHANNEL(RUN_TOML.format(model=world.ckpt, data=world.data)), encoding="utf-8")
    assert main(["run", str(cfg), "--out", str(root / "out"), "--quiet"]) == 0
    return root / "out"


def _run_in(w: World, tmp: Path, out: Path, edit: Callable[[str], str] = lambda t: t) -> list[str]:
    argv = _run(w, tmp, lambda text: CHANNEL(edit(text)))
    return [*argv[:2], "--out", str(out), *argv[4:]]


def _symlink(tmp: Path, target: Path, name: str = "link") -> Path:
    link = tmp / name
    link.symlink_to(target)
    return link


def _existing_json(tmp: Path) -> Path:
    path = tmp / "eval.json"
    path.write_text('{"mine": true}\n')
    return path


def _plan_report(w: World, tmp: Path, report: Path, *extra: str) -> list[str]:
    report = _copy(report, tmp / "report")
    out = str(tmp / "p" / "plan.json")
    return ["plan", "--report", str(report), "--out", out, "--quiet", *extra]


def _state_folder(w: World, tmp: Path) -> list[str]:
    out = _partial(w, tmp)
    (out / "sensitivity.state.pt").mkdir()
    return ["sensitivity", *w.model(), *SENS, "--out", str(out), "--resume"]


def _long_name(text: str) -> str:
    return text.replace('name = "uniform-4"', f'name = "{"p" * 300}"')


def _frontier_name(text: str) -> str:
    return text.replace('name = "uniform-4"', 'name = "frontier"')


# ------------------------------------------------------------------------------------------------ the table

PACKED = [
    # a damaged packed checkpoint is refused, with or without the checksum (folders written before it)
    Case("packed-scale-nan", lambda w, t: _eval(w, _packed(w, t, tensors=_scale(float("nan")))), "damaged"),
    Case("packed-scale-inf", lambda w, t: _eval(w, _packed(w, t, tensors=_scale(float("inf")))), "damaged"),
    Case(
        "packed-scale-nan-no-checksum",
        lambda w, t: _eval(w, _packed(w, t, old_format=True, tensors=_scale(float("nan")))),
        "scales must be finite and positive",
    ),
    Case(
        "packed-scale-zero-no-checksum",
        lambda w, t: _eval(w, _packed(w, t, old_format=True, tensors=_scale(0.0))),
        "holds 0.0: scales must be finite and positive",
    ),
    Case(
        "packed-scale-negative-no-checksum",
        lambda w, t: _eval(w, _packed(w, t, old_format=True, tensors=_scale(-0.5))),
        "holds -0.5: scales must be finite and positive",
    ),
    Case("packed-codes-cut", lambda w, t: _eval(w, _packed(w, t, tensors=_cut_codes)), "damaged or was edited"),
    Case(
        "packed-codes-cut-no-checksum",
        lambda w, t: _eval(w, _packed(w, t, old_format=True, tensors=_cut_codes)),
        "the file is truncated or edited",
    ),
    Case("packed-code-flipped", lambda w, t: _eval(w, _packed(w, t, tensors=_flip_code)), "damaged or was edited"),
    Case("packed-symmetric-false", lambda w, t: _eval(w, _packed(w, t, manifest=_asymmetric)), "damaged"),
    Case(
        "packed-symmetric-false-no-checksum",
        lambda w, t: _eval(w, _packed(w, t, old_format=True, manifest=_asymmetric)),
        "has no zero points but the manifest says asymmetric",
    ),
    Case(
        "packed-plan-symmetric-false-no-checksum",
        lambda w, t: _eval(w, _packed(w, t, old_format=True, manifest=lambda d: d["plan"].update(symmetric=False))),
        "contradicts itself",
    ),
]

RUN_FOLDERS = [
    # another run holds the folder: refused at once
    Case(
        "run-folder-locked", lambda w, t: _run_in(w, t, _locked(t / "out")), "is in use by another run (process 4242)"
    ),
    # a refused run leaves the cached stages of a finished run as they were
    Case(
        "run-refused-keeps-cache-no-tokenizer",
        lambda w, t: _run_in(w, t, _done_copy(t), lambda s: s.replace(str(w.ckpt), str(w.no_tokenizer))),
        "no tokenizer",
    ),
    Case(
        "run-refused-keeps-cache-one-label",
        lambda w, t: _run_in(w, t, _done_copy(t), lambda s: s.replace(str(w.data), str(_one_label_data(t)))),
        "1 label value(s)",
    ),
    Case(
        "run-refused-keeps-cache-force",
        lambda w, t: [*_run_in(w, t, _done_copy(t), lambda s: s.replace(str(w.ckpt), str(w.no_tokenizer))), "--force"],
        "no tokenizer",
    ),
]

OUTPUTS = [
    Case("evaluate-out-exists", lambda w, t: [*_eval(w, w.ckpt), "--out", str(_existing_json(t))], "pass --force"),
    Case(
        "evaluate-out-symlink-force",
        lambda w, t: [*_eval(w, w.ckpt), "--out", str(_symlink(t, _existing_json(t))), "--force"],
        "is a symbolic link",
    ),
    Case(
        "quantize-force-out-symlink",
        lambda w, t: _quantize(w, t, w.plan, _symlink(t, _copy(w.packed, t / "real")), "--force"),
        "is a symbolic link",
    ),
]

TRACEBACKS = [
    Case(
        "toml-qat-seed-negative",
        lambda w, t: _run(w, t, _set("qat", "seed = -1")),
        "[qat] seed must be an integer >= 0",
    ),
    Case("toml-plan-name-300-chars", lambda w, t: _run(w, t, _long_name), "has 300 characters"),
    Case("sensitivity-state-is-a-folder", _state_folder, "is a folder, where sensitivity keeps its finished draws"),
]

LATE = [
    Case("toml-plan-named-frontier", lambda w, t: _run(w, t, _frontier_name), "plan name 'frontier' is taken"),
    Case("toml-run-seed-negative", lambda w, t: _run(w, t, _set("run", "seed = -1")), "[run] seed must be an integer"),
    Case(
        "plan-partial-report-with-model",
        lambda w, t: _plan_report(w, t, w.partial_report, "--avg-bits", "3", "--model", str(w.ckpt)),
        "does not score encoder.1",
    ),
    Case(
        "plan-groups-7-with-model",
        lambda w, t: _plan_report(w, t, w.report, "--avg-bits", "3", "--groups", "7", "--model", str(w.ckpt)),
        "7",
    ),
    Case(
        "plan-method-uniform-with-budget",
        lambda w, t: _plan_report(w, t, w.report, "--avg-bits", "3", "--method", "uniform", "--groups", "channel"),
        "method 'uniform' gives every block one width",
    ),
    Case(
        "landscape-extreme-one-step",
        lambda w, t: [
            "landscape",
            *w.model(),
            *("--block", "encoder.0", "--directions", "extreme", "--max-iters", "1", "--grid", "3"),
            *("--out", str(t / "ls"), "--quiet"),
        ],
        "the extreme directions would be one vector twice",
    ),
]


def _done_copy(tmp: Path) -> Path:
    return _copy(_DONE[0], tmp / "out")


def _one_label_data(tmp: Path) -> Path:
    d = tmp / "one"
    d.mkdir()
    (d / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"good movie {i}\t1\n" for i in range(40)))
    (d / "dev.tsv").write_text("sentence\tlabel\nfun\t1\n")
    return d


_DONE: list[Path] = []

CASES = [*PACKED, *RUN_FOLDERS, *OUTPUTS, *TRACEBACKS, *LATE]


def test_the_table_has_no_duplicate_ids():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world: World, done_run: Path, tmp_path: Path, capsys):  # noqa: F811
    _DONE[:] = [done_run]
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    argv = case.argv(world, case_dir)
    capsys.readouterr()
    before = _snapshot(world.root, done_run.parent, case_dir)
    code = _exit_code(argv)
    err = capsys.readouterr().err
    after = _snapshot(world.root, done_run.parent, case_dir)
    assert code == case.code, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and case.message in lines[-1], err
    assert len(lines) == 1, err
    assert after == before, "the command wrote, changed or deleted files"
