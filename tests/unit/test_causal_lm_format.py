"""The causal_lm format: detection, inspection and its refusals, the chat template's sandbox, the tokenizer, the
GGUF conversion cache (with transformers' step replaced by a copy, so no test here dequantises anything) and the
runtime on a tiny random Llama. The real SmolLM2 is converted and served in tests/integration."""

from __future__ import annotations

import json
import shutil
import struct
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from maas import runtimes
from maas.errors import InvalidInput, MaasError, UnsupportedFormat
from maas.registry import Registry
from maas.runtimes.causal_lm import (
    FORMAT,
    MAX_OIP_TOKENS,
    SIGNATURE,
    ChatTemplate,
    ChatTokenizer,
    check_gguf,
    gguf_cache,
    read_header,
)
from maas.runtimes.hf import pack as hf_pack
from tests.llm_fixtures import CHATML, write_tiny_gguf

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def copy_dir(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


# --- detection --------------------------------------------------------------------------------------------------


def test_detection(tiny_llm_dir: Path, tiny_gguf: Path, tmp_path: Path) -> None:
    assert runtimes.detect_format(tiny_llm_dir) == "causal_lm"
    assert runtimes.detect_format(tiny_gguf) == "causal_lm"
    bare = tmp_path / "model-without-suffix"
    shutil.copyfile(tiny_gguf, bare)
    assert runtimes.detect_format(bare) == "causal_lm"  # by the GGUF magic
    packed = FORMAT.pack(tiny_llm_dir, tmp_path / "packed.zip")
    assert runtimes.detect_format(packed) == "causal_lm"
    # The same machinery with the hf_transformers marker is still detected as hf_transformers.
    assert runtimes.detect_format(hf_pack(tiny_llm_dir, tmp_path / "hf.zip")) == "hf_transformers"
    encoder = copy_dir(tiny_llm_dir, tmp_path / "encoder")
    edit_json(encoder / "config.json", architectures=["BertModel"], model_type="bert")
    assert runtimes.detect_format(encoder) == "hf_transformers"
    assert runtimes.get_format("causal_lm") is FORMAT and ".gguf" in FORMAT.suffixes


def test_packing_is_deterministic_and_loads(tiny_llm_dir: Path, tmp_path: Path, home: Path) -> None:
    first = FORMAT.pack(tiny_llm_dir, tmp_path / "a.zip")
    second = FORMAT.pack(tiny_llm_dir, tmp_path / "b.zip")
    assert first.read_bytes() == second.read_bytes()
    assert FORMAT.inspect(first) == SIGNATURE
    runtime = FORMAT.load(first)
    assert runtime.directory.is_relative_to(home / "cache" / "hf")


# --- GGUF headers: refused fast and clearly ----------------------------------------------------------------------


def _header(tensors: int, keys: int, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, tensors, keys)


def _key(name: str, kind: int) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode() + struct.pack("<I", kind)


CRAFTED = {
    "wrong magic": (b"GGML" + b"\0" * 60, "not a GGUF file"),
    "empty": (b"", "not a GGUF file"),
    "truncated header": (b"GGUF\x03\x00", "truncated"),
    "version 1": (_header(0, 0, version=1), "version 1"),
    "big endian": (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    "absurd counts": (_header(2**63, 2**63) + b"\0" * 64, "claims"),
    "absurd key length": (_header(0, 1) + struct.pack("<Q", 2**60) + b"\0" * 64, "claims"),
    "absurd array length": (_header(0, 1) + _key("a", 9) + struct.pack("<IQ", 0, 2**62) + b"\0" * 64, "elements"),
    "absurd string in array": (_header(0, 1) + _key("a", 9) + struct.pack("<IQQ", 8, 1, 2**61) + b"\0" * 8, "needs"),
    "long metadata array": (_header(0, 1) + _key("a", 9) + struct.pack("<IQ", 0, 5000) + b"\0" * 5000, "at most 4,096"),
    "alignment not uint32": (
        _header(0, 1) + _key("general.alignment", 10) + struct.pack("<Q", 32) + b"\0" * 64,
        "uint32",
    ),
    "nested arrays": (_header(0, 1) + _key("a", 9) + struct.pack("<IQ", 9, 1) * 5 + b"\0" * 64, "deeper"),
    "unknown value type": (_header(0, 1) + _key("a", 99) + b"\0" * 64, "unknown value type"),
    "duplicate key": (_header(0, 2) + (_key("a", 0) + b"\1") * 2 + b"\0" * 64, "twice"),
    "tensor past the end": (
        _header(1, 0) + struct.pack("<Q", 1) + b"t" + struct.pack("<IQIQ", 1, 2**40, 0, 0) + b"\0" * 64,
        "beyond the file",
    ),
    "tensor of unknown type": (
        _header(1, 0) + struct.pack("<Q", 1) + b"t" + struct.pack("<IQIQ", 1, 4, 999, 0) + b"\0" * 64,
        "unknown ggml type",
    ),
    "tensor of rank 9": (
        _header(1, 0) + struct.pack("<Q", 1) + b"t" + struct.pack("<I", 9) + b"\0" * 128,
        "dimensions",
    ),
}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_gguf_is_refused_fast(case: str, tmp_path: Path) -> None:
    data, expected = CRAFTED[case]
    path = tmp_path / "crafted.gguf"
    path.write_bytes(data)
    with pytest.raises(InvalidInput, match=expected) as info:
        FORMAT.inspect(path)
    assert str(tmp_path) not in str(info.value)  # names the file, never the server's path


@pytest.mark.timeout(60)
def test_every_truncation_of_a_valid_gguf_is_refused(tiny_gguf: Path, tmp_path: Path) -> None:
    data = tiny_gguf.read_bytes()
    header = read_header(tiny_gguf)
    data_start = min(t.offset for t in header.tensors)
    path = tmp_path / "cut.gguf"
    for cut in [*range(0, data_start, max(1, data_start // 200)), data_start + 1, len(data) - 1]:
        path.write_bytes(data[:cut])
        with pytest.raises(InvalidInput):
            read_header(path)


def test_tiny_gguf_header_and_inspect(tiny_gguf: Path) -> None:
    header = read_header(tiny_gguf)
    assert header.version == 3 and header.get("general.architecture") == "llama"
    assert header.arrays["tokenizer.ggml.tokens"] == 300
    assert {t.name for t in header.tensors} >= {"token_embd.weight", "blk.1.ffn_down.weight", "output_norm.weight"}
    assert FORMAT.inspect(tiny_gguf) == SIGNATURE
    assert check_gguf(tiny_gguf).context_length == 64


@pytest.mark.parametrize(
    ("options", "error", "expected"),
    [
        ({"arch": "qwen2"}, UnsupportedFormat, "'qwen2' model; maas runs GGUF models of architecture llama"),
        ({"chat_template": None}, InvalidInput, "no chat template"),
        ({"chat_template": "{% for %}"}, InvalidInput, "does not compile"),
        ({"metadata": {"context_length": 0}}, InvalidInput, "context_length is 0"),
        ({"metadata": {"llama.rope.scaling.type": "yarn"}}, UnsupportedFormat, "scaled rotary"),
        ({"metadata": {"tokenizer.ggml.model": "t5"}}, InvalidInput, "no tokenizer"),
        # The decoder is allocated from the metadata before a weight is read: each dimension must be the tensors'.
        ({"metadata": {"block_count": 100_000}}, InvalidInput, "describes 100,000 layers"),
        ({"metadata": {"block_count": 3}}, InvalidInput, "describes 3 layers"),
        ({"metadata": {"embedding_length": 2**31}}, InvalidInput, "describes token_embd.weight as"),
        ({"metadata": {"rope.dimension_count": 2**31}}, InvalidInput, "describes blk.0.attn_q.weight as"),
        ({"metadata": {"attention.key_length": 16}}, InvalidInput, "key_length is 16 but the head size"),
        ({"metadata": {"feed_forward_length": 2**20}}, InvalidInput, "describes blk.0.ffn_gate.weight as"),
        ({"metadata": {"attention.head_count_kv": 2}}, InvalidInput, "describes blk.0.attn_k.weight as"),
        ({"metadata": {"attention.head_count_kv": 3}}, InvalidInput, "cannot share 3 key/value heads"),
        ({"metadata": {"vocab_size": 2**20}}, InvalidInput, "tokenizer.ggml.tokens holds 300 entries"),
        ({"metadata": {"context_length": 2**30}}, InvalidInput, "up to 16,777,216"),
    ],
)
def test_gguf_refusals(options: dict[str, Any], error: type[MaasError], expected: str, tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "model.gguf", **options)
    with pytest.raises(error, match=expected):
        FORMAT.inspect(path)


def test_real_smollm_gguf_inspects_without_dequantising(smollm_gguf: Path) -> None:
    header = read_header(smollm_gguf)
    assert header.get("llama.block_count") == 30 and header.get("llama.embedding_length") == 576
    assert len(header.tensors) == 272
    model = check_gguf(smollm_gguf)  # what FORMAT.inspect runs
    assert model.context_length == 8192 and "<|im_start|>" in model.chat_template


# --- Hugging Face directories: refusals ---------------------------------------------------------------------------


def _pickled(d: Path) -> None:
    (d / "model.safetensors").rename(d / "pytorch_model.bin")


def _auto_map(d: Path) -> None:
    edit_json(d / "config.json", auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})


def _no_template(d: Path) -> None:
    edit_json(d / "tokenizer_config.json", chat_template=None)


def _broken_template(d: Path) -> None:
    edit_json(d / "tokenizer_config.json", chat_template="{% if %}")


def _no_tokenizer(d: Path) -> None:
    (d / "tokenizer.json").unlink()


def _other_type(d: Path) -> None:
    edit_json(d / "config.json", architectures=["Phi3ForCausalLM"], model_type="phi3")


def _scaled_rope(d: Path) -> None:
    edit_json(d / "config.json", rope_scaling={"rope_type": "llama3", "factor": 8.0})


def _sliding_window(d: Path) -> None:
    edit_json(d / "config.json", architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=16)


def _huge_config(d: Path) -> None:
    edit_json(d / "config.json", vocab_size=10_000_000)


def _escaping_shard(d: Path) -> None:
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    index = {"weight_map": {"model.embed_tokens.weight": "../../outside.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _link_outside(d: Path) -> None:
    (d / "tokenizer_config.json").unlink()
    (d / "tokenizer_config.json").symlink_to(d.parent / "secret.json")


REFUSALS = {
    "pickled weights": (_pickled, InvalidInput, "pickled weights"),
    "auto_map": (_auto_map, InvalidInput, "auto_map"),
    "no chat template": (_no_template, InvalidInput, "no chat template"),
    "broken chat template": (_broken_template, InvalidInput, "does not compile"),
    "no tokenizer": (_no_tokenizer, InvalidInput, "no tokenizer.json"),
    "unsupported model type": (_other_type, UnsupportedFormat, "model types llama, mistral, qwen2"),
    "scaled rope": (_scaled_rope, UnsupportedFormat, "rope type 'llama3'"),
    "sliding window": (_sliding_window, UnsupportedFormat, "sliding-window"),
    "config larger than the weights": (_huge_config, InvalidInput, "describes about"),
    "shard outside the directory": (_escaping_shard, InvalidInput, "missing or invalid shards"),
    "link outside the directory": (_link_outside, InvalidInput, "outside the model directory"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_directory_refusals(case: str, tiny_llm_dir: Path, tmp_path: Path, registry: Registry) -> None:
    spoil, error, expected = REFUSALS[case]
    (tmp_path / "secret.json").write_text("{}")
    model = copy_dir(tiny_llm_dir, tmp_path / "model")
    spoil(model)
    with pytest.raises(error, match=expected) as info:
        FORMAT.inspect(model)
    assert str(tmp_path) not in str(info.value)
    with pytest.raises(error):
        registry.register(model, "refused", format="causal_lm")
    assert registry.list_models() == []


def test_wrong_architecture_is_not_a_causal_lm(tiny_llm_dir: Path, tmp_path: Path) -> None:
    encoder = copy_dir(tiny_llm_dir, tmp_path / "encoder")
    edit_json(encoder / "config.json", architectures=["BertModel"], model_type="bert")
    with pytest.raises(UnsupportedFormat, match="ForCausalLM"):
        FORMAT.inspect(encoder)


def test_chat_template_jinja_file_wins(tiny_llm_dir: Path, tmp_path: Path) -> None:
    model = copy_dir(tiny_llm_dir, tmp_path / "model")
    _no_template(model)
    (model / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert FORMAT.inspect(model) == SIGNATURE
    assert ChatTokenizer(model).apply_chat_template([{"role": "user", "content": "x"}]) == "[x]"


# --- the chat template: rendered as transformers does, in a sandbox -----------------------------------------------


def test_chat_template_renders_like_transformers_helpers() -> None:
    template = ChatTemplate(
        "{% for m in messages %}{{ m['content'] | tojson }}{% generation %}!{% endgeneration %}{% endfor %}"
        "{% if add_generation_prompt %}{{ bos_token }}{% endif %}"
    )
    text = template.render([{"role": "user", "content": "<b>é"}], add_generation_prompt=True, bos_token="<s>")
    assert text == '"<b>é"!<s>'  # tojson keeps HTML characters and non-ASCII text as they are


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ messages.__class__.__mro__[1].__subclasses__() }}", "refused|failed"),
        ("{% set _ = messages.append(1) %}", "refused|failed"),
        ("{{ raise_exception('a system message is required') }}", "a system message is required"),
        ("{{ messages[0]['content'] + 1 }}", "failed on the messages"),
        ("{% for i in range(10**9) %}{% endfor %}", "refused|failed"),
    ],
)
def test_chat_template_sandbox(source: str, expected: str) -> None:
    with pytest.raises(InvalidInput, match=expected):
        ChatTemplate(source).render([{"role": "user", "content": "x"}], add_generation_prompt=True)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "source",
    [
        "{{ 'x' * 10**10 }}",
        "{{ 2 ** 100000 }}",
        "{% set ns = namespace(n=2) %}{% for i in range(100) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
        "{{ 'x'.ljust(10**10) }}",
        "{{ 'x'|center(10000000000) }}",  # folded as it compiles: refused there too
        "{{ ('a' * 1000).replace('', 'b' * 1000) }}",
        "{{ '%999999999d' % 1 }}",
        "{{ '{:>{w}}'.format(1, w=999999999) }}",
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        "{% set ns = namespace(s=[1]) %}{% for i in range(64) %}{% set ns.s = [ns.s, ns.s] %}{% endfor %}{{ ns.s }}",
        "{% set l = ['x' * 60000] * 60000 %}{{ l|join }}",
        "{% for i in range(100000) %}{% for j in range(100000) if j < 0 %}{% endfor %}{% endfor %}",
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
        "{% set x %}{% for i in range(100000) %}{{ 'y' * 60000 }}{% endfor %}{% endset %}",
        "{{ [1]|batch(10**9, 'a')|list }}",
        "{{ lipsum(10**6) }}",
        "{{ messages|tojson(indent=10**9) }}",
    ],
)
def test_chat_template_render_is_bounded(source: str) -> None:
    with pytest.raises(InvalidInput, match=r"refused|failed"):
        ChatTemplate(source).render([{"role": "user", "content": "x"}], add_generation_prompt=True)


def test_chat_template_bounds_grow_with_the_input() -> None:
    long = [{"role": "user", "content": "y" * 300_000}]
    assert len(ChatTemplate(CHATML).render(long, add_generation_prompt=True)) > 300_000
    assert len(ChatTemplate("{{ messages[0].content * 3 }}").render(long, add_generation_prompt=True)) == 900_000
    with pytest.raises(InvalidInput, match="at most"):
        ChatTemplate("{{ messages[0].content * 5 }}").render(long, add_generation_prompt=True)


def test_chat_template_that_does_not_compile() -> None:
    with pytest.raises(InvalidInput, match="does not compile"):
        ChatTemplate("{% for m in messages %}")


def test_messages_must_be_a_list_of_objects() -> None:
    with pytest.raises(InvalidInput, match="list of objects"):
        ChatTemplate(CHATML).render(["hi"], add_generation_prompt=True)  # type: ignore[list-item]


# --- the tokenizer --------------------------------------------------------------------------------------------------


def test_tokenizer_on_the_tiny_model(tiny_llm_dir: Path) -> None:
    tok = ChatTokenizer(tiny_llm_dir)
    im_start, im_end = tok.encode("<|im_start|>"), tok.encode("<|im_end|>")
    assert im_start == [1] and im_end == [2]
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>" and tok.vocab_size == 300
    assert 2 in tok.eos_token_ids
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hello, wörld 東京"}])
    assert prompt == "<|im_start|>user\nHello, wörld 東京<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(prompt)
    assert ids[0] == 1 and ids.count(2) == 1
    # Token bytes put back together are the text, byte for byte, also where a token holds part of a character.
    assert b"".join(tok.token_bytes(i) for i in ids) == prompt.encode()
    assert tok.decode(ids) == "user\nHello, wörld 東京\nassistant\n"  # special tokens skipped
    assert tok.decode(ids, skip_special=False) == prompt
    assert tok.token_text(2) == "<|im_end|>" and tok.token_bytes(10**6) == b""


def test_turn_end_token_joins_the_eos_ids(tiny_llm_dir: Path, tmp_path: Path) -> None:
    model = copy_dir(tiny_llm_dir, tmp_path / "model")
    edit_json(model / "config.json", eos_token_id=0)
    edit_json(model / "tokenizer_config.json", eos_token="<|endoftext|>")
    # <|im_end|> (2) is named nowhere as eos, but the template ends every turn with it.
    assert ChatTokenizer(model).eos_token_ids == frozenset({0, 2})


# --- the runtime on a tiny random Llama -----------------------------------------------------------------------------


def test_runtime_completes_each_row_greedily(tiny_llm_dir: Path) -> None:
    runtime = runtimes.load(tiny_llm_dir, "causal_lm", threads=1)
    assert runtime.signature == SIGNATURE and runtime.batches_rows is False and runtime.device == "cpu"
    assert runtime.context_length == 64 and 2 in runtime.eos_token_ids
    prompts = ["Hello world", "The quick brown fox"]
    out = runtime.infer({"text_input": np.array([p.encode() for p in prompts], dtype=np.object_)})
    assert set(out) == {"text_output"}
    texts = out["text_output"]
    assert texts.dtype == np.object_ and texts.shape == (2,) and all(isinstance(t, bytes) for t in texts)
    for prompt, text in zip(prompts, texts, strict=True):
        ids = runtime.tokenizer.encode(prompt, special=True)
        expected = runtime.model.greedy(ids, MAX_OIP_TOKENS, runtime.eos_token_ids)
        assert text == runtime.tokenizer.decode(expected).encode()
    runtime.close()
    with pytest.raises(RuntimeError, match="closed"):
        runtime.infer({"text_input": np.array([b"x"], dtype=np.object_)})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (np.array([b""], dtype=np.object_), "empty"),
        (np.array([b"word " * 100], dtype=np.object_), "context holds 64 tokens"),
        (np.array([b"\xff\xfe"], dtype=np.object_), "not UTF-8"),
        (np.array([[b"a"]], dtype=np.object_), "shape"),
        (np.array([3], dtype=np.object_), "int"),
    ],
)
def test_runtime_refuses_bad_prompts(value: np.ndarray, expected: str, tiny_llm_dir: Path) -> None:
    runtime = FORMAT.load(tiny_llm_dir)
    with pytest.raises(InvalidInput, match=expected):
        runtime.infer({"text_input": value})


def test_register_a_directory(tiny_llm_dir: Path, registry: Registry) -> None:
    version = registry.register(tiny_llm_dir, "tiny")
    assert version.format == "causal_lm" and version.signature == SIGNATURE
    path = registry.artifact_path(version)
    with zipfile.ZipFile(path) as zf:
        assert "model.safetensors" in zf.namelist()
    runtime = runtimes.load(path, version.format)
    assert runtime.infer({"text_input": np.array([b"Hello"], dtype=np.object_)})["text_output"].shape == (1,)


# --- the GGUF conversion cache (transformers' step replaced by copying the tiny model) ----------------------------


@pytest.fixture
def fake_conversion(tiny_llm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Conversions run: each copies the tiny model's files into the folder it is given."""
    calls: list[Path] = []

    def from_gguf(gguf: Path, out: Path) -> None:
        calls.append(gguf)
        time.sleep(0.2)  # long enough for a second thread to arrive while the first converts
        for file in tiny_llm_dir.iterdir():
            shutil.copyfile(file, out / file.name)

    monkeypatch.setattr(gguf_cache, "from_gguf", from_gguf)
    return calls


def _entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))


def test_cache_is_keyed_by_digest_and_converted_once(
    tiny_gguf: Path, fake_conversion: list[Path], home: Path, tmp_path: Path
) -> None:
    digest = gguf_cache.gguf_digest(tiny_gguf)
    first = gguf_cache.converted_dir(tiny_gguf)
    assert first == home / "cache" / "causal_lm" / digest
    assert gguf_cache.converted_dir(tiny_gguf) == first and len(fake_conversion) == 1
    assert _entries(first.parent) == [digest]  # no temporary folder left behind
    manifest = json.loads((first / gguf_cache.MANIFEST).read_text())
    assert manifest["source"] == f"sha256:{digest}" and "model.safetensors" in manifest["files"]
    # The same content under another name (registered twice, or copied) uses the same cache.
    other = tmp_path / "renamed.gguf"
    shutil.copyfile(tiny_gguf, other)
    assert gguf_cache.converted_dir(other) == first and len(fake_conversion) == 1


def test_artifact_store_names_are_trusted_only_in_the_store(tiny_gguf: Path, tmp_path: Path) -> None:
    fake = "ab" + "0" * 62
    store = tmp_path / "sha256" / "ab"
    store.mkdir(parents=True)
    shutil.copyfile(tiny_gguf, store / fake)
    assert gguf_cache.gguf_digest(store / fake) == fake  # the registry checks this digest on every load
    elsewhere = tmp_path / fake
    shutil.copyfile(tiny_gguf, elsewhere)
    assert gguf_cache.gguf_digest(elsewhere) == gguf_cache.gguf_digest(tiny_gguf)  # hashed, whatever its name


def _flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "spoil",
    [
        lambda d: _flip_byte(d / "model.safetensors", -3),
        lambda d: _flip_byte(d / "model.safetensors", 9),  # the safetensors header
        lambda d: (d / "tokenizer.json").unlink(),
        lambda d: (d / gguf_cache.MANIFEST).unlink(),
        lambda d: (d / gguf_cache.MANIFEST).write_text("[]"),
        lambda d: edit_json(d / gguf_cache.MANIFEST, version=0),
        lambda d: (d / "chat_template.jinja").write_text("{{ 'planted' }}"),  # the loader would prefer it
        lambda d: shutil.copyfile(d / "model.safetensors", d / "more.safetensors"),  # and read these too
        lambda d: (d / "sub").mkdir(),
    ],
    ids=[
        "weights",
        "weights header",
        "tokenizer",
        "manifest gone",
        "manifest junk",
        "manifest version",
        "planted template",
        "planted weights",
        "planted folder",
    ],
)
def test_damaged_cache_is_converted_again(
    spoil: Any, tiny_gguf: Path, fake_conversion: list[Path], home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = gguf_cache.converted_dir(tiny_gguf)
    spoil(directory)
    assert gguf_cache.damage(directory) is not None
    assert gguf_cache.converted_dir(tiny_gguf) == directory and len(fake_conversion) == 2
    assert gguf_cache.damage(directory) is None
    assert "damaged" in caplog.text
    assert FORMAT.load(tiny_gguf).directory == directory


def test_failed_conversion_leaves_nothing(tiny_gguf: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise InvalidInput("transformers cannot read this GGUF file")

    monkeypatch.setattr(gguf_cache, "from_gguf", broken)
    with pytest.raises(InvalidInput, match="cannot read"):
        FORMAT.load(tiny_gguf)
    assert _entries(home / "cache" / "causal_lm") == []


def test_concurrent_loads_convert_once(tiny_gguf: Path, fake_conversion: list[Path], home: Path) -> None:
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(gguf_cache.converted_dir(tiny_gguf))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1 and len(fake_conversion) == 1
    assert gguf_cache.damage(results[0]) is None
