"""The ``causal_lm`` format and its runtime: a causal language model, from a Hugging Face directory or a GGUF file.

Every form ends as a Hugging Face directory (:func:`hf_directory`): a directory as given, a packed one extracted by
:mod:`maas.runtimes.hf.archive`, a GGUF file converted once into a cache (:mod:`.gguf_cache`). The runtime holds
the decoder (:mod:`.model`, torch, imported on load), the tokenizer and chat template (:mod:`.tokenizer`). Its
Open Inference Protocol face completes each ``text_input`` row greedily; chat and sampling are the OpenAI API's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from maas.errors import InvalidInput
from maas.runtimes.base import resolve_device, select_outputs
from maas.runtimes.causal_lm.archive import is_packed, pack
from maas.runtimes.causal_lm.gguf_header import MAGIC, read_header
from maas.runtimes.causal_lm.gguf_model import check_gguf
from maas.runtimes.causal_lm.model_dir import CausalLMDir, read_causal_lm_dir
from maas.runtimes.causal_lm.tokenizer import ChatTokenizer
from maas.runtimes.hf.archive import unpack
from maas.tensors import Signature, TensorSpec

if TYPE_CHECKING:
    from maas.runtimes.causal_lm.model import DecoderLM

log = logging.getLogger(__name__)

#: New tokens an Open Inference Protocol request gets per row (the OpenAI API sets its own).
MAX_OIP_TOKENS = 64
#: Prompts one Open Inference Protocol request may hold (completed one after another).
MAX_OIP_ROWS = 16
SIGNATURE = Signature(
    inputs=(TensorSpec("text_input", "BYTES", (-1,)),),
    outputs=(TensorSpec("text_output", "BYTES", (-1,)),),
)


def is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as fh:
        return fh.read(4) == MAGIC


def hf_directory(path: Path) -> Path:
    """The Hugging Face directory of an artifact in any form (not yet checked by :func:`read_causal_lm_dir`):
    ``path`` itself, the packed directory extracted, or the GGUF file converted (once, then from the cache)."""
    path = Path(path)
    if path.is_dir():
        return path
    if is_packed(path):
        return unpack(path)
    if path.is_file() and is_gguf(path):
        from maas.runtimes.causal_lm.gguf_cache import converted_dir

        return converted_dir(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        read_header(path)  # says what the file starts with instead of a GGUF header
    raise InvalidInput(
        f"{path.name} is neither a GGUF file, a Hugging Face causal-LM directory nor a directory packed by maas; "
        "give a .gguf file or a directory with config.json, tokenizer.json and safetensors weights"
    )


class CausalLMRuntime:
    """A loaded causal language model. Safe to share between threads: each call keeps its own KV cache."""

    #: Rows are separate prompts, each generated on its own: requests are not concatenated.
    batches_rows = False

    def __init__(self, model: DecoderLM, tokenizer: ChatTokenizer, info: CausalLMDir, device: str) -> None:
        self.signature = SIGNATURE
        self.device = device
        #: The decoder (:class:`~maas.runtimes.causal_lm.model.DecoderLM`).
        self.model = model
        self.tokenizer = tokenizer
        #: Longest prompt plus completion, in tokens.
        self.context_length = min(info.context_length, model.context_length)
        self.eos_token_ids: frozenset[int] = tokenizer.eos_token_ids
        #: The Hugging Face directory the model was loaded from (a cache for GGUF files).
        self.directory = info.root
        self._closed = False

    def infer(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Each ``text_input`` row (UTF-8) is a prompt, completed greedily with up to :data:`MAX_OIP_TOKENS` new
        tokens, ending early at an end-of-sequence token; ``text_output`` holds the completions (UTF-8)."""
        model = self.model
        if self._closed:
            raise RuntimeError("this causal_lm runtime was closed; load the model again")
        names = select_outputs(self.signature, outputs)
        if "text_input" not in inputs:
            raise InvalidInput(
                "missing input 'text_input'; the model takes text_input (BYTES [-1], one prompt per row)"
            )
        texts = _texts(np.asarray(inputs["text_input"]))
        if len(texts) > MAX_OIP_ROWS:
            raise InvalidInput(
                f"input 'text_input' has {len(texts)} prompts; this endpoint completes at most {MAX_OIP_ROWS} per "
                "request (one after another): send more requests, or use /v1/completions, which batches them"
            )
        prompts = [self._prompt_ids(i, text) for i, text in enumerate(texts)]
        completions = []
        for ids in prompts:
            new = model.greedy(ids, min(MAX_OIP_TOKENS, self.context_length - len(ids)), self.eos_token_ids)
            completions.append(self.tokenizer.decode(new).encode("utf-8"))
        result = np.empty(len(completions), dtype=np.object_)
        result[:] = completions
        return {name: result for name in names}

    def _prompt_ids(self, row: int, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, special=True)
        if not ids:
            raise InvalidInput(f"input 'text_input' row {row} is empty; give a prompt of at least one token")
        if len(ids) >= self.context_length:
            raise InvalidInput(
                f"input 'text_input' row {row} has {len(ids):,} tokens; the model's context holds "
                f"{self.context_length:,} tokens, prompt and completion together: shorten the prompt"
            )
        return ids

    def count_tokens(
        self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray] | None = None
    ) -> tuple[int, int]:
        """(prompt tokens, completion tokens) of a request and its answer, for usage and limits: the prompts as
        :meth:`infer` encodes them, the completions by encoding their text again (which can differ from the ids
        generated by a token where a text re-tokenises otherwise)."""
        prompt = sum(len(self.tokenizer.encode(t, special=True)) for t in _texts(np.asarray(inputs["text_input"])))
        done = (outputs or {}).get("text_output")
        completion = 0 if done is None else sum(len(self.tokenizer.encode(t)) for t in _texts(np.asarray(done)))
        return prompt, completion

    def close(self) -> None:
        self._closed = True


