"""Model formats, each in its own module or sub-package, found by name and imported on first use.

Importing this package imports neither torch, onnx nor onnxruntime: the table below holds only module
paths, so ``maas --help`` and the registry stay fast.

The layers above use this package's functions (:func:`detect_format`, :func:`pack`, :func:`inspect`,
:func:`load`, :func:`get_format`) and, where they need a format's own tools, the public names of its
module or sub-package, each listed in that one's docstring and ``__all__``:

- :mod:`maas.runtimes.onnx`: ONNX files run by onnxruntime;
- :mod:`maas.runtimes.torch_export`: ``.pt2`` archives, loaded without torch's unsafe loader;
- :mod:`maas.runtimes.hf`: Hugging Face directories served as sentence embeddings;
- :mod:`maas.runtimes.causal_lm`: causal language models, from GGUF files or Hugging Face ``*ForCausalLM``
  directories;
- :mod:`maas.runtimes.export`: a ``torch.nn.Module`` exported to ONNX and ``.pt2``;
- :mod:`maas.runtimes.base`: the ``Runtime`` and ``Format`` protocols.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from maas.errors import InvalidInput, UnsupportedFormat
from maas.imports import load_entry
from maas.runtimes.base import Format, Runtime, brief
from maas.runtimes.causal_lm import is_causal_lm_config, marker_format  # stdlib only: no heavy import
from maas.tensors import Signature

#: format name -> "module:attribute" of its :class:`Format`.
FORMATS: dict[str, str] = {
    "onnx": "maas.runtimes.onnx:FORMAT",
    "torch_export": "maas.runtimes.torch_export:FORMAT",
    "hf_transformers": "maas.runtimes.hf:FORMAT",
    "causal_lm": "maas.runtimes.causal_lm:FORMAT",
}

#: file suffix -> format name, so detection needs no heavy import.
SUFFIXES: dict[str, str] = {".onnx": "onnx", ".pt2": "torch_export", ".gguf": "causal_lm"}
#: What a GGUF file (llama.cpp's format) starts with.
GGUF_MAGIC = b"GGUF"

_loaded: dict[str, Format] = {}


def get_format(name: str) -> Format:
    """The :class:`Format` registered under ``name``; ``UnsupportedFormat`` naming the known ones otherwise."""
    if name not in FORMATS:
        raise UnsupportedFormat(f"unknown model format {name!r}; known formats: {', '.join(sorted(FORMATS))}")
    if name not in _loaded:
        _loaded[name] = load_entry(FORMATS[name])
    return _loaded[name]


def detect_format(path: Path) -> str:
    """Guess an artifact's format from its suffix, else from its content; ``UnsupportedFormat`` if neither fits."""
    suffix = path.suffix.lower()
    if path.is_dir():
        if (path / "config.json").is_file():
            return "causal_lm" if is_causal_lm_config(path / "config.json") else "hf_transformers"
        raise UnsupportedFormat(
            f"{path} is a directory without config.json; maas registers directories only as Hugging Face "
            "models (config.json, tokenizer.json, safetensors weights or model.onnx)"
        )
    if suffix in SUFFIXES:
        return SUFFIXES[suffix]
    if path.is_file():
        if zipfile.is_zipfile(path):
            try:
                with zipfile.ZipFile(path) as zf:
                    names = zf.namelist()
                    packed = marker_format(zf)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
                raise InvalidInput(f"{path.name} is a damaged zip archive ({brief(exc)})") from None
            if packed is not None:
                return "causal_lm" if packed == "causal_lm" else "hf_transformers"
            if any(n.endswith("serialized_exported_program.json") or "/models/" in n for n in names):
                return "torch_export"
        else:
            with path.open("rb") as fh:
                head = fh.read(16)
            if head[:4] == GGUF_MAGIC:
                return "causal_lm"
            # An ONNX ModelProto starts with field 1 (ir_version, varint): tag byte 0x08.
            if head[:1] == b"\x08":
                return "onnx"
    raise UnsupportedFormat(
        f"cannot tell the format of {path.name}; name it with --format ({', '.join(sorted(FORMATS))}) "
        "or give the file a known suffix (.onnx, .pt2, .gguf)"
    )


def pack(path: Path, format: str, dest_dir: Path) -> Path:
    """The single file the registry stores for ``path``: ``path`` itself when it is a file; for a
    directory, the format's ``pack(directory, dest)`` writes one under ``dest_dir``."""
    if not path.is_dir():
        return path
    packer = getattr(get_format(format), "pack", None)
    if packer is None:
        raise InvalidInput(
            f"{path} is a directory; format {format!r} is stored as one file (give the model file), "
            "and only hf_transformers and causal_lm take a directory"
        )
    result: Path = packer(path, dest_dir / f"{path.name or 'model'}.zip")
    return result


def inspect(path: Path, format: str) -> Signature:
    return get_format(format).inspect(path)


def load(path: Path, format: str, *, device: str = "cpu", threads: int | None = None) -> Runtime:
    fmt = get_format(format)
    if threads is None:  # formats from other packages may predate the threads option
        return fmt.load(path, device=device)
    return fmt.load(path, device=device, threads=threads)


__all__ = ["FORMATS", "Format", "Runtime", "Signature", "detect_format", "get_format", "inspect", "load", "pack"]
