from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from maas.registry import Registry
from maas.testing.models import make_linear_model, make_multi_io_model, make_text_model
from maas.testing.server import RemoteServer


def multi_io_inputs(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + batch)
    return {
        "x": rng.standard_normal((batch, 4)).astype(np.float32),
        "ids": rng.integers(-(2**40), 2**40, size=(batch, 3), dtype=np.int64),
        "mask": rng.integers(0, 2, size=(batch, 3)).astype(bool),
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RemoteServer, Registry, dict[str, Path]]]:
    """A server over a registry holding `multi` (three typed inputs/outputs) and `linear`."""
    home = tmp_path_factory.mktemp("served-home")
    files = {
        "multi": make_multi_io_model(tmp_path_factory.mktemp("m") / "multi.onnx", scale=3.0),
        "linear": make_linear_model(tmp_path_factory.mktemp("m") / "linear.onnx"),
        "text": make_text_model(tmp_path_factory.mktemp("m") / "text.onnx"),
    }
    reg = Registry(home=home)
    reg.register(files["multi"], "multi", alias="production")
    reg.register(files["linear"], "linear")
    reg.register(files["text"], "text")
    with RemoteServer(home, env={"MAAS_MAX_REQUEST_BYTES": str(1024 * 1024)}) as server:
        yield server, reg, files
