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
import shutil
import signal
import socket
import subprocess
import sys
import time
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
    _partial,
    _quantize,
    _run,
    _set,
    _snapshot,
    check_case,
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
        "groups=7 do not divide its 16x16 weight",
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
    check_case(case, world, tmp_path, capsys, done_run.parent)  # no row here is an argparse usage error


# ------------------------------------------------------------------------- what a table row cannot show

ENV = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}


def _cli(*argv: str, stderr: Path, env: dict | None = None) -> subprocess.Popen:
    """The command in its own process, its stderr into a file (a pipe left unread could stall it)."""
    with stderr.open("w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "qbert_hessian", *argv],
            cwd=REPO,
            env=env or ENV,
            stdout=subprocess.DEVNULL,
            stderr=err,
            # Ctrl-C as a terminal delivers it: a shell that runs the tests in the background starts them with
            # SIGINT ignored, which the child would inherit (and Python installs no handler for an ignored signal)
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )


def _lines(stderr: Path) -> list[str]:
    return [line for line in stderr.read_text().strip().splitlines() if line.strip()]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 900.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if path.exists():
            return True
        time.sleep(0.02)
    return path.exists() and proc.poll() is None


def _long_qat(w: World, tmp: Path) -> Path:
    """A run config whose QAT takes a while (so a second process, or Ctrl-C, finds it training)."""
    cfg = tmp / "slow.toml"
    text = CHANNEL(RUN_TOML.format(model=w.ckpt, data=w.data)).replace("qat = false", "qat = true")
    # far more than any machine finishes before the signal (the test ends it with Ctrl-C after a second)
    cfg.write_text(text.replace("epochs = 1", "epochs = 100000"), encoding="utf-8")
    return cfg


def test_two_processes_on_one_run_folder_then_sigint_in_qat(world, tmp_path, capsys):  # noqa: F811
    """A second run on a folder another run is writing refuses at once (one line, exit 2, nothing touched);
    Ctrl-C in the first one's QAT ends it with exit 130 and one line, keeps the finished stages, leaves no
    half-made packed folder and releases the folder."""
    out, log = tmp_path / "out", tmp_path / "first.err"
    first = _cli("run", str(_long_qat(world, tmp_path)), "--out", str(out), "--quiet", stderr=log)
    try:
        assert _wait_for(out / "results" / "uniform-4" / "direct.json", first), log.read_text()
        assert (out / ".run.lock").read_text().strip() == str(first.pid)
        time.sleep(1.0)  # QAT of uniform-4 is under way
        capsys.readouterr()
        cfg = tmp_path / "other.toml"  # other settings, same folder
        cfg.write_text(CHANNEL(RUN_TOML.format(model=world.ckpt, data=world.data)).replace("draws = 2", "draws = 3"))
        before = _snapshot(out / "sensitivity", out / "plans")
        assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is in use by another run (process {first.pid})" in err[0], err
        assert _snapshot(out / "sensitivity", out / "plans") == before
    finally:
        first.send_signal(signal.SIGINT)
        try:
            first.wait(timeout=600)
        except subprocess.TimeoutExpired:
            first.kill()  # never leave a training process behind
            raise
    assert first.returncode == 130, log.read_text()
    assert _lines(log)[-1].startswith("interrupted; finished stages are kept"), log.read_text()
    assert not (out / ".run.lock").exists()  # released on the signal
    assert not (out / "results" / "uniform-4" / "packed").exists()  # the stage in progress left nothing
    assert (out / "sensitivity" / "sensitivity.json").is_file()  # the finished stages are kept


def test_a_dead_process_lock_is_taken_over(world, done_run, tmp_path):  # noqa: F811
    out = _copy(done_run, tmp_path / "out")
    (out / ".run.lock").write_text("999999\n")  # left by a process that died (nobody holds the flock)
    cfg = tmp_path / "run.toml"
    cfg.write_text(CHANNEL(RUN_TOML.format(model=world.ckpt, data=world.data)))
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    assert not (out / ".run.lock").exists()


