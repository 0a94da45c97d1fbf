"""The manifest that ties the files of one save together, reading files through it, the rule
for symbolic links in a saved folder, and the atomic replacement of a saved folder (see
`adapters.checkpoint.atomic`).

A manifest lists every file its save wrote (relative path, size, sha256). A load reads only
files the manifest lists and checks the sha256 of the very bytes it then parses
(`read_listed`), so a folder mixing two saves, a file changed by hand or a file swapped while
it is read is refused, never half-used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from ..configs import (
    load_json_strict,
)
from ..errors import CheckpointError
from .atomic import replace_directory
from .format import _OURS, FORMAT, FORMAT_VERSION, MANIFEST_NAME, check_format_version

_SHA256 = re.compile(r"^[0-9a-f]{64}$")

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
    if not os.path.lexists(path):
        return None
    data = load_json_strict(path, error=CheckpointError)
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not all(_valid_entry(v) for v in files.values()):
        raise CheckpointError(
            f"{path!r}: field 'files' is missing or malformed (expected {{path: {{'size': "
            "bytes, 'sha256': hex digest}}}); save the folder again"
        )
    unsafe = [rel for rel in files if name_problem_of_path(rel)]
    if unsafe:
        raise CheckpointError(f"{path!r} lists the unsafe path {unsafe[0]!r}")
    check_format_version(data, repr(path))
    return data


def _valid_entry(info: Any) -> bool:
    size = info.get("size") if isinstance(info, dict) else None
    digest = info.get("sha256") if isinstance(info, dict) else None
    return (
        isinstance(size, int)
        and not isinstance(size, bool)
        and size >= 0
        and isinstance(digest, str)
        and _SHA256.match(digest) is not None
    )


def verify_manifest(
    folder: str,
    hash_files: Callable[[str], bool] = lambda rel: True,
    optional: frozenset[str] = frozenset(),
    required: Iterable[str] = (),
) -> dict[str, Any]:
    """Check that every file the manifest of ``folder`` lists is there with its size (and
    sha256, for files ``hash_files`` selects), and that it lists every path of ``required``;
    `CheckpointError` otherwise, naming the file. Files in ``optional`` may be missing (not
    replaced)."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise CheckpointError(
            f"{folder!r} has no {MANIFEST_NAME}: an incomplete save (interrupted, or copied "
            "in part); save it again"
        )
    missing = [rel for rel in required if rel not in manifest["files"]]
    if missing:
        raise CheckpointError(
            f"the manifest of {folder!r} does not list {missing[0]!r}, which every such save "
            "writes: the manifest was cut or edited; save the folder again"
        )
    for rel, info in manifest["files"].items():
        full = os.path.join(folder, *rel.split("/"))
        if rel in optional and not os.path.lexists(full):
            continue
        if not os.path.isfile(full):
            raise CheckpointError(
                f"{folder!r} lacks {rel!r}, which its manifest lists: an incomplete save"
            )
        if os.path.getsize(full) != info["size"] or (
            hash_files(rel) and _sha256(full) != info["sha256"]
        ):
            raise _mixed(full, folder)
    return manifest


def _mixed(full: str, folder: str) -> CheckpointError:
    return CheckpointError(
        f"{full!r} is not the file saved with the rest of {folder!r} (size or sha256 differ "
        "from the manifest): the folder mixes files of different saves, or a save replaced it "
        "while it was read; save it again"
    )


