"""The manifest that ties the files of one save together, and the atomic replacement of a
saved folder (written beside it, swapped in, the user's own files carried over)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from typing import Any

from ..configs import (
    load_json_strict,
)
from ..errors import CheckpointError
from .format import _OURS, FORMAT, FORMAT_VERSION, MANIFEST_NAME, check_format_version

# ---------------------------------------------------------------------------------------------
# manifests
# ---------------------------------------------------------------------------------------------


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files_under(folder: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(root, name), folder)
            found.append(rel.replace(os.sep, "/"))
    return found


def write_manifest(folder: str) -> dict[str, Any]:
    """Write ``adapters_manifest.json`` listing every file under ``folder`` (relative path,
    size, sha256) and return it. Called on the temporary folder of a save, last."""
    files = {}
    for rel in _files_under(folder):
        if rel == MANIFEST_NAME:
            continue
        full = os.path.join(folder, *rel.split("/"))
        files[rel] = {"size": os.path.getsize(full), "sha256": _sha256(full)}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "save_id": uuid.uuid4().hex,
        "files": files,
    }
    with open(os.path.join(folder, MANIFEST_NAME), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def read_manifest(folder: str) -> dict[str, Any] | None:
    """The manifest of ``folder`` (None if it has none); malformed ones raise."""
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    data = load_json_strict(path, error=CheckpointError)
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("size"), int) for v in files.values()
    ):
        raise CheckpointError(f"{path!r}: field 'files' is missing or malformed")
    check_format_version(data, repr(path))
    return data


def verify_manifest(
    folder: str,
    hash_files: Callable[[str], bool] = lambda rel: True,
    optional: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Check that every file the manifest of ``folder`` lists is there with its size (and
    sha256, for files ``hash_files`` selects); `CheckpointError` otherwise, naming the file.
    Files in ``optional`` may be missing (not replaced)."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise CheckpointError(
            f"{folder!r} has no {MANIFEST_NAME}: an incomplete save (interrupted, or copied "
            "in part); save it again"
        )
    for rel, info in manifest["files"].items():
        if name_problem_of_path(rel):
            raise CheckpointError(f"{folder!r}: the manifest lists the unsafe path {rel!r}")
        full = os.path.join(folder, *rel.split("/"))
        if rel in optional and not os.path.lexists(full):
            continue
        if not os.path.isfile(full):
            raise CheckpointError(
                f"{folder!r} lacks {rel!r}, which its manifest lists: an incomplete save"
            )
        if os.path.getsize(full) != info["size"] or (
            hash_files(rel) and _sha256(full) != info.get("sha256")
        ):
            raise CheckpointError(
                f"{full!r} is not the file saved with the rest of {folder!r} (size or sha256 "
                "differ from the manifest): the folder mixes files of different saves; save "
                "it again"
            )
    return manifest


def name_problem_of_path(rel: str) -> bool:
    """Whether a manifest path could point outside its folder."""
    return rel.startswith("/") or "\\" in rel or ".." in rel.split("/") or ":" in rel


# ---------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------


def write_directory_atomically(
    target: str, write: Callable[[str], Any], manifest: bool = False
) -> None:
    """Call ``write(tmp_dir)``, add a manifest if asked (``manifest=True``: this library's own
    formats; `verify_manifest` checks it on load), and make ``tmp_dir`` the folder ``target``.

    The new set of files appears whole or not at all: ``tmp_dir`` is a sibling of ``target``
    and replaces it by ``rename`` (an existing ``target`` is renamed away first and removed
    afterwards). Files of an existing ``target`` that no save of ours wrote (a README, a
    trainer's state) are carried over. Concurrent calls for one ``target`` end with one
    complete save (the last). If ``write`` fails, ``target`` is left as it was.

    Fusion and other multi-file saves of plugins use this too.
    """
    target = os.path.abspath(os.fspath(target))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    if os.path.islink(target) or os.path.isfile(target):
        raise CheckpointError(f"{target!r} exists and is not a directory; choose another path")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        write(tmp)
        if manifest:
            write_manifest(tmp)
        _carry_over(target, tmp)
        _swap(tmp, target)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _carry_over(target: str, tmp: str) -> None:
    """Link (or copy) into ``tmp`` the entries of ``target`` that no save of ours wrote."""
    try:
        entries = os.listdir(target)
        old = read_manifest(target)
    except (FileNotFoundError, NotADirectoryError, CheckpointError):
        return
    ours = set(_OURS)
    if old is not None:
        ours |= {rel.split("/", 1)[0] for rel in old["files"]}
    for name in entries:
        if name in ours or os.path.lexists(os.path.join(tmp, name)) or name.startswith("."):
            continue
        source, dest = os.path.join(target, name), os.path.join(tmp, name)
        try:
            if os.path.isdir(source) and not os.path.islink(source):
                shutil.copytree(source, dest, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(source, dest)
        except FileNotFoundError:  # a concurrent save swapped the folder away
            continue


def _link_or_copy(source: str, dest: str) -> None:
    if os.path.islink(source):
        os.symlink(os.readlink(source), dest)
        return
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


def _swap(tmp: str, target: str) -> None:
    parent, base = os.path.dirname(target), os.path.basename(target)
    backups = []
    try:
        for _ in range(1000):
            if os.path.lexists(target):
                backup = os.path.join(parent, f".{base}.old-{uuid.uuid4().hex[:12]}")
                try:
                    os.rename(target, backup)
                except FileNotFoundError:
                    continue  # another save moved it away first
                backups.append(backup)
            try:
                os.rename(tmp, target)
                return
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY) and not os.path.lexists(
                    target
                ):
                    if backups:  # put the previous folder back
                        os.rename(backups.pop(), target)
                    raise
                # another save put its folder there in between: move it away and retry
        raise CheckpointError(f"could not replace {target!r}: too many concurrent saves")
    finally:
        for backup in backups:
            shutil.rmtree(backup, ignore_errors=True)