def _texts(array: np.ndarray) -> list[str]:
    if array.ndim != 1:
        raise InvalidInput(f"input 'text_input' has shape {list(array.shape)}; expected [-1], one prompt per row")
    texts = []
    for i, value in enumerate(array.tolist()):
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, bytes | bytearray):
            try:
                texts.append(bytes(value).decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise InvalidInput(
                    f"input 'text_input' row {i} is not UTF-8 ({exc}); encode prompts as UTF-8"
                ) from None
        else:
            raise InvalidInput(f"input 'text_input' row {i} is {type(value).__name__}; send BYTES (UTF-8 text)")
    return texts


class CausalLMFormat:
    """The ``causal_lm`` format: a GGUF file, a Hugging Face causal-LM directory, or one packed by :func:`pack`."""

    name = "causal_lm"
    suffixes: tuple[str, ...] = (".gguf",)

    def inspect(self, path: Path) -> Signature:
        """Checks the artifact without loading its weights (a GGUF file: its header only)."""
        path = Path(path)
        if path.is_file() and not is_packed(path):
            check_gguf(path)
            return SIGNATURE
        info = read_causal_lm_dir(hf_directory(path))
        ChatTokenizer(info.root)  # a tokenizer.json that does not load is an invalid artifact
        return SIGNATURE

    def load(self, path: Path, *, device: str = "cpu", threads: int | None = None) -> CausalLMRuntime:
        """Loads the decoder on the CPU (``device`` cuda falls back to it, with a warning). A GGUF file is
        converted the first time (about 30 s for a 135M model) and read from the cache afterwards."""
        started = time.monotonic()
        used = resolve_device(device, cuda_available=False, runtime="the causal_lm runtime (CPU only)")
        info = read_causal_lm_dir(hf_directory(Path(path)))
        tokenizer = ChatTokenizer(info.root)
        from maas.runtimes.causal_lm.model import DecoderLM

        model = DecoderLM.from_pretrained_dir(info.root, threads=threads)
        log.info("loaded %s (%s) on %s in %.1f s", Path(path).name, info.model_type, used, time.monotonic() - started)
        return CausalLMRuntime(model, tokenizer, info, used)

    def pack(self, directory: Path, dest: Path) -> Path:
        """Write ``directory`` as the single file the registry stores, after checking it."""
        info = read_causal_lm_dir(directory)
        ChatTokenizer(info.root)
        return pack(directory, dest)


FORMAT = CausalLMFormat()
