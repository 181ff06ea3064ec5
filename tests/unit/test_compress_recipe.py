"""Recipes and the plan over candidate kinds: every mistake is named before any work starts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from maas.compression.evaluation import accuracy, mean_cosine
from maas.compression.pipeline import plan
from maas.compression.recipe import load_recipe, parse_recipe
from maas.compression.report import version_points
from maas.errors import InvalidInput

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "compress"


def _err(data: object) -> str:
    with pytest.raises(InvalidInput) as info:
        parse_recipe(data)
    return str(info.value)


def test_examples_are_valid() -> None:
    files = sorted(EXAMPLES.glob("*.yaml"))
    assert len(files) >= 4
    for f in files:
        assert load_recipe(f).steps


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"steps": [{"type": "shrink"}]},
            "unknown step type 'shrink'; valid step types: prune, quantize, distill, export",
        ),
        ({"steps": [{"type": "prune", "amount": 1.5}]}, "steps.0.amount: Input should be less than 1"),
        ({"steps": [{"type": "prune", "amount": 0}]}, "steps.0.amount: Input should be greater than 0"),
        ({"steps": [{"type": "prune", "amount": 0.5, "sparsity": 1}]}, "unknown key 'steps.0.sparsity'"),
        ({"steps": [{"amount": 0.5}]}, "a step needs a 'type'"),
        ({"steps": []}, "steps"),
        ({"steps": [{"type": "quantize", "mode": "static"}]}, "mode 'static' needs calibration"),
        (
            {"steps": [{"type": "quantize", "backend": "torchao", "mode": "static"}]},
            "is not a mode of backend 'torchao'",
        ),
        (
            {"steps": [{"type": "distill", "student": {"factory": "not a path"}, "train": {"dataset": "a.b:c"}}]},
            "is not an import path",
        ),
        ({"steps": [{"type": "export", "format": "tflite"}]}, "steps.0.format"),
        ("prune everything", "must be a YAML mapping"),
    ],
)
def test_bad_recipes_name_the_problem(data: object, expected: str) -> None:
    assert expected in _err(data)


def test_a_list_of_steps_is_a_recipe() -> None:
    assert parse_recipe([{"type": "export", "format": "onnx"}]).steps[0].type == "export"


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [unclosed")
    with pytest.raises(InvalidInput, match="not valid YAML"):
        load_recipe(bad)


def _plan(steps: list[dict[str, object]], source: str) -> list[str]:
    return plan(parse_recipe({"steps": steps}), source)


def test_plan_follows_the_kinds() -> None:
    prune = {"type": "prune", "amount": 0.5}
    assert _plan([prune, {"type": "quantize"}], "onnx") == ["torch", "onnx"]
    assert _plan([prune, {"type": "export", "format": "torch_export"}], "torch_export") == ["torch", "torch"]
    assert _plan([{"type": "export", "format": "onnx"}, {"type": "quantize"}], "hf_transformers") == ["hf", "hf"]
    assert _plan([{"type": "prune", "amount": 0.25, "target": "heads"}], "hf_transformers") == ["hf"]


@pytest.mark.parametrize(
    ("steps", "source", "expected"),
    [
        (
            [{"type": "quantize"}, {"type": "prune", "amount": 0.5}],
            "onnx",
            "steps[1] (prune structured 0.5): cannot prune",
        ),
        ([{"type": "quantize", "backend": "torchao"}], "onnx", "torchao quantizes torch models"),
        ([{"type": "prune", "amount": 0.5}], "hf_transformers", "pruned by heads"),
        ([{"type": "prune", "amount": 0.5, "target": "heads"}], "onnx", "needs a Hugging Face transformer"),
        ([{"type": "quantize"}, {"type": "export", "format": "torch_export"}], "onnx", "int8 ONNX model cannot"),
        ([{"type": "export", "format": "torch_export"}], "hf_transformers", "stays a Hugging Face directory"),
        ([{"type": "export", "format": "onnx"}], "tflite", "cannot compress a model of format 'tflite'"),
    ],
)
def test_plan_refuses_steps_that_cannot_follow(steps: list[dict[str, object]], source: str, expected: str) -> None:
    with pytest.raises(InvalidInput) as info:
        _plan(steps, source)
    assert expected in str(info.value)


def test_metrics() -> None:
    labels = np.array([0, 1, 2, 1])
    scores = np.eye(3)[[0, 1, 1, 1]]
    assert accuracy(scores, labels) == 0.75
    assert accuracy(np.array([0, 1, 2, 2]), labels) == 0.75
    a = np.random.default_rng(0).normal(size=(5, 8))
    assert mean_cosine(a, 3 * a) == pytest.approx(1.0)
    assert mean_cosine(a, -a) == pytest.approx(-1.0)


def test_version_points_take_parents_from_childrens_reports() -> None:
    from maas.registry.entities import Lineage

    def m(version: int, size: int, metric: float) -> dict[str, object]:
        return {
            "uri": f"models:/m/{version}",
            "format": "onnx",
            "size_bytes": size,
            "parameters": size // 4,
            "latency_p50_ms_b1": 0.1,
            "latency_p50_ms_b32": 1.0,
            "throughput_b32": 32000.0,
            "metric_name": "accuracy",
            "metric": metric,
        }

    class V:
        def __init__(self, version: int, extra: dict[str, object]) -> None:
            self.name, self.version, self.lineage = "m", version, Lineage(extra=extra)

    report = {"parent": m(1, 1000, 0.95), "child": {**m(2, 500, 0.94), "uri": None}}
    points = version_points([V(1, {}), V(2, {"compression_report": report})])
    assert [(p["version"], p["parent_version"], p["size_bytes"]) for p in points] == [(1, None, 1000), (2, 1, 500)]


class _Scaled:
    """A stand-in runtime: scores = input @ w (its 'file' is a real .onnx-free path)."""

    def __init__(self, w: np.ndarray) -> None:
        from maas.tensors import Signature, TensorSpec

        self.w = w
        self.device = "cpu"
        self.signature = Signature(
            inputs=(TensorSpec("x", "FP32", (-1, 3)),), outputs=(TensorSpec("scores", "FP32", (-1, 2)),)
        )

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        return {"scores": inputs["x"] @ self.w}

    def close(self) -> None:
        pass


def test_compare_measures_parent_child_and_references(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from maas.compression import report as rep
    from maas.compression.recipe import EvaluationSpec

    monkeypatch.setattr(rep, "count_parameters", lambda path, fmt: path.stat().st_size // 4)
    files = {}
    for name, size in [("parent", 4000), ("child", 1000), ("ref", 2000)]:
        files[name] = tmp_path / name
        files[name].write_bytes(b"\0" * size)
    x = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    w = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32)
    labels = (x @ w).argmax(axis=1)
    labels[:4] = 1 - labels[:4]  # the parent gets 36 of 40 right
    data = rep.EvalData(inputs={"x": x}, labels=labels)
    spec = EvaluationSpec(dataset="a.b:c", latency_runs=5)
    result = rep.compare(
        (_Scaled(w), files["parent"], "onnx", "models:/m/1"),
        (_Scaled(-w), files["child"], "onnx", None),  # a child that gets the rest wrong: accuracy 0.1
        data,
        spec,
        references=[("fp32 before int8", (_Scaled(w), files["ref"], "onnx", None))],
    )
    assert result.parent.metric == pytest.approx(0.9) and result.child.metric == pytest.approx(0.1)
    assert result.metric_drop == pytest.approx(0.8)
    assert result.ratios()["size"] == pytest.approx(0.25)
    ref_label, ref = result.references[0]
    assert ref_label == "fp32 before int8" and ref.size_bytes == 2000
    assert result.to_dict()["references"][0]["child_ratios"]["size"] == pytest.approx(0.5)
    assert result.child_metrics()["accuracy"] == pytest.approx(0.1)
    from rich.console import Console

    from maas.cli.report_view import table

    console = Console(record=True, width=200)
    console.print(table(result))
    text = console.export_text()
    assert "child / fp32 before int8" in text and "4.00 KB" in text and "drop +0.8000" in text