def read_listed(folder: str, manifest: dict[str, Any], rel: str) -> bytes:
    """The bytes of file ``rel`` of ``folder``, which ``manifest`` must list, checked against
    the listed size (before reading: nothing larger is read) and sha256: the caller parses
    exactly the bytes the manifest vouches for."""
    info = manifest["files"].get(rel)
    full = os.path.join(folder, *rel.split("/"))
    if info is None:
        raise CheckpointError(
            f"the manifest of {folder!r} does not list {rel!r}: the file is not part of the "
            "save (added or renamed after it); save the folder again"
        )
    try:
        fd = os.open(full, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO cannot block
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size != info["size"]:
                raise _mixed(full, folder)
            data = f.read(info["size"] + 1)
    except FileNotFoundError:
        raise CheckpointError(
            f"{folder!r} lacks {rel!r}, which its manifest lists: an incomplete save"
        ) from None
    except IsADirectoryError:
        raise _mixed(full, folder) from None
    if len(data) != info["size"] or hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise _mixed(full, folder)
    return data


def name_problem_of_path(rel: str) -> bool:
    """Whether a manifest path could point outside its folder."""
    return (
        not rel
        or rel.startswith("/")
        or "\\" in rel
        or ".." in rel.split("/")
        or ":" in rel
        or "" in rel.split("/")
        or "." in rel.split("/")
        or "\x00" in rel
    )


# ---------------------------------------------------------------------------------------------
# symbolic links
# ---------------------------------------------------------------------------------------------


def check_links(folder: str) -> None:
    """Refuse a symbolic link anywhere inside ``folder`` that leads outside it, with one
    exception: the layout of a Hugging Face cache snapshot (``<repo>/snapshots/<revision>/``),
    whose files link to ``<repo>/blobs/`` of the same repository cache."""
    root = os.path.realpath(folder)
    blobs = _hub_blobs(root)
    for current, dirs, files in os.walk(folder):
        for name in [*dirs, *files]:
            path = os.path.join(current, name)
            if not os.path.islink(path):
                continue
            resolved = os.path.realpath(path)
            if _inside(resolved, root):
                continue
            if blobs is not None and os.path.dirname(resolved) == blobs:
                continue
            raise CheckpointError(
                f"{path!r} is a symbolic link leading outside {folder!r} (to {resolved!r}); "
                "nothing is read from outside the folder given: replace the link by the file"
            )


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([root, path]) == root
    except ValueError:  # different drives
        return False


def _hub_blobs(root: str) -> str | None:
    """``<repo>/blobs`` when ``root`` lies in ``<repo>/snapshots/<revision>``, else None."""
    parts = root.split(os.sep)
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots":
            repo = os.sep.join(parts[:i]) or os.sep
            blobs = os.path.join(repo, "blobs")
            return os.path.realpath(blobs) if os.path.isdir(blobs) else None
    return None


# ---------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------


def owned_entries(folder: str) -> set[str]:
    """The top-level entries of an existing saved ``folder`` that a save of ours owns (and
    replaces): the names this library writes and the top-level entries its manifest lists.
    Dot-entries are never ours; everything else is the user's and is carried over."""
    ours = set(_OURS)
    try:
        old = read_manifest(folder)
    except CheckpointError:
        old = None
    if old is not None:
        ours |= {rel.split("/", 1)[0] for rel in old["files"]}
    return {name for name in ours if not name.startswith(".")}


def write_directory_atomically(
    target: str, write: Callable[[str], Any], manifest: bool = False
) -> None:
    """Call ``write(tmp_dir)``, add a manifest if asked (``manifest=True``: this library's own
    formats; `verify_manifest` checks it on load), and make ``tmp_dir`` the folder ``target``.

    The new set of files appears whole or not at all: ``tmp_dir`` is a sibling of ``target``
    that is swapped with it in one step where the platform can (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``: readers always find a complete folder), else renamed in after the old
    one is renamed away (briefly absent). The entries of an existing ``target`` that no save of
    ours owns (`owned_entries`: a README, ``.git``, a trainer's state) are hard-linked into the
    new folder, unchanged. Concurrent calls for one ``target`` end with one complete save (the
    last). If ``write`` fails, ``target`` is left as it was. Temporary siblings a killed save
    left behind are removed by the next save.

    Fusion and other multi-file saves of plugins use this too.
    """

    def write_all(tmp: str) -> None:
        write(tmp)
        if manifest:
            write_manifest(tmp)

    replace_directory(target, write_all, owned_entries)
