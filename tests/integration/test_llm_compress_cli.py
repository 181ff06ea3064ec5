"""`maas compress` of the real SmolLM2-135M-Instruct (registered as its GGUF, the converted copy seeded into the
cache) to int8 weights, in a real process: the report measures speed and quality against the parent, the child is
registered with its lineage, and the stored artifact loads with the causal_lm format and answers a chat."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from maas.registry import Registry

pytestmark = pytest.mark.slow

#: A shorter evaluation than the default (four texts and prompts, 16 new tokens): this test checks the path.
RECIPE = """\
steps:
  - type: quantize
    backend: torchao
    mode: weight_only
evaluation:
  dataset: maas.compression.llm.texts:paragraphs
  limit: 4
  new_tokens: 16
"""


def _maas(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "maas", *args], env=env, capture_output=True, text=True, timeout=900)


def test_compress_smollm_to_int8(tmp_path: Path, smollm_gguf: Path, seed_smollm: Callable[[Path], None]) -> None:
    home = tmp_path / "home"
    seed_smollm(home)
    env = {**os.environ, "MAAS_HOME": str(home), "COLUMNS": "200", "NO_COLOR": "1"}
    out = _maas(env, "models", "register", str(smollm_gguf), "--name", "smollm")
    assert out.returncode == 0, out.stderr
    (tmp_path / "int8.yaml").write_text(RECIPE)
    report_file = tmp_path / "report.json"
    out = _maas(
        env, "compress", "smollm", "--recipe", str(tmp_path / "int8.yaml"), "--name", "smollm-int8",
        "--max-metric-drop", "0.3", "--report-json", str(report_file),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr + out.stdout
    assert "registered models:/smollm-int8/1" in out.stdout
    for row in ("decode tokens/s, 1 sequence", "decode tokens/s, 8 sequences", "perplexity", "greedy agreement"):
        assert row in out.stdout

    report = json.loads(report_file.read_text())
    parent, child = report["parent"], report["child"]
    assert parent["uri"] == "models:/smollm/1" and child["runs_as"] == "int8 weights, bfloat16 activations"
    for m in (parent, child):
        assert m["tokens_per_s_b1"] > 0 and m["tokens_per_s_b8"] > 0 and m["ms_per_token_b1"] > 0
        assert math.isfinite(m["perplexity"]) and 1 < m["perplexity"] < 200
    assert child["perplexity"] < parent["perplexity"] * 1.1  # int8 weights cost little
    assert child["metric"] >= 0.8 and report["metric_drop"] == pytest.approx(1 - child["metric"])
    assert child["weight_bytes"] < parent["weight_bytes"] * 0.6
    assert child["parameters"] == parent["parameters"] == 134_515_008
    assert report["settings"] == {
        "prompts": 4, "new_tokens": 16, "texts": 4, "text_tokens": report["settings"]["text_tokens"],
        "rounds": 3, "threads": 1, "batch": 8,
    }  # fmt: skip

    reg = Registry(home=home)
    mv = reg.resolve("smollm-int8")
    assert mv.format == "causal_lm" and mv.lineage.parent == "models:/smollm/1"
    assert mv.tags["compressed_from"] == "models:/smollm/1"
    assert mv.lineage.extra["recipe"]["steps"][0]["mode"] == "weight_only"
    assert mv.lineage.extra["compression_report"]["child"]["perplexity"] == child["perplexity"]
    assert mv.metrics["greedy_agreement"] == pytest.approx(child["metric"])

    from maas.runtimes.causal_lm.runtime import FORMAT

    rt = FORMAT.load(reg.artifact_path(mv))  # the stored file, as `maas serve` loads it
    tok = rt.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]))
    answer = tok.decode(rt.model.greedy(prompt, 12, rt.eos_token_ids))
    assert "Paris" in answer