def _wait_for_sigint_handler(proc: subprocess.Popen) -> None:
    """Until the child process catches SIGINT (Linux: its ``SigCgt`` mask). Before the interpreter installs its
    handler, SIGINT ends any process by the signal itself (exit -2), which no program can change; on a loaded
    machine that window can last a second."""
    end = time.monotonic() + 60
    while time.monotonic() < end and proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:
            return  # no /proc: count from the start
        mask = next((int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:")), 0)
        if mask & (1 << (signal.SIGINT - 1)):
            return
        time.sleep(0.01)


def test_sigint_in_quantize_exits_130_with_one_line(world, tmp_path):  # noqa: F811
    """Ctrl-C at any moment: one line, exit 130, no folder half-written (tries several moments, since the tiny
    model quantizes in a blink)."""
    seen = []
    # from late to early: on a fast machine the whole command takes a few seconds; 0.8 s lands in the torch
    # import, where Ctrl-C is held (raised inside torch's C++ start-up, it aborted the process)
    for delay in (6.0, 3.0, 1.5, 0.8):
        out = tmp_path / f"q{delay}"
        log = tmp_path / f"q{delay}.err"
        proc = _cli("quantize", *world.model(), "--plan", str(world.plan), "--out", str(out), "--quiet", stderr=log)
        _wait_for_sigint_handler(proc)  # the moments counted from the interpreter's start, not from fork
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=600)
        if proc.returncode == 0:
            continue  # finished before the signal
        lines = _lines(log)
        assert proc.returncode == 130 and len(lines) == 1 and "interrupted" in lines[0], log.read_text()
        assert not out.with_name(out.name + ".saving").exists()
        assert not out.exists() or (out / "quantization.json").is_file()
        seen.append(delay)
    assert seen, "every quantize finished before the signal"


def test_ctrl_c_during_the_torch_import_is_held_then_reported():
    """SIGINT while torch initialises is noted, not raised (raised there it aborts the process with SIGABRT),
    and reported once the import is done; with nothing held, release reports nothing."""
    code = (
        "import os, signal; from qbert_hessian import interrupt; assert not interrupt.release(); "
        "interrupt.hold(); os.kill(os.getpid(), signal.SIGINT); import torch; "
        "print(interrupt.release(), signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert done.returncode == 0 and done.stdout.split() == ["True", "True"], done.stderr


def test_a_finished_command_ignores_ctrl_c_through_its_exit(monkeypatch):
    """Once the command has returned, Ctrl-C changes nothing it did: ignored through the interpreter's shutdown,
    where it would end the process by the signal (exit -2, no message) after the work was done."""
    import importlib

    cli_main = importlib.import_module("qbert_hessian.cli.main")  # the module (the package re-exports main())
    monkeypatch.setattr(cli_main, "main", lambda: 0)
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as done:
            cli_main.entry()
        assert done.value.code == 0 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_lone_rank_says_so_instead_of_waiting(world, tmp_path):  # noqa: F811
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**ENV, "RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env["QBH_RENDEZVOUS_TIMEOUT"] = "2"
    log = tmp_path / "rank1.err"
    proc = _cli("sensitivity", *world.model(), *SENS, "--out", str(tmp_path / "o"), stderr=log, env=env)
    proc.wait(timeout=600)
    lines = _lines(log)
    assert proc.returncode == 2 and len(lines) == 1, log.read_text()
    assert "RANK=1 of WORLD_SIZE=2 found no rendezvous" in lines[0] and "rank 0 is not running" in lines[0]
    assert not (tmp_path / "o").exists()


def _rerun(w: World, out: Path, tmp: Path, caplog, *extra: str) -> str:
    import logging

    cfg = tmp / "run.toml"
    cfg.write_text(CHANNEL(RUN_TOML.format(model=w.ckpt, data=w.data)))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qbert_hessian"):
        assert main(["run", str(cfg), "--out", str(out), "--quiet", *extra]) == 0
    return caplog.text


def test_an_edited_or_copied_artifact_is_recomputed_not_reused(world, done_run, tmp_path, caplog):  # noqa: F811
    out = _copy(done_run, tmp_path / "out")
    assert "nothing was recomputed" in _rerun(world, out, tmp_path, caplog)
    # a sensitivity/ from another run (3 draws) copied over this run's (2 draws)
    other = tmp_path / "other"
    cfg = tmp_path / "other.toml"
    cfg.write_text(CHANNEL(RUN_TOML.format(model=world.ckpt, data=world.data)).replace("draws = 2", "draws = 3"))
    assert main(["run", str(cfg), "--out", str(other), "--quiet"]) == 0
    shutil.rmtree(out / "sensitivity")
    shutil.copytree(other / "sensitivity", out / "sensitivity")
    log = _rerun(world, out, tmp_path, caplog)
    assert "sensitivity/sensitivity.json is not the file this run wrote" in log
    assert json.loads((out / "sensitivity" / "sensitivity.json").read_text())["config"]["draws"] == 2
    # an edited plan
    plan = out / "plans" / "uniform-4.json"
    data = json.loads(plan.read_text())
    data["notes"] = ["edited by hand"]
    plan.write_text(json.dumps(data))
    log = _rerun(world, out, tmp_path, caplog)
    assert "plans/uniform-4.json is not the file this run wrote" in log
    assert "edited by hand" not in plan.read_text()


def test_a_ledger_without_artifact_hashes_is_reused_and_pinned(world, done_run, tmp_path, caplog):  # noqa: F811
    """A run folder made before artifact hashes: its stages are reused (their recorded inputs match) and the
    files found are pinned, so a later edit is caught."""
    out = _copy(done_run, tmp_path / "out")
    ledger = json.loads((out / "run.json").read_text())
    for entry in ledger["stages"].values():
        del entry["artifacts"]
    (out / "run.json").write_text(json.dumps(ledger))
    assert "nothing was recomputed" in _rerun(world, out, tmp_path, caplog)
    stages = json.loads((out / "run.json").read_text())["stages"]
    assert all(entry.get("artifacts") for entry in stages.values()), stages.keys()
    (out / "results" / "fp32.json").write_text((out / "results" / "fp32.json").read_text().replace("{", "{ ", 1))
    assert "results/fp32.json is not the file this run wrote" in _rerun(world, out, tmp_path, caplog)


def test_run_force_keeps_a_persons_files(world, done_run, tmp_path, caplog):  # noqa: F811
    out = _copy(done_run, tmp_path / "out")
    mine = [
        out / "plans" / "my-notes.txt",
        out / "results" / "my-table.csv",
        out / "sensitivity" / "my-plot.png",
        out / "results" / "uniform-4" / "packed" / "README.txt",
    ]
    for path in mine:
        path.write_text("mine\n")
    log = _rerun(world, out, tmp_path, caplog, "--force")
    assert "recomputed: " in log and "sensitivity" in log
    assert all(path.read_text() == "mine\n" for path in mine)


def test_quantize_force_keeps_a_note_in_the_packed_folder(world, tmp_path):  # noqa: F811
    packed = _copy(world.packed, tmp_path / "packed")
    (packed / "note.txt").write_text("evaluated on the 3rd\n")
    (packed / "logs").mkdir()
    (packed / "logs" / "a.log").write_text("x\n")
    assert main(_quantize(world, tmp_path, world.plan, packed, "--force")) == 0
    assert (packed / "note.txt").read_text() == "evaluated on the 3rd\n" and (packed / "logs" / "a.log").exists()
    assert (packed / "quantization.json").is_file() and not (tmp_path / "packed.replaced").exists()


def test_evaluate_force_overwrites_its_own_file(world, tmp_path):  # noqa: F811
    out = _existing_json(tmp_path)
    assert main([*_eval(world, world.ckpt), "--out", str(out), "--force"]) == 0
    assert json.loads(out.read_text())["schema"].startswith("qbert_hessian.evaluation/")


def test_qat_counts_the_examples_it_saw(world, tmp_path):  # noqa: F811
    from qbert_hessian.artifacts import BitPlan
    from qbert_hessian.config import QATConfig
    from qbert_hessian.models import load_model
    from qbert_hessian.qat import train_qat
    from qbert_hessian.quant.apply import calibrate_activations, quantize_model
    from qbert_hessian.tasks import load_raw_task, subset, tokenize_task
    from tests.helpers import random_batch

    model, tok = load_model(str(world.ckpt), task_family="classification", num_labels=2)
    task = tokenize_task(subset(load_raw_task("sst2", data_dir=world.data), 10, 0), tok, max_length=16)
    q = quantize_model(model, BitPlan(model={}, blocks={"encoder.0": {"bits": 4, "groups": "channel"}}))
    calibrate_activations(q, [random_batch(model.config.vocab_size, batch_size=4, seq_len=8)])
    cfg = QATConfig(epochs=2, batch_size=4, warmup_ratio=0.0)
    result = train_qat(q, task, cfg, work_dir=tmp_path / "w", progress=False)
    assert result["steps"] == 2 * 3  # ceil(10 / 4) steps per epoch
    assert result["examples_seen"] == 2 * 10  # not steps x batch (24): each epoch's last batch holds 2
