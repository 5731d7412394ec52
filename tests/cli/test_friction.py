"""What a newcomer meets before any bad input: help text, quiet output, file permissions, the README's code."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
from pathlib import Path

import pytest

from qbert_hessian.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
GUIDES = sorted((ROOT / "docs").glob("*.md"))  # the guides the README links to


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


@pytest.mark.parametrize("command", sorted(_subparsers(build_parser())))
def test_every_option_has_help_and_its_default_shown(command):
    parser = _subparsers(build_parser())[command]
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[-1] if action.option_strings else action.dest
        assert action.help and action.help.strip(), f"{command} {flag} has no help text"
        shows_default = action.default not in (None, False, argparse.SUPPRESS) and action.default != []
        if shows_default:
            assert f"(default: {action.default}" in " ".join(text.split()), f"{command} {flag} hides its default"


def test_finetune_quiet_prints_the_result_only_and_writes_readable_files(tiny_checkpoint, tiny_data, tmp_path, capfd):
    out = tmp_path / "ft"
    old = os.umask(0o022)
    try:
        args = ["--task", "sst2", "--data", str(tiny_data), "--max-length", "16", "--quiet"]
        assert main(["finetune", "--model", str(tiny_checkpoint), *args, "--epochs", "1", "--out", str(out)]) == 0
        printed = capfd.readouterr()
        plan = tmp_path / "plan.json"
        sens = ["--draws", "1", "--batch-size", "8", "--max-iters", "4", "--trace", "none"]
        assert main(["sensitivity", "--model", str(out), *args, *sens, "--out", str(tmp_path / "s")]) == 0
        assert (
            # --calib-samples: rounding by gptq, the default, on what the tiny data has (96 sentences)
            main(
                [
                    "plan",
                    "--report",
                    str(tmp_path / "s"),
                    "--uniform",
                    "4",
                    "--groups",
                    "1",
                    "--calib-samples",
                    "32",
                    "--out",
                    str(plan),
                ]
            )
            == 0
        )
        assert main(["quantize", "--model", str(out), *args, "--plan", str(plan), "--out", str(tmp_path / "q")]) == 0
    finally:
        os.umask(old)
    assert printed.err == "", printed.err  # no progress bars, no warnings
    lines = printed.out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dev accuracy"), printed.out  # no Trainer log dicts
    files = [p for d in (out, tmp_path / "s", tmp_path / "q") for p in d.iterdir()] + [plan]
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in files if p.is_file()}
    assert modes and set(modes.values()) == {"0o644"}, modes  # others can read (the umask's mode)


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_python_snippets_run(tiny_checkpoint, tiny_data, tmp_path):
    """Each snippet as printed, on the tiny checkpoint: only paths and sizes the tiny model cannot take change."""
    report_dir = tmp_path / "sst2_sensitivity"
    sens = ["--task", "sst2", "--data", str(tiny_data), "--max-length", "16", "--draws", "2", "--batch-size", "8"]
    assert main(["sensitivity", "--model", str(tiny_checkpoint), *sens, "--quiet", "--out", str(report_dir)]) == 0
    swaps = {
        '"runs/bbc/checkpoint"': f'"{tiny_checkpoint}"',
        '"bbc-news", tok, max_length=128': f'"sst2", tok, data_dir="{tiny_data}", max_length=16',
        '"runs/bbc/sensitivity"': f'"{tmp_path / "bbc_sensitivity"}"',
        '"runs/sst2/checkpoint"': f'"{tiny_checkpoint}"',
        '"../shared/data/sst2"': f'"{tiny_data}"',
        '"runs/sst2/sensitivity/': f'"{report_dir}/',
        # the tiny model's 16x16 matrices have no 128 groups; GPTQ's 128 calibration sentences are more than its 96
        "groups=128": 'groups="channel", calib_samples=32',
        "num_batches=8, batch_size=32": "num_batches=2, batch_size=8",  # 96 training sentences
        '"out/packed"': f'"{tmp_path / "packed"}"',
        '"runs/sst2/packed"': f'"{tmp_path / "packed"}"',  # docs/deployment.md exports the README's packed model
        '"runs/sst2/deploy"': f'"{tmp_path / "deploy"}"',
    }
    documents = [README, *GUIDES]
    blocks = [(doc, block) for doc in documents for block in _python_blocks(doc.read_text(encoding="utf-8"))]
    assert {doc.name for doc, _ in blocks} >= {"README.md", "sensitivity.md", "plans.md"}
    for doc, block in blocks:
        for old, new in swaps.items():
            block = block.replace(old, new)
        assert "runs/" not in block, f"a {doc.name} path the test does not map:\n{block}"
        exec(compile(block, str(doc), "exec"), {})  # noqa: S102  (the documentation's own code)
    assert (tmp_path / "bbc_sensitivity" / "sensitivity.json").is_file()
    assert (tmp_path / "packed" / "model.safetensors").is_file()
    assert (tmp_path / "deploy" / "onnx" / "model.onnx").is_file()


def _tracked_text_files() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    suffixes = {".md", ".py", ".toml", ".txt", ".json", ".cfg", ".ini", ".yml", ".yaml", ""}
    return [ROOT / n for n in names.splitlines() if Path(n).suffix in suffixes and (ROOT / n).is_file()]


def test_no_committed_file_names_a_machine_path():
    """Results and docs give commands anyone can rerun: paths relative to the repository, never this machine's."""
    machine = re.compile("(?:/" + "work/|/" + "root/|/" + r"home/\w|[A-Z]:\\\\Users)")  # split: this file is tracked
    found = []
    for path in _tracked_text_files():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if machine.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not found, "machine paths in committed files:\n" + "\n".join(found)
