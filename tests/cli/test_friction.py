"""What a newcomer meets before any bad input: help text, quiet output, file permissions, the README's code."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pytest

from qbert_hessian.cli import build_parser, main

README = Path(__file__).resolve().parents[2] / "README.md"


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
            main(["plan", "--report", str(tmp_path / "s"), "--uniform", "4", "--groups", "1", "--out", str(plan)]) == 0
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
        "groups=128": 'groups="channel"',  # the tiny model's 16x16 matrices have no 128 groups
        "num_batches=8, batch_size=32": "num_batches=2, batch_size=8",  # 96 training sentences
        '"out/packed"': f'"{tmp_path / "packed"}"',
    }
    blocks = _python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 2
    for block in blocks:
        for old, new in swaps.items():
            block = block.replace(old, new)
        assert "runs/" not in block, f"a README path the test does not map:\n{block}"
        exec(compile(block, str(README), "exec"), {})  # noqa: S102  (the README's own code)
    assert (tmp_path / "bbc_sensitivity" / "sensitivity.json").is_file()
    assert (tmp_path / "packed" / "model.safetensors").is_file()
