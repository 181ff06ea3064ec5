"""Cutting a model into pipeline stages: the stages run one after another compute the model, keep its names,
and a cut that cannot work is refused with the fix named."""

import itertools
import random

import pytest
import torch
from torch import nn

from maas.errors import InvalidInput
from maas.training.strategies.pipeline import balance, split_model


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4), nn.LayerNorm(4), nn.Linear(4, 3)
    )


class Chain(nn.Module):
    """Not an nn.Sequential, but its forward runs its layers one after another."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.act = nn.GELU()
        self.body = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.act(self.embed(x))))


class Residual(Chain):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.embed(x))
        return self.head(h + self.body(h))


class Reordered(Chain):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.body(self.embed(x))))


def run(stages: list[nn.Sequential], x: torch.Tensor) -> torch.Tensor:
    for stage in stages:
        x = stage(x)
    return x


@pytest.mark.parametrize(
    ("make", "stages", "points"),
    [
        (mlp, 2, ["2"]),
        (mlp, 3, ["1", "5"]),
        (mlp, 4, ["2", "4", "6"]),
        (mlp, 2, None),
        (mlp, 3, None),
        (mlp, 7, None),
        (Chain, 2, ["body"]),
        (Chain, 3, ["act", "head"]),
        (Chain, 2, None),
    ],
)
def test_stages_compose_to_the_model(make: type[nn.Module], stages: int, points: list[str] | None) -> None:
    model = make()
    x = torch.randn(5, 8)
    want = model(x)
    got = split_model(model, stages, points)
    assert len(got) == stages and all(len(s) > 0 for s in got)
    torch.testing.assert_close(run(got, x), want, atol=0, rtol=0)
    # Every parameter lands in exactly one stage, under the model's own name.
    keys = [k for s in got for k in s.state_dict()]
    assert keys == list(model.state_dict())
    if points is not None:
        assert [next(iter(dict(s.named_children()))) for s in got[1:]] == points


def test_automatic_split_balances_parameters() -> None:
    model = mlp()  # parameters per layer: 144, 0, 544, 0, 132, 8, 15
    first, second = split_model(model, 2, None)
    # 688 | 155 beats 144 | 699, and the activations stay with the layer before them
    assert list(dict(first.named_children())) == ["0", "1", "2", "3"]
    assert list(dict(second.named_children())) == ["4", "5", "6"]
    assert balance([144, 0, 544, 0, 132, 8, 15], 3) == [2, 4]  # 144 | 544 | 155


def test_balance_finds_the_smallest_largest_stage() -> None:
    rng = random.Random(0)
    for _ in range(200):
        counts = [rng.choice([0, 0, 1, 5, 10, 50, 100]) for _ in range(rng.randint(1, 8))]
        for stages in range(1, len(counts) + 1):
            starts = balance(counts, stages)
            bounds = [0, *starts, len(counts)]
            assert all(a < b for a, b in itertools.pairwise(bounds)), (counts, stages, starts)
            worst = max(sum(counts[a:b]) for a, b in itertools.pairwise(bounds))
            best = min(
                max(sum(counts[a:b]) for a, b in itertools.pairwise([0, *cut, len(counts)]))
                for cut in itertools.combinations(range(1, len(counts)), stages - 1)
            )
            assert worst == best, (counts, stages, starts)


@pytest.mark.parametrize(
    ("points", "stages", "words"),
    [
        (["7"], 2, ["['7']", "not top-level layers", "'0', '1', '2'"]),
        (["2.weight"], 2, ["not top-level layers"]),
        (["0"], 2, ["not its first layer '0'"]),
        (["4", "2"], 3, ["in the model's layer order"]),
        (["2", "2"], 3, ["without repeats"]),
        (["2"], 3, ["make 2 stages", "3 processes"]),
    ],
)
def test_bad_split_points_are_refused(points: list[str], stages: int, words: list[str]) -> None:
    with pytest.raises(InvalidInput) as err:
        split_model(mlp(), stages, points)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize(
    ("model", "words"),
    [
        (Residual(), ["Residual.forward is not a plain chain", "nn.Sequential"]),
        (Reordered(), ["['embed', 'body', 'act', 'head']", "nn.Sequential"]),
        (nn.Module(), ["no layers"]),
    ],
)
def test_models_that_are_not_a_chain_are_refused(model: nn.Module, words: list[str]) -> None:
    with pytest.raises(InvalidInput) as err:
        split_model(model, 2, None)
    for word in [*words, "split_points"]:
        assert word in str(err.value)


def test_too_few_layers_for_the_stages() -> None:
    with pytest.raises(InvalidInput, match="3 top-level layers, too few for 4 pipeline stages"):
        split_model(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)), 4, None)
