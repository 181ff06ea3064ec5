"""Compressing causal language models on a tiny random Llama: the int8 layout (quantization, its round trip, its
refusals of malformed artifacts), the int8 child's logits against the parent's, the teacher-forced forward the
measurements use, the recipe checks, and `compress` end to end (registered with lineage, or refused). The real
SmolLM2 goes through `maas compress` in tests/integration/test_llm_compress_cli.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from maas.compression.llm import measure
from maas.compression.llm.plan import DEFAULT_NEW_TOKENS, llm_plan
from maas.compression.llm.quantize import write_child
from maas.compression.pipeline import MetricDropTooLarge, compress, plan
from maas.compression.recipe import parse_recipe
from maas.errors import InvalidInput
from maas.registry import Registry
from maas.runtimes.causal_lm import read_causal_lm_dir
from maas.runtimes.causal_lm.model import DecoderLM
from maas.runtimes.causal_lm.quantized import DEQUANTIZE_ROWS, SCALE_SUFFIX, Int8Linear, quantize_weight
from tests.llm_fixtures import write_tiny_llm_dir

pytestmark = pytest.mark.unit

INT8 = {"type": "quantize", "backend": "torchao", "mode": "weight_only"}
#: A quick evaluation: two texts and prompts, eight new tokens.
QUICK = {"dataset": "maas.compression.llm.texts:paragraphs", "limit": 2, "new_tokens": 8}
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose layer widths (32, 64) the int8 kernel takes, with room for the prompts."""
    return write_tiny_llm_dir(
        tmp_path_factory.mktemp("llm") / "parent", hidden_size=32, intermediate_size=64, max_position_embeddings=256
    )


@pytest.fixture(scope="module")
def int8_dir(parent_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("llm-int8") / "child"
    write_child(parent_dir, out, "weight_only")
    return out


def _load(directory: Path) -> DecoderLM:
    return DecoderLM.from_pretrained_dir(directory, weights="float32")


# --- the int8 layout --------------------------------------------------------------------------------------------


def test_quantize_weight_round_trips_within_half_a_step() -> None:
    w = torch.randn(24, 64) * torch.logspace(-3, 1, 24)[:, None]  # rows of very different magnitudes
    w[5] = 0.0
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (24,)
    assert torch.equal(scale.to(torch.bfloat16).float(), scale)  # exact in bfloat16: the kernel loses nothing
    assert scale[5] == 1.0 and not q[5].any()
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    assert torch.equal(q.abs().amax(dim=1)[scale != 1.0], torch.full((23,), 127, dtype=torch.int8))
    error = (q.float() * scale[:, None] - w).abs()
    assert bool((error <= scale[:, None] * 0.5 * (1 + 2**-7)).all())


def test_int8_child_holds_int8_weights_and_float32_scales(parent_dir: Path, int8_dir: Path) -> None:
    config = json.loads((int8_dir / "config.json").read_text())
    assert config["maas_quantization"] == {"method": "int8_weight_only", "scheme": "per_channel_symmetric"}
    tensors = load_file(str(int8_dir / "model.safetensors"))
    parent = load_file(str(parent_dir / "model.safetensors"))
    for name, w in parent.items():
        if name.endswith("norm.weight"):
            assert tensors[name].dtype == torch.float32 and SCALE_SUFFIX not in name
            continue
        q, scale = tensors[name], tensors[name + SCALE_SUFFIX]
        assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (w.shape[0],)
        assert torch.allclose(q.float() * scale[:, None], w, atol=float(scale.max()) / 2 + 1e-7)
    for copied in ("tokenizer.json", "tokenizer_config.json"):
        assert (int8_dir / copied).read_bytes() == (parent_dir / copied).read_bytes()
    read_causal_lm_dir(int8_dir)  # the causal_lm format's checks accept it


def test_int8_child_runs_int8_kernels_with_logits_close_to_the_parent(parent_dir: Path, int8_dir: Path) -> None:
    parent, child = _load(parent_dir), _load(int8_dir)
    assert child.dtype == torch.bfloat16
    assert sum(isinstance(m, Int8Linear) for m in child.modules()) == 2 * 4 + 1  # every layer and the tied head
    assert isinstance(child.embed, torch.nn.Embedding) and child.embed.weight.dtype == torch.bfloat16
    ids = list(range(3, 40))
    p, c = measure.all_logits(parent, ids), measure.all_logits(child, ids)
    assert float((p - c).abs().max()) <= 0.05 * float(p.abs().max())
    assert float((p.argmax(-1) == c.argmax(-1)).float().mean()) >= 0.8
    # Decoding (the serving path) agrees with the teacher-forced forward the measurements use.
    cache = child.new_cache(len(ids))
    assert torch.allclose(child.prefill(ids, cache)[0], c[-1], atol=0.05 * float(c.abs().max()))


def test_int8_linear_dequantizes_for_long_inputs_with_the_same_result() -> None:
    q, scale = quantize_weight(torch.randn(96, 64))
    layer = Int8Linear(q, scale, None)
    x = torch.randn(2 * DEQUANTIZE_ROWS, 64).to(torch.bfloat16)
    long = layer(x).float()  # dequantized weights, one matmul
    short = torch.cat([layer(x[i : i + 4]) for i in range(0, len(x), 4)]).float()  # the int8 kernel
    reference = x.float() @ (q.float() * scale[:, None]).T
    for out in (long, short):
        assert float((out - reference).abs().max()) <= 0.02 * float(reference.abs().max())


def test_layers_too_narrow_for_the_kernel_run_dequantized(tiny_llm_dir: Path, tmp_path: Path) -> None:
    write_child(tiny_llm_dir, tmp_path / "int8", "weight_only")  # hidden 16: only `down` (32 wide) takes the kernel
    parent, child = _load(tiny_llm_dir), _load(tmp_path / "int8")
    assert sum(isinstance(m, Int8Linear) for m in child.modules()) == 2
    ids = list(range(3, 30))
    p, c = measure.all_logits(parent, ids), measure.all_logits(child, ids)
    assert float((p - c).abs().max()) <= 0.1 * float(p.abs().max())  # 16 wide: coarse scales, bfloat16 sums


def test_all_logits_matches_prefill(parent_dir: Path) -> None:
    model = _load(parent_dir)
    ids = [5, 9, 17, 2, 44, 8, 100, 7]
    rows = measure.all_logits(model, ids)
    for n in (1, 4, len(ids)):
        assert torch.allclose(model.prefill(ids[:n], model.new_cache(n))[0], rows[n - 1], atol=1e-5)


def test_bfloat16_child_computes_in_bfloat16(parent_dir: Path, tmp_path: Path) -> None:
    write_child(parent_dir, tmp_path / "bf16", "bfloat16")
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(tmp_path / "bf16" / "model.safetensors")).values())
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert _load(tmp_path / "bf16").dtype == torch.bfloat16


