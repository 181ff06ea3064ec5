"""The archive's members: exactly the layout ``torch.export.save`` writes, or a refusal.

torch's zip reader finds members case-insensitively, unpickles pickled weights, constants and sample
inputs, and loads AOTInductor members as native libraries. :func:`read_members` accepts only the members
``torch.export.save`` writes, compared the way torch compares them (case-insensitively), stored
uncompressed and unencrypted under one top-level folder.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from maas.errors import InvalidInput
from maas.runtimes.base import brief

#: Extra file in the archive that names inputs and outputs (written by :func:`maas.runtimes.export.export`).
NAMES_FILE = "maas.json"

#: Members that ``torch.export.save`` writes under the archive's top folder.
PROGRAM = "models/model.json"
WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
CONSTANTS_CONFIG = "data/constants/model_constants_config.json"
SAMPLE_INPUTS = "data/sample_inputs/model.pt"
#: Every member ``torch.export.save`` writes under the archive's top folder, in the case it writes them.
_FIXED_MEMBERS = frozenset(
    {
        "archive_format",
        "archive_version",
        "byteorder",
        ".data/version",
        ".data/serialization_id",
        PROGRAM,
        WEIGHTS_CONFIG,
        CONSTANTS_CONFIG,
        SAMPLE_INPUTS,
    }
)
_REQUIRED_MEMBERS = ("archive_format", "archive_version", PROGRAM, WEIGHTS_CONFIG, CONSTANTS_CONFIG)
_PAYLOAD_MEMBER = re.compile(r"data/weights/weight_[0-9]{1,9}|data/constants/tensor_[0-9]{1,9}")
_EXTRA_MEMBER = re.compile(r"extra/[A-Za-z0-9_.-]{1,128}")
#: Largest JSON member read (the program of a large model is tens of MB).
_MAX_JSON_BYTES = 1 << 30


def refusal(path: Path) -> Callable[[str, str], InvalidInput]:
    """``refuse(what, why)``: the error refusing a part of the archive at ``path``, and what to do instead."""

    def refuse(what: str, why: str) -> InvalidInput:
        return InvalidInput(
            f"{path.name}: refusing to load {what}: {why}; maas loads only plain-tensor programs exactly as "
            "torch.export.save writes them (re-export the model with torch.export.save)"
        )

    return refuse


def _plain(name: str) -> bool:
    """A relative path of plain parts: no backslash, no absolute path or drive, no '.', '..' or empty part."""
    if not name or "\\" in name or "\x00" in name or name.startswith("/") or re.match(r"[A-Za-z]:", name):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def read_members(path: Path, zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """The archive's members by their name under its top folder, after refusing every member that is not
    one ``torch.export.save`` writes (see the module docstring)."""
    refuse = refusal(path)
    infos = zf.infolist()
    if not infos:
        raise InvalidInput(f"{path.name} is an empty zip archive, not a torch.export archive (.pt2)")
    root = infos[0].filename.split("/", 1)[0]
    members: dict[str, zipfile.ZipInfo] = {}
    folded: dict[str, str] = {}
    total = 0
    for info in infos:
        raw = info.filename
        if not _plain(raw):
            raise refuse(f"member {raw!r}", "its name is not a plain relative path (backslash, absolute or '..')")
        if raw.split("/", 1)[0] != root or "/" not in raw:
            raise refuse(f"member {raw!r}", f"the archive must hold one top-level folder ({root!r}) and only it")
        name = raw[len(root) + 1 :]
        # torch's reader finds members case-insensitively: two names that fold alike are one member to it.
        key = name.casefold()
        if key in folded:
            raise refuse(
                f"member {raw!r}",
                f"it collides with {folded[key]!r} (the same name, or one that differs only in case, which torch "
                "reads as the same member)",
            )
        folded[key] = raw
        if key.startswith("data/aotinductor/"):
            raise refuse(f"member {raw!r}", "AOTInductor members are native code")
        if key.startswith(("data/weights/", "data/constants/")) and key.endswith(".pt"):
            raise refuse(f"member {raw!r}", "legacy pickled weights")
        if key.startswith(("data/constants/custom_obj_", "data/constants/opaque_obj_")):
            raise refuse(f"member {raw!r}", "a custom object is pickled, and runs its own code")
        if name not in _FIXED_MEMBERS and not _PAYLOAD_MEMBER.fullmatch(name) and not _EXTRA_MEMBER.fullmatch(name):
            known = key in {m.casefold() for m in _FIXED_MEMBERS} or _PAYLOAD_MEMBER.fullmatch(key)
            why = (
                "its name differs in case from the one torch.export.save writes, and torch finds members "
                "case-insensitively"
                if known
                else "torch.export.save writes no such member"
            )
            raise refuse(f"member {raw!r}", why)
        if info.flag_bits & 0x1:
            raise refuse(f"member {raw!r}", "it is encrypted")
        if info.compress_type != zipfile.ZIP_STORED:
            raise refuse(f"member {raw!r}", "it is compressed (torch.export.save stores members uncompressed)")
        total += info.file_size
        members[name] = info
    # Stored members cannot add up to more than the archive: a guard against headers that lie.
    if total > path.stat().st_size:
        raise InvalidInput(f"{path.name}: its members claim {total} bytes, more than the archive holds")
    missing = [m for m in _REQUIRED_MEMBERS if m not in members]
    if missing:
        raise InvalidInput(
            f"{path.name} is not a torch.export.save archive: it lacks {', '.join(missing)}; "
            "re-export it with torch.export.save"
        )
    if zf.read(members["archive_format"]) != b"pt2" or zf.read(members["archive_version"]) != b"0":
        raise InvalidInput(
            f"{path.name} is not a torch.export.save archive of this torch version's format "
            f"(torch {torch.__version__}); re-export it with torch.export.save"
        )
    return members


def read_json(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Any:
    """A JSON member, at most ``_MAX_JSON_BYTES`` long; ``InvalidInput`` when it is not JSON."""
    if info.file_size > _MAX_JSON_BYTES:
        raise InvalidInput(f"{path.name}: member {info.filename!r} is larger than {_MAX_JSON_BYTES} bytes")
    try:
        return json.loads(zf.read(info))
    except (ValueError, RecursionError) as exc:
        raise InvalidInput(f"{path.name}: member {info.filename!r} is not JSON ({brief(exc)})") from None


def check_sample_inputs(path: Path, zf: zipfile.ZipFile, members: Mapping[str, zipfile.ZipInfo]) -> None:
    """Refuse sample inputs that torch's safe unpickler rejects. They are never used: maas does not give them
    to torch (see the package docstring); refusing them keeps archives that would make torch fall back to
    unpickling out of the registry."""
    info = members.get(SAMPLE_INPUTS)
    if info is None:
        return
    try:
        torch.load(io.BytesIO(zf.read(info)), weights_only=True)
    except Exception as exc:
        raise refusal(path)(repr(SAMPLE_INPUTS), "sample inputs that the safe unpickler rejects") from exc
