"""Crash-safe checkpoint folders, shared by the language-model and the control trainers.

A run that dies in the middle of a save must never lose the checkpoint it already had. So a checkpoint folder is
written in full under a temporary name beside its final place, every file is hashed into a ``manifest.json``, the
files and the folder are flushed to disk (``fsync``), and only then is the folder renamed into place. A rename within
one file system is atomic, so at every instant the folder under the final name is either the old, complete one or
the new, complete one; a process killed at any point leaves at worst a temporary folder, which
:func:`recover` deletes on the next start.

Replacing a folder that already exists (``final`` written again by a resumed run) takes two renames, since a
directory cannot be renamed over a non-empty one: old -> ``.<name>.old-<pid>``, temporary -> ``<name>``. A kill
between them leaves the old folder complete under its ``.old`` name; :func:`recover` renames it back.

On resume :func:`latest_good` walks the checkpoints newest first and :func:`verify`-ies each against its manifest, so
a folder truncated or corrupted after the fact (a full disk, a bad copy, bit rot) is reported in one line and the
next older one is used instead.

Pure standard library: no torch here, the trainers pass a function that writes their files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "MANIFEST",
    "usual_modes",
    "folders_in",
    "latest_good",
    "prune",
    "read_manifest",
    "recover",
    "save_atomic",
    "sha256_file",
    "verify",
]

MANIFEST = "manifest.json"
"""In every checkpoint folder: the format, the step and ``{relative path: {"bytes", "sha256"}}`` of every other file."""

FORMAT = "policygrad.checkpoint/1"
_TMP = ".tmp-"  # being written
_OLD = ".old-"  # replaced, about to be deleted (or put back by recover)
_DEL = ".del-"  # pruned, being deleted


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (checkpoints can be larger than memory)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file or a directory entry to disk, so a rename is never persisted before the data it points at."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:  # some platforms cannot open directories; the rename is still atomic for a process crash
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def usual_modes(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes a plain ``open`` or ``mkdir`` would (0644 and 0755 under the
    usual umask): writers that go through temporary files (safetensors, ``tempfile``) leave 0600, which hides a
    checkpoint from the other users of a shared machine."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [Path(folder), *Path(folder).rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def save_atomic(folder: Path, write: Callable[[Path], None], step: int, extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder so that a crash at any point leaves the previous one intact (see the module doc).

    Args:
        folder: where the checkpoint ends up, e.g. ``run/checkpoints/step-000100``.
        write:  writes the checkpoint's files into the folder it is given (a temporary one).
        step:   the training step the checkpoint holds, recorded in the manifest so the newest can be found
                without loading anything.
        extra:  more JSON values for the manifest.
    Returns:
        ``folder``.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}{_TMP}{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    usual_modes(tmp)
    files = {}
    for path in _files(tmp):
        _fsync(path)
        files[path.relative_to(tmp).as_posix()] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {"format": FORMAT, "step": int(step), "files": files, **(extra or {})}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    _fsync(tmp / MANIFEST)
    _fsync(tmp)
    old = folder.parent / f".{folder.name}{_OLD}{os.getpid()}"
    if folder.exists():
        if old.exists():
            shutil.rmtree(old)
        os.rename(folder, old)
    os.rename(tmp, folder)
    _fsync(folder.parent)
    if old.exists():
        shutil.rmtree(old)
    return folder


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest, or None if it has none or it is not valid JSON of our format."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("step"), int):
        return None
    return manifest


def verify(folder: Path) -> str | None:
    """None if every file the manifest lists is there with its size and SHA-256; else one line saying what is not.

    >>> verify(Path("/no/such/folder"))
    'no manifest.json (an incomplete save, or not a policygrad checkpoint)'
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return (
            f"no {MANIFEST} (an incomplete save, or not a policygrad checkpoint)"
            if not (folder / MANIFEST).is_file()
            else f"{MANIFEST} is unreadable (corrupted)"
        )
    for name, expected in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return (
                f"{name} is truncated ({size} of {expected['bytes']} bytes)"
                if size < expected["bytes"]
                else (f"{name} has the wrong size ({size} bytes, expected {expected['bytes']})")
            )
        if sha256_file(path) != expected["sha256"]:
            return f"{name} is corrupted (SHA-256 does not match the manifest)"
    return None


def recover(parent: Path) -> None:
    """Tidy what a killed save left in ``parent``: delete temporary folders, and put back an old folder whose
    replacement never arrived (killed between the two renames of :func:`save_atomic`)."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    for path in sorted(parent.iterdir()):
        if not path.name.startswith("."):
            continue
        if not path.is_dir():
            if _TMP in path.name:  # a file written through a temporary name (config, logs) and cut off
                path.unlink(missing_ok=True)
            continue
        if _TMP in path.name or _DEL in path.name:
            shutil.rmtree(path, ignore_errors=True)
        elif _OLD in path.name:
            original = parent / path.name[1:].rsplit(_OLD, 1)[0]
            if original.exists():
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.rename(path, original)


def latest_good(folders: Iterable[Path], warn: Callable[[str], None] | None = None) -> Path | None:
    """The checkpoint with the highest step among ``folders`` that passes :func:`verify`, or None.

    Every folder skipped on the way (no manifest, a missing, truncated or corrupted file) is reported through
    ``warn`` (default: one line on stderr), naming the folder and what is wrong, then the next older one is tried.
    Folders that do not exist are ignored.
    """
    warn = warn or (lambda line: print(line, file=sys.stderr))
    dated, undated = [], []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        manifest = read_manifest(folder)
        (dated if manifest is not None else undated).append((manifest["step"] if manifest else -1, folder))
    for _, folder in undated:
        warn(f"policygrad: skipping checkpoint {folder}: {verify(folder)}")
    for step, folder in sorted(dated, key=lambda item: (item[0], item[1].name == "final"), reverse=True):
        problem = verify(folder)
        if problem is None:
            return folder
        warn(f"policygrad: skipping checkpoint {folder} (step {step}): {problem}; falling back to an older one")
    return None


def prune(parent: Path, keep: int, prefix: str = "step-") -> list[Path]:
    """Delete all but the ``keep`` newest ``<prefix>N`` folders of ``parent`` (newest by N); 0 keeps everything.

    Returns what was deleted. A folder without a readable manifest is not counted among the kept, so a damaged
    newest one never pushes the last good one out.
    """
    if keep <= 0 or not Path(parent).is_dir():
        return []
    numbered = []
    for path in Path(parent).iterdir():
        if path.is_dir() and path.name.startswith(prefix) and path.name[len(prefix) :].isdigit():
            numbered.append((int(path.name[len(prefix) :]), path))
    numbered.sort(reverse=True)
    kept, deleted = 0, []
    for _, path in numbered:
        if kept < keep:
            kept += read_manifest(path) is not None
            continue
        # renamed first, so a kill half way through the deletion leaves no half checkpoint under a real name
        trash = path.parent / f".{path.name}{_DEL}{os.getpid()}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        deleted.append(path)
    return deleted


def folders_in(parent: Path) -> list[Path]:
    """The checkpoint folders of ``parent``: its visible sub-folders, and any ``.old`` one that a save killed between
    its two renames left behind (still complete). Temporary and half-deleted folders are not candidates."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir() if p.is_dir() and (not p.name.startswith(".") or _OLD in p.name))
