"""A causal-LM directory as one file: :mod:`maas.runtimes.hf.archive`'s deterministic zip, its marker naming
``causal_lm``, so detection tells it from an ``hf_transformers`` archive. Unpacking is that module's (the same
checks, the same cache under ``MAAS_HOME/cache/hf/``)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from maas.runtimes.hf.archive import MARKER
from maas.runtimes.hf.archive import pack as pack_directory

FORMAT_NAME = "causal_lm"
#: A marker is a few dozen bytes; a larger one is not read.
_MAX_MARKER = 4096


def pack(directory: Path, dest: Path) -> Path:
    """Write ``directory`` (checked by the caller) to ``dest`` as one zip whose marker names ``causal_lm``."""
    return pack_directory(directory, dest, format=FORMAT_NAME)


def marker_format(zf: zipfile.ZipFile) -> str | None:
    """The format a maas-packed directory's marker names (``hf_transformers`` when the marker names none, as the
    first archives did); None when ``zf`` holds no marker."""
    try:
        info = zf.getinfo(MARKER)
    except KeyError:
        return None
    if info.file_size > _MAX_MARKER:
        return "hf_transformers"
    try:
        data = json.loads(zf.read(info))
    except (ValueError, zipfile.BadZipFile, OSError):
        return "hf_transformers"
    value = data.get("format") if isinstance(data, dict) else None
    return value if isinstance(value, str) else "hf_transformers"


def is_packed(path: Path) -> bool:
    """True for a file :func:`pack` wrote."""
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return marker_format(zf) == FORMAT_NAME
    except (zipfile.BadZipFile, OSError):
        return False
