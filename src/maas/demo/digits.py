"""A small classifier of scikit-learn's bundled 8x8 handwritten digits (no download)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported when a model is built, not with this module
    from torch import nn

    from maas.runtimes.export import ClassifierHead


@dataclass(frozen=True)
class DigitsData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split(test_size: float = 0.25, seed: int = 0) -> DigitsData:
    """Pixels scaled to [0, 1] as float32, labels as int64, a stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    return DigitsData(x_tr, y_tr, x_te, y_te)


def train_dataset():  # type: ignore[no-untyped-def]
    """The training split as a TensorDataset of (pixels FP32 [64], label INT64): a `data.train` factory."""
    import torch
    from torch.utils.data import TensorDataset

    d = load_digits_split()
    return TensorDataset(torch.from_numpy(d.x_train), torch.from_numpy(d.y_train))


def test_dataset():  # type: ignore[no-untyped-def]
    """The test split, the same way: a `data.eval` factory."""
    import torch
    from torch.utils.data import TensorDataset

    d = load_digits_split()
    return TensorDataset(torch.from_numpy(d.x_test), torch.from_numpy(d.y_test))


def mlp(hidden: int = 128, depth: int = 1) -> nn.Module:
    """An MLP 64 -> hidden (x depth) -> 10 returning logits: a `model.factory`."""
    from torch import nn

    layers: list[nn.Module] = []
    width = 64
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def build_model(hidden: int = 128) -> ClassifierHead:
    """``mlp`` behind a classifier head: returns (probabilities, label); ``.model`` gives the logits."""
    from maas.runtimes.export import ClassifierHead

    return ClassifierHead(mlp(hidden))


def train(
    data: DigitsData,
    *,
    epochs: int = 40,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
) -> ClassifierHead:
    """A plain hand-written loop (Adam on cross-entropy), no maas training machinery: the reference the
    training benchmark compares against, and a quick way to get a model. Returns it in eval mode."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = build_model()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.from_numpy(data.x_train)
    y = torch.from_numpy(data.y_train)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad()
            loss = loss_fn(model.model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        if on_epoch is not None:
            on_epoch(epoch + 1, total / len(x))
    return model.eval()


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:  # type: ignore[no-untyped-def]
    import torch

    with torch.inference_mode():
        _, label = model(torch.from_numpy(x))
    return float((label.numpy() == y).mean())