def test_an_int8_parent_is_refused(int8_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="already int8"):
        write_child(int8_dir, tmp_path / "again", "weight_only")


# --- malformed int8 artifacts -----------------------------------------------------------------------------------


def _broken(int8_dir: Path, dest: Path, change: Any, config: dict[str, Any] | None = None) -> Path:
    shutil.copytree(int8_dir, dest)
    tensors = load_file(str(dest / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(dest / "model.safetensors"))
    if config is not None:
        path = dest / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return dest


def _set(name: str, value: torch.Tensor) -> Any:
    return lambda t: t.__setitem__(name, value)


def _nan_scale(t: dict[str, torch.Tensor]) -> None:
    t[Q_PROJ + SCALE_SUFFIX][3] = float("nan")


def _int8_norm(t: dict[str, torch.Tensor]) -> None:
    t["model.norm.weight"] = torch.ones(32, dtype=torch.int8)


@pytest.mark.parametrize(
    ("change", "config", "message"),
    [
        (_set(Q_PROJ + SCALE_SUFFIX, torch.ones(32, dtype=torch.float16)), None, "scales are float32"),
        (lambda t: t.pop(Q_PROJ + SCALE_SUFFIX), None, "is missing"),
        (_nan_scale, None, "NaN, infinite or negative scale"),
        (_set(Q_PROJ + SCALE_SUFFIX, torch.ones(31)), None, r"one scale per output channel: \(32,\)"),
        (_set(Q_PROJ, torch.ones(32, 30, dtype=torch.int8)), None, r"has shape \(32, 30\); the config says 32"),
        (_set(Q_PROJ, torch.ones(32, 32, dtype=torch.uint8)), None, "has dtype torch.uint8"),
        (_set(Q_PROJ, torch.full((32, 32), -128, dtype=torch.int8)), None, r"lie in \[-127, 127\]"),
        (_int8_norm, None, "only the linear weights"),
        (lambda t: None, {"maas_quantization": {"method": "gptq"}}, "int8_weight_only"),
    ],
    ids=[
        "scale-dtype", "missing-scale", "nan-scale", "scale-shape", "weight-shape", "weight-dtype", "minus-128",
        "int8-norm", "unknown-method",
    ],
)  # fmt: skip
def test_malformed_int8_artifacts_are_refused(
    int8_dir: Path, tmp_path: Path, change: Any, config: dict[str, Any] | None, message: str
) -> None:
    broken = _broken(int8_dir, tmp_path / "broken", change, config)
    with pytest.raises(InvalidInput, match=message):
        _load(broken)


def test_up_proj_scale_without_int8_weight_named(int8_dir: Path, tmp_path: Path) -> None:
    def float_up(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.0.mlp.up_proj.weight"] = torch.zeros(64, 32)

    with pytest.raises(InvalidInput, match=r"up_proj.weight_scale is a scale without an int8 weight"):
        _load(_broken(int8_dir, tmp_path / "broken", float_up))


# --- recipes ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ({"steps": [{"type": "prune", "amount": 0.5}]}, "takes one step"),
        ({"steps": [INT8, INT8]}, "takes one step"),
        ({"steps": [{"type": "quantize", "backend": "onnxruntime"}]}, "cannot quantize a causal_lm model"),
        ({"steps": [{"type": "quantize", "backend": "torchao", "mode": "dynamic"}]}, "mode: bfloat16"),
        ({"steps": [{**INT8, "per_channel": False}]}, "sets per_channel"),
        ({"steps": [INT8], "evaluation": {"dataset": "maas.demo.digits:test_dataset"}}, "non-empty list of texts"),
        ({"steps": [INT8], "evaluation": {**QUICK, "metric": "accuracy"}}, "evaluation sets metric"),
    ],
)
def test_llm_recipes_that_cannot_run_are_refused(recipe: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        llm_plan(parse_recipe(recipe))


def test_llm_plan_defaults_and_overrides() -> None:
    default = llm_plan(parse_recipe({"steps": [INT8]}))
    assert default.mode == "weight_only" and default.new_tokens == DEFAULT_NEW_TOKENS
    assert len(default.texts) >= 10 and len(default.prompts) == 8
    quick = llm_plan(parse_recipe({"steps": [{**INT8, "mode": "bfloat16"}], "evaluation": QUICK}))
    assert (quick.mode, len(quick.texts), len(quick.prompts), quick.new_tokens) == ("bfloat16", 2, 2, 8)


def test_bfloat16_mode_is_refused_for_other_formats() -> None:
    with pytest.raises(InvalidInput, match="mode bfloat16 is for causal_lm models"):
        plan(parse_recipe({"steps": [{**INT8, "mode": "bfloat16"}]}), "torch_export")


# --- compress, end to end ---------------------------------------------------------------------------------------


def test_compress_registers_the_int8_child_with_lineage(parent_dir: Path, registry: Registry, tmp_path: Path) -> None:
    parent = registry.register(parent_dir, "tiny", format="causal_lm")
    recipe = {"steps": [INT8], "evaluation": QUICK}
    result = compress(
        "tiny", recipe, "tiny-int8", alias="candidate", registry=registry, report_path=tmp_path / "r.json"
    )
    mv, report = result.version, result.report
    assert mv.format == "causal_lm" and mv.lineage.parent == parent.uri and mv.tags["compressed_from"] == parent.uri
    extra = mv.lineage.extra
    assert extra["recipe_hash"].startswith("sha256:") and extra["parent_digest"] == parent.artifact_digest
    saved = json.loads((tmp_path / "r.json").read_text())
    assert extra["compression_report"]["child"]["perplexity"] == saved["child"]["perplexity"]
    assert saved["kind"] == "causal_lm" and saved["settings"]["new_tokens"] == 8
    child = saved["child"]
    assert child["runs_as"] == "int8 weights, bfloat16 activations"
    assert child["tokens_per_s_b1"] > 0 and child["tokens_per_s_b8"] > 0 and child["ms_per_token_b1"] > 0
    assert 0 < child["metric"] <= 1 and saved["parent"]["metric"] == 1.0
    assert child["size_bytes"] < saved["parent"]["size_bytes"] and child["parameters"] == saved["parent"]["parameters"]
    assert mv.metrics["greedy_agreement"] == pytest.approx(child["metric"])
    assert registry.resolve("models:/tiny-int8@candidate").version == mv.version
    assert report.child.uri == mv.uri
    from maas.runtimes.causal_lm.runtime import FORMAT

    loaded = FORMAT.load(registry.artifact_path(mv))  # the stored artifact, as serving loads it
    assert any(isinstance(m, Int8Linear) for m in loaded.model.modules())


def test_compress_refuses_a_child_below_the_agreement_threshold(parent_dir: Path, registry: Registry) -> None:
    registry.register(parent_dir, "tiny", format="causal_lm")
    recipe = {"steps": [INT8], "evaluation": QUICK}
    with pytest.raises(MetricDropTooLarge, match="greedy agreement") as caught:
        compress("tiny", recipe, "tiny-int8", max_metric_drop=0.0, registry=registry)
    assert caught.value.report.metric_drop > 0
    assert [m.name for m in registry.list_models()] == ["tiny"]


def test_the_cli_draws_an_llm_report(parent_dir: Path, registry: Registry, tmp_path: Path) -> None:
    from rich.console import Console

    from maas.cli.report_view import plot, table, versions_table
    from maas.compression.report import version_points

    registry.register(parent_dir, "tiny", format="causal_lm")
    result = compress("tiny", {"steps": [INT8], "evaluation": QUICK}, "tiny", registry=registry)
    console = Console(width=200, record=True)
    console.print(table(result.report))
    points = version_points(registry.list_versions("tiny"))
    console.print(versions_table(points))
    text = console.export_text()
    assert "decode tokens/s, 8 sequences" in text and "greedy agreement" in text and "perplexity" in text
    assert plot(points, "tiny", tmp_path / "tiny.png").stat().st_size > 0
