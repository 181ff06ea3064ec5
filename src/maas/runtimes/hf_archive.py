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
import zipfile
from pathlib import Path, PurePosixPath

from maas import envs
from maas.errors import InvalidInput

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


def member_files(directory: Path) -> list[tuple[str, Path]]:
    """(member name, file) for every file to pack, sorted by name. Hidden entries (``.git``, …), the files
    in ``_SKIPPED_SUFFIXES`` and the folders in ``_SKIPPED_DIRS`` are left out; a symlink to a file is
    stored as the file it points to (Hugging Face hub snapshots are links into a blob store), a symlink to
    a directory is refused."""
    out = []
    for current, dirs, files in os.walk(directory):
        here = Path(current)
        for d in list(dirs):
            if d.startswith(".") or (here == directory and d in _SKIPPED_DIRS):
                dirs.remove(d)
            elif (here / d).is_symlink():
                raise InvalidInput(
                    f"{here / d} is a symlink to a directory; copy the model with `cp -rL` and register the copy"
                )
        for name in files:
            path = here / name
            rel = path.relative_to(directory).as_posix()
            if name.startswith(".") or rel == MARKER:
                continue
            if name.lower().endswith(_SKIPPED_SUFFIXES):
                log.info("not packing %s (pickled or other-framework weights; maas never loads them)", rel)
                continue
            if not path.is_file():  # follows links: a dangling link, FIFO or socket is no model file
                raise InvalidInput(f"{path} is not a regular file (or a link to one); remove it and register again")
            out.append((rel, path))
    return sorted(out)


def _info(name: str, size: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_EPOCH)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    info.create_system = 3  # Unix, on every platform, so the bytes do not depend on where we packed
    info.file_size = size  # lets zipfile decide ZIP64 up front for members over 4 GiB
    return info


def pack(directory: Path, dest: Path) -> Path:
    """Write ``directory`` to ``dest`` as one deterministic, uncompressed zip (see the module docstring).

    The caller checks that the directory is a valid model first. Returns ``dest``.
    """
    members = member_files(directory)
    marker = json.dumps({"format": "hf_transformers", "version": 1}, sort_keys=True).encode()
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
    """The members to extract, after refusing anything that could write outside the target directory
    or expand beyond the archive's own size."""
    infos = zf.infolist()
    names = [i.filename for i in infos]
    if len(infos) > _MAX_MEMBERS or len(set(names)) != len(names):
        raise InvalidInput(f"{path.name}: more than {_MAX_MEMBERS} members, or a member listed twice")
    total = 0
    for info in infos:
        name = info.filename
        parts = PurePosixPath(name).parts
        if (
            not name
            or name.startswith("/")
            or "\\" in name
            or re.match(r"^[A-Za-z]:", name)
            or any(p in ("..", ".") for p in parts)
        ):
            raise InvalidInput(f"{path.name}: refusing member {name!r}: its path escapes the model directory")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise InvalidInput(f"{path.name}: refusing member {name!r}: it is a symbolic link")
        if info.compress_type != zipfile.ZIP_STORED:
            raise InvalidInput(f"{path.name}: member {name!r} is compressed; pack directories with maas (stored)")
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
            f"{path} is neither a Hugging Face model directory nor a directory packed by maas (no {MARKER})"
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
    except zipfile.BadZipFile as exc:
        raise InvalidInput(f"{path.name} is a damaged zip archive: {exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
    return final
