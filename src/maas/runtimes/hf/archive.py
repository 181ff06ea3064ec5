"""A model directory as one file, and back: how the registry stores ``hf_transformers`` artifacts.

The registry's artifacts are single content-addressed files. :func:`pack` writes a directory as one
uncompressed zip with sorted member names, fixed timestamps and permissions, so the same directory
always packs to the same bytes (and the same digest). :func:`unpack` extracts such a file, once, into
``MAAS_HOME/cache/hf/`` after checking every member name, and returns the directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import unicodedata
import zipfile
from collections.abc import Iterator
from pathlib import Path

from maas import envs
from maas.errors import InvalidInput
from maas.runtimes.base import brief

log = logging.getLogger(__name__)

#: Member that marks a packed Hugging Face directory (written by :func:`pack`).
MARKER = "maas-hf.json"
_EPOCH = (1980, 1, 1, 0, 0, 0)
_MAX_MEMBERS = 10_000
_CHUNK = 1 << 20
#: Files left out of the pack: pickles are never loaded; these are other frameworks' copies of the weights.
_SKIPPED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack", ".ot")
#: Top-level folders left out: the hub's alternative exports (the runtime reads only a top-level model.onnx).
_SKIPPED_DIRS = ("onnx", "openvino")


def _hub_blobs(root: Path) -> Path | None:
    """The ``blobs/`` folder of the Hugging Face hub repo whose snapshot ``root`` is (or lies in), else None.
    The hub stores files once in ``<repo>/blobs/`` and links them from ``<repo>/snapshots/<revision>/``."""
    for folder in (root, *root.parents):
        if folder.parent.name == "snapshots" and (folder.parent.parent / "blobs").is_dir():
            return (folder.parent.parent / "blobs").resolve()
    return None


def _link_target(root: Path, blobs: Path | None, path: Path, rel: str) -> Path:
    """The file a symlink under ``root`` leads to, if it stays inside ``root`` or the hub's ``blobs/``."""
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):  # dangling, or a loop
        raise InvalidInput(f"{rel} is a broken symbolic link; remove it and register again") from None
    if target.is_relative_to(root) or (blobs is not None and target.is_relative_to(blobs)):
        return target
    raise InvalidInput(
        f"{rel} is a symbolic link to a file outside the model directory; maas stores only the directory's own "
        "files (and, for a Hugging Face hub snapshot, the files in its repo's blobs/). Copy the file in "
        "(cp -L) and register again"
    )


def _walk(directory: Path) -> Iterator[tuple[str, Path | None]]:
    """(member name, file to read) for every file under ``directory`` that :func:`member_files` considers;
    the file is None for one left out by suffix. Symlinks are checked as :func:`member_files` says."""
    root = directory.resolve()
    blobs = _hub_blobs(root)
    for current, dirs, files in os.walk(root):
        here = Path(current)
        for d in list(dirs):
            if d.startswith(".") or (here == root and d in _SKIPPED_DIRS):
                dirs.remove(d)
            elif (here / d).is_symlink():
                raise InvalidInput(
                    f"{(here / d).relative_to(root).as_posix()} is a symlink to a directory; copy the model with "
                    "`cp -rL` and register the copy"
                )
        for name in files:
            path = here / name
            rel = path.relative_to(root).as_posix()
            if name.startswith(".") or rel == MARKER:
                continue
            if name.lower().endswith(_SKIPPED_SUFFIXES):
                yield rel, None
                continue
            source = _link_target(root, blobs, path, rel) if path.is_symlink() else path
            if not source.is_file():  # a FIFO, socket or device is no model file
                raise InvalidInput(f"{rel} is not a regular file (or a link to one); remove it and register again")
            yield rel, source


def check_links(directory: Path) -> None:
    """Refuse a directory holding a symlink that leads outside it (see :func:`member_files`)."""
    for _ in _walk(directory):
        pass


def member_files(directory: Path) -> list[tuple[str, Path]]:
    """(member name, file) for every file to pack, sorted by name. Hidden entries (``.git``, …), the files
    in ``_SKIPPED_SUFFIXES`` and the folders in ``_SKIPPED_DIRS`` are left out. A symlink to a file is
    stored as the file it points to, only when that file lies inside the directory or, for a Hugging Face
    hub snapshot (``<repo>/snapshots/<revision>``), in the repo's ``blobs/``; any other symlink, and a
    symlink to a directory, is refused, so registering a directory never reads a file outside it."""
    out = []
    for rel, source in _walk(directory):
        if source is None:
            log.info("not packing %s (pickled or other-framework weights; maas never loads them)", rel)
            continue
        out.append((rel, source))
    return sorted(out)


def _info(name: str, size: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_EPOCH)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    info.create_system = 3  # Unix, on every platform, so the bytes do not depend on where we packed
    info.file_size = size  # lets zipfile decide ZIP64 up front for members over 4 GiB
    return info


