"""The one config loader: a recipe and a training config report a mistake the same way, with the file, the
line and the valid keys."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from maas import configfile
from maas.compression.recipe import load_recipe
from maas.errors import InvalidInput
from maas.training.config import load_config

RECIPE = """\
evaluation: {dataset: maas.demo.digits:test_dataset}
steps:
  - type: prune
    amount: 0.5
    sparsity: 0.2
"""

TRAIN = """\
model:
  factory: maas.demo.digits:mlp
data:
  train: maas.demo.digits:train_dataset
optimizer:
  name: adam
  lrate: 0.1
batch_size: 64
steps: 10
"""

# One shape for both: the file, the line, the key's path and the valid keys of its section.
UNKNOWN_KEY = re.compile(
    r"^(?P<file>\S+) is not a valid (recipe|training config):\n  - line (?P<line>\d+): unknown key"
)


def _error(load: object, path: Path) -> str:
    with pytest.raises(InvalidInput) as info:
        load(path)  # type: ignore[operator]
    return str(info.value)


def test_a_recipe_names_the_valid_keys_the_file_and_the_line(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    message = _error(load_recipe, path)
    match = UNKNOWN_KEY.match(message)
    assert match and match["file"] == str(path) and match["line"] == "5", message
    assert "unknown key 'steps.0.sparsity'" in message
    assert "valid keys: type, method, amount, target, scope, layers, finetune" in message


def test_a_training_config_names_the_valid_keys_the_file_and_the_line(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text(TRAIN)
    message = _error(load_config, path)
    match = UNKNOWN_KEY.match(message)
    assert match and match["file"] == str(path) and match["line"] == "7", message
    assert "unknown key 'optimizer.lrate'" in message
    assert "valid keys: name, lr, weight_decay, momentum, betas" in message


def test_every_kind_of_mistake_gets_its_line(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text(
        TRAIN.replace("  lrate: 0.1", "  lr: -1\n  betas: [0.9, fast]")  # lines 7 and 8
        .replace("batch_size: 64", "batch_size: sixty-four\npublish: {alias: prod}")  # lines 9 and 10
        .replace("  name: adam", "  name: lamb")  # line 6
    )
    lines = _error(load_config, path).splitlines()[1:]
    assert lines == [
        "  - line 6: optimizer.name: Input should be 'sgd', 'adam', 'adamw' or 'rmsprop' (got 'lamb')",
        "  - line 7: optimizer.lr: Input should be greater than 0 (got -1)",
        "  - line 8: optimizer.betas.1: Input should be a valid number, unable to parse string as a number "
        "(got 'fast')",
        "  - line 9: batch_size: Input should be a valid integer, unable to parse string as an integer "
        "(got 'sixty-four')",
        "  - line 10: missing key 'publish.name'; it is required",  # a missing key: its section's line
    ]


def test_the_chosen_member_of_a_union_is_not_part_of_the_key(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text(TRAIN.replace("  lrate: 0.1\n", "") + "strategy:\n  name: ddp\n  bakend: gloo\n")
    message = _error(load_config, path)
    assert "line 11: unknown key 'strategy.bakend' (did you mean 'backend'?); valid keys: name, backend" in message
    path.write_text(TRAIN.replace("  lrate: 0.1\n", "") + "strategy:\n  name: allreduce\n")
    assert "line 10: strategy.name: unknown value 'allreduce'; valid values: 'single', 'ddp'" in _error(
        load_config, path
    )


def test_a_recipe_of_steps_alone_keeps_its_lines(tmp_path: Path) -> None:
    path = tmp_path / "steps.yaml"
    path.write_text("- type: export\n  format: onnx\n- type: shrink\n")
    message = _error(load_recipe, path)
    assert "line 3: steps.1.type: unknown step type 'shrink'; valid step types: prune, quantize" in message


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = Field(1, ge=1)


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["a", "b"]
    inner: Inner = Inner()
    items: list[Inner] = []


def test_a_mapping_is_checked_without_lines() -> None:
    with pytest.raises(InvalidInput) as info:
        configfile.parse({"kind": "c", "items": [{"size": 0}, {"colour": 1}]}, Outer, what="thing", source="it")
    assert str(info.value).splitlines() == [
        "it is not a valid thing:",
        "  - kind: Input should be 'a' or 'b' (got 'c')",
        "  - items.0.size: Input should be greater than or equal to 1 (got 0)",
        "  - unknown key 'items.1.colour'; valid keys: size",
    ]
    with pytest.raises(InvalidInput, match=r"it must be a YAML mapping of keys \(kind, …\); it is a list"):
        configfile.parse([1], Outer, source="it")
    assert configfile.parse({"kind": "a", "inner": {"size": 2}}, Outer).inner.size == 2


def test_lines_of_keys_and_list_items() -> None:
    text = "kind: a\ninner:\n  size: 3\nitems:\n  - size: 1\n  -\n    size: 2\n"
    assert configfile.key_lines(text) == {
        ("kind",): 1,
        ("inner",): 2,
        ("inner", "size"): 3,
        ("items",): 4,
        ("items", "0"): 5,
        ("items", "0", "size"): 5,
        ("items", "1"): 7,
        ("items", "1", "size"): 7,
    }
    assert configfile.key_lines("") == {}


def test_aliases_are_walked_once() -> None:
    # Ten levels of ten aliases each stand for 10**10 keys; the lines of the text are what is walked.
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    started = time.perf_counter()
    lines = configfile.key_lines("\n".join(levels) + "\n")
    assert time.perf_counter() - started < 5
    assert lines[("a9",)] == 10 and len(lines) < 200


def test_only_safe_yaml(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("kind: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(InvalidInput, match="is not valid YAML"):
        configfile.load(path, Outer)
    with pytest.raises(InvalidInput, match=r"thing file .* does not exist"):
        configfile.load(tmp_path / "missing.yaml", Outer, what="thing")
