"""Where an export is written: checks before any work, a staging folder renamed into place, and the extra's check.

An export folder is marked by ``export.json`` (``EXPORT_FILE``); ``--force`` replaces only a folder so marked, and
nothing is visible at ``--out`` until the export is complete.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..artifacts import publish, replace_folder
from ..errors import QBHError
from ..packed_format import MANIFEST_FILE

EXPORT_FILE = "export.json"
INSTALL = "pip install 'qbert_hessian[deploy]'"
# Files of a packed folder that are not the model's config or tokenizer.
PACKED_ONLY = ("model.safetensors", MANIFEST_FILE, "size.json")


def require(*modules: str) -> None:
    """Import ``modules`` or refuse in one line naming the install command."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise QBHError(
                f"exporting or running a deployed model needs {name}, which is not installed; {INSTALL}"
            ) from None


def check_source(packed: Path) -> None:
    if not (packed / MANIFEST_FILE).is_file():
        raise QBHError(
            f"'{packed}' is not a packed checkpoint (no {MANIFEST_FILE}); export one with qbert-hessian quantize"
        )


def is_export(path: Path) -> bool:
    return (path / EXPORT_FILE).is_file()


def check_out(out: Path, *, force: bool) -> None:
    """Refuse an existing ``out`` unless ``force`` and it holds an earlier export; refuse an unwritable place."""
    if out.exists():
        if not out.is_dir() or not is_export(out):
            raise QBHError(f"'{out}' exists and is not an exported model; choose a new folder for --out")
        if not force:
            raise QBHError(f"'{out}' exists; pass --force to replace the exported model there")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir() or not os.access(parent, os.W_OK):
                raise QBHError(f"--out '{out}' cannot be created ('{parent}' is not a writable folder)")
            break


# What an export writes in its folder (besides the tokenizer's files): anything else there is the user's and
# survives --force.
EXPORT_WRITES = frozenset({EXPORT_FILE, "onnx", "config.json", "model.safetensors", "recipe.yaml"})


def _written_by_export(name: str) -> bool:
    return name in EXPORT_WRITES or name in PACKED_ONLY or name.startswith(("tokenizer", "special_tokens", "vocab"))


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A fresh folder beside ``out`` to write into; when the block ends without error its files get the umask's
    mode and it takes ``out``'s place, keeping the files of an earlier export's folder that no export writes."""
    tmp = out.with_name(out.name + ".saving")
    if tmp.exists():
        raise QBHError(f"'{tmp}' exists (left by an interrupted export?); remove it, then export again")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for folder in (tmp, *(d for d in tmp.iterdir() if d.is_dir())):
            publish(folder)
        replace_folder(tmp, out, _written_by_export)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def copy_model_files(packed: Path, dst: Path) -> list[str]:
    """Copy ``config.json`` and the tokenizer files of a packed folder (not its weights or manifest)."""
    names = []
    for f in sorted(packed.iterdir()):
        if f.is_file() and f.name not in PACKED_ONLY:
            shutil.copy2(f, dst / f.name)
            names.append(f.name)
    return names