def pack(directory: Path, dest: Path, *, format: str = "hf_transformers") -> Path:
    """Write ``directory`` to ``dest`` as one deterministic, uncompressed zip (see the module docstring).

    The caller checks that the directory is a valid model first. ``format``: the format the marker names (another
    format that stores Hugging Face directories, such as ``causal_lm``, packs them here too). Returns ``dest``.
    """
    members = member_files(directory)
    marker = json.dumps({"format": format, "version": 1}, sort_keys=True).encode()
    entries: list[tuple[str, Path | bytes]] = sorted([*members, (MARKER, marker)], key=lambda e: e[0])
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, source in entries:
            if isinstance(source, bytes):
                zf.writestr(_info(name, len(source)), source)
                continue
            with source.open("rb") as src, zf.open(_info(name, source.stat().st_size), "w") as out:
                shutil.copyfileobj(src, out, _CHUNK)
    return dest


def is_packed(path: Path) -> bool:
    """True for a file :func:`pack` wrote (a zip holding the marker member)."""
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return MARKER in zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def _check(path: Path, zf: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """The members to extract, after refusing anything that could write outside the target directory,
    collide with another member, or expand beyond the archive's own size."""
    infos = zf.infolist()
    if len(infos) > _MAX_MEMBERS:
        raise InvalidInput(f"{path.name}: more than {_MAX_MEMBERS} members; pack the directory with maas")
    total = 0
    # Member paths folded as a case-insensitive file system sees them -> the member that claimed it, and
    # whether as a file or a directory.
    claimed: dict[str, tuple[str, bool]] = {}

    def claim(key: str, name: str, is_dir: bool) -> None:
        other = claimed.get(key)
        if other is not None and (not is_dir or not other[1]):
            raise InvalidInput(
                f"{path.name}: refusing member {name!r}: it collides with member {other[0]!r} (the same path, one "
                "that differs only in case or Unicode form, or a file where the other needs a folder); pack the "
                "directory with maas"
            )
        claimed.setdefault(key, (name, is_dir))

    for info in infos:
        name = info.filename
        parts = (name[:-1] if name.endswith("/") else name).split("/")
        if (
            not name
            or name.startswith("/")
            or "\\" in name
            or "\x00" in name
            or re.match(r"^[A-Za-z]:", name)
            or any(p in ("", "..", ".") for p in parts)
        ):
            raise InvalidInput(f"{path.name}: refusing member {name!r}: its path escapes the model directory")
        if any(len(p.encode()) > 255 for p in parts) or len(parts) > 64:
            raise InvalidInput(f"{path.name}: refusing member {name!r}: its path is too long or too deep")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise InvalidInput(f"{path.name}: refusing member {name!r}: it is a symbolic link")
        if info.flag_bits & 0x1:
            raise InvalidInput(f"{path.name}: refusing member {name!r}: it is encrypted; pack directories with maas")
        if info.compress_type != zipfile.ZIP_STORED:
            raise InvalidInput(f"{path.name}: member {name!r} is compressed; pack directories with maas (stored)")
        folded = [unicodedata.normalize("NFC", p).casefold() for p in parts]
        for depth in range(1, len(folded)):
            claim("/".join(folded[:depth]), name, True)
        claim("/".join(folded), name, info.is_dir())
        total += info.file_size
    # Stored members cannot add up to more than the archive: a guard against headers that lie.
    if total > path.stat().st_size:
        raise InvalidInput(f"{path.name}: its members claim {total} bytes, more than the archive holds")
    return [i for i in infos if not i.is_dir()]


def _cache_key(path: Path) -> str:
    st = path.stat()
    # Registry artifacts are named by their sha256 and never change; any other file may, so add its mtime.
    if re.fullmatch(r"[0-9a-f]{64}", path.name):
        return f"{path.name}-{st.st_size}"
    return f"{path.name}-{st.st_size}-{st.st_mtime_ns}"


def unpack(path: Path) -> Path:
    """The model directory for ``path``: ``path`` itself when it is a directory, else the packed file
    extracted (once; later calls reuse it) under ``MAAS_HOME/cache/hf/``."""
    path = Path(path)
    if path.is_dir():
        return path
    if not is_packed(path):
        raise InvalidInput(
            f"{path.name} is neither a Hugging Face model directory nor a directory packed by maas (no {MARKER})"
        )
    final = Path(envs.MAAS_HOME) / "cache" / "hf" / _cache_key(path)
    if (final / MARKER).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".extract-"))
    try:
        with zipfile.ZipFile(path) as zf:
            for info in _check(path, zf):
                target = tmp / info.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, target.open("wb") as out:  # zf.open checks each member's CRC
                    shutil.copyfileobj(src, out, _CHUNK)
                    out.flush()
                    os.fsync(out.fileno())
        if final.exists() and not (final / MARKER).is_file():
            shutil.rmtree(final)  # left by an extraction from before the marker check; never a complete one
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MARKER).is_file():
                raise
            # Another process or thread extracted the same artifact first; use its copy.
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as exc:
        raise InvalidInput(f"{path.name} is a damaged zip archive: {brief(exc)}") from None
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
    return final
