"""A GGUF file converted, once, into a Hugging Face directory the decoder loads in seconds.

transformers reads the GGUF (``gguf_file=``) and dequantises it to float32 (about 30 s for a 135M model); the
result is written under ``MAAS_HOME/cache/causal_lm/<sha256 of the GGUF>/``: ``config.json`` (without the
``quantization_config``), ``model.safetensors`` (Hugging Face names; a tied ``lm_head.weight`` left out, the
decoder ties it again), the tokenizer's files with the chat template, ``generation_config.json``, and
:data:`MANIFEST`, the size and sha256 of each of those files.

The cache is derived data: it is written into a temporary folder beside it and renamed into place (a crash never
leaves half of one visible), one process converts while others wait for it (two converting at once would both
succeed, the second rename losing), and every load checks it against its manifest (no file more, none
changed) and its weights with the safetensors checker, converting again when anything differs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from maas import envs
from maas.errors import InvalidInput
from maas.runtimes.base import brief
from maas.runtimes.causal_lm.gguf_model import check_gguf
from maas.runtimes.causal_lm.model_dir import read_causal_lm_dir
from maas.runtimes.hf.safetensors_check import check_safetensors

log = logging.getLogger(__name__)

MANIFEST = "maas-cache.json"
#: Bumped when the conversion changes, so caches written by an older one are converted again.
MANIFEST_VERSION = 1
WEIGHTS = "model.safetensors"
_CHUNK = 1 << 20
_HEX = re.compile(r"[0-9a-f]{64}")


def cache_root() -> Path:
    return Path(envs.MAAS_HOME) / "cache" / "causal_lm"


def gguf_digest(path: Path) -> str:
    """The GGUF's sha256 (hex). A file in the registry's artifact store (``.../sha256/<2 hex>/<64 hex>``) is named
    by it, and the registry checks that digest on every load, so it is taken from the name; any other file is
    hashed."""
    name = path.name
    if _HEX.fullmatch(name) and path.parent.name == name[:2] and path.parent.parent.name == "sha256":
        return name
    return _sha256(path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def damage(directory: Path) -> str | None:
    """What is wrong with a cached conversion (None: nothing): a missing manifest, a file it does not list, or one
    that is missing, has another size or digest than the manifest records, or weights the safetensors checker
    refuses."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("version") != MANIFEST_VERSION:
            return f"{MANIFEST} is from another version of maas"
        files = manifest["files"]
        if not isinstance(files, dict) or WEIGHTS not in files:
            return f"{MANIFEST} lists no {WEIGHTS}"
        # The loader reads more than the manifest names (chat_template.jinja, every *.safetensors): nothing else
        # may be there.
        extra = sorted(p.name for p in directory.iterdir() if p.name != MANIFEST and p.name not in files)
        if extra:
            return f"{extra[0][:80]!r} is not in {MANIFEST}"
        for name, entry in files.items():
            target = directory / name
            if "/" in name or name.startswith(".") or not target.is_file():
                return f"{name} is missing"
            if target.stat().st_size != entry["size"]:
                return f"{name} changed size"
            if _sha256(target) != entry["sha256"]:
                return f"{name} changed"
        check_safetensors(directory / WEIGHTS)
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{MANIFEST} is unreadable ({brief(exc)})"
    except InvalidInput as exc:
        return str(exc)
    return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (released by the OS if this process dies)."""
    with path.open("a+b") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process converting the same GGUF file")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def converted_dir(gguf: Path, *, root: Path | None = None) -> Path:
    """The Hugging Face directory converted from ``gguf``: from the cache, or, when the cache has none (or a damaged
    one), converted after :func:`~maas.runtimes.causal_lm.gguf_model.check_gguf` accepts the file. ``root``: the
    cache folder (default: ``MAAS_HOME/cache/causal_lm``)."""
    key = gguf_digest(gguf)
    root = cache_root() if root is None else root
    final = root / key
    if final.is_dir() and damage(final) is None:
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{key}.lock"):
        if final.is_dir():
            problem = damage(final)
            if problem is None:
                return final  # another process converted it while this one waited
            log.warning("the converted copy of %s in the cache is damaged (%s); converting again", gguf.name, problem)
            _discard(final)
        check_gguf(gguf)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".convert-"))
        try:
            convert(gguf, tmp, key)
            try:
                os.rename(tmp, final)
            except OSError:
                if damage(final) is not None:
                    raise
                # Another process converted it first, where the lock does not hold (a network file system).
            _fsync(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _discard(directory: Path) -> None:
    """Remove a cache folder: first renamed aside (one step), so no reader ever finds half of it."""
    aside = directory.with_name(f".discard-{directory.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(directory, aside)
    shutil.rmtree(aside, ignore_errors=True)


def convert(gguf: Path, out: Path, digest: str) -> None:
    """Write the Hugging Face directory for ``gguf`` (whose sha256 is ``digest``) into the empty folder ``out``,
    its manifest last; ``InvalidInput`` if transformers cannot read it or the result is no model maas runs."""
    log.info("converting GGUF %s to a Hugging Face directory (about 30 s, once)", gguf.name)
    started = time.monotonic()
    from_gguf(gguf, out)
    read_causal_lm_dir(out)  # refuse here what a load would refuse, before anything is cached
    files = {}
    for path in sorted(out.iterdir()):
        if not path.is_file() or path.is_symlink():  # damage() would refuse it on every load
            raise InvalidInput(f"{gguf.name}: the conversion wrote {path.name!r}, which is not a plain file")
        with path.open("rb") as fh:
            os.fsync(fh.fileno())
        files[path.name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"format": "causal_lm", "version": MANIFEST_VERSION, "source": f"sha256:{digest}", "files": files}
    with (out / MANIFEST).open("w", encoding="utf-8") as fh:
        fh.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    log.info("converted %s in %.1f s", gguf.name, time.monotonic() - started)


def from_gguf(gguf: Path, out: Path) -> None:
    """transformers' conversion: the model dequantised to float32 and the tokenizer, written into ``out``."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers takes a folder and a file name in it; the artifact store's file has no .gguf suffix and its
    # folder holds other artifacts, so it reads a link in a folder of its own.
    source = out / ".source"
    source.mkdir()
    (source / "model.gguf").symlink_to(gguf.resolve())
    options: dict[str, Any] = {"gguf_file": "model.gguf", "local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **options)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **options)
    except (ValueError, KeyError, TypeError, IndexError, NotImplementedError, OSError, RuntimeError) as exc:
        raise InvalidInput(f"{gguf.name}: transformers cannot read this GGUF file ({brief(exc)})") from None
    finally:
        shutil.rmtree(source)
    config: dict[str, Any] = json.loads(model.config.to_json_string(use_diff=False))
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["dtype"] = "float32"
    config["architectures"] = [type(model).__name__]  # a GGUF names none; what detection and checks look for
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    state = {name: t.detach().to(torch.float32).contiguous() for name, t in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # one storage with the embedding, which safetensors refuses to save twice
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt"})
    del state, model
    tokenizer.save_pretrained(str(out))
    # The generation settings a GGUF carries are its special token ids (what transformers derives from them too).
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    if generation:
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")


def _fsync(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
