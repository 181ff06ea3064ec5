"""The parameter server's pieces in one process: shard balancing, the staleness gate, a server's shard."""

import threading

import pytest
import torch
from torch import nn

from maas.errors import InvalidInput
from maas.training.strategies.parameter_server import balance_shards, slow_seconds
from maas.training.strategies.ps_server import ParameterServer, may_continue


def test_shards_are_balanced_by_size_largest_first() -> None:
    sizes = {"a.weight": 2048, "a.bias": 32, "b.weight": 320, "b.bias": 10, "c.weight": 1900}
    shards = balance_shards(sizes, 2)
    # 2048 -> 0, 1900 -> 1, 320 -> 1 (1900 < 2048), 32 -> 0 (2048 < 2220), 10 -> 0; names keep the model's order
    assert shards == [["a.weight", "a.bias", "b.bias"], ["b.weight", "c.weight"]]
    loads = [sum(sizes[n] for n in shard) for shard in shards]
    assert max(loads) - min(loads) <= max(sizes.values())  # greedy's bound
    assert sorted(n for shard in shards for n in shard) == sorted(sizes)  # each exactly once


def test_shards_ties_and_more_servers_than_tensors() -> None:
    assert balance_shards({"x": 4, "y": 4, "z": 4}, 3) == [["x"], ["y"], ["z"]]
    assert balance_shards({"x": 4, "y": 4, "z": 4, "w": 4}, 2) == [["x", "z"], ["y", "w"]]
    assert balance_shards({"x": 4}, 3) == [["x"], [], []]
    assert balance_shards({}, 2) == [[], []]


@pytest.mark.parametrize(
    ("clock", "clocks", "bound", "expected"),
    [
        (3, [3, 1], 2, True),  # two ahead of the slowest: allowed with k=2
        (4, [4, 1], 2, False),  # three ahead: held
        (4, [4, 2], 2, True),  # the slowest caught up
        (1, [1, 1], 0, True),  # k=0 is lock-step
        (2, [2, 1], 0, False),
        (100, [100, 0], None, True),  # async: no bound
    ],
)
def test_staleness_gate(clock: int, clocks: list[int], bound: int | None, expected: bool) -> None:
    assert may_continue(clock, clocks, bound) is expected


def test_slow_worker_hook() -> None:
    assert slow_seconds(2, None) == 0.0
    assert slow_seconds(2, "2:0.25") == 0.25
    assert slow_seconds(3, "2:0.25") == 0.0
    with pytest.raises(InvalidInput, match="RANK:SECONDS"):
        slow_seconds(2, "slow")


def server(mode: str, workers: list[int], max_staleness: int = 2, momentum: float = 0.9) -> ParameterServer:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    params = dict(model.named_parameters())
    optimizer = torch.optim.SGD(params.values(), lr=0.1, momentum=momentum)
    return ParameterServer(0, params, optimizer, workers=workers, mode=mode, max_staleness=max_staleness)  # type: ignore[arg-type]


def grads(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(2, 3, generator=g), "bias": torch.randn(2, generator=g)}


def test_sync_applies_the_mean_once_all_workers_pushed() -> None:
    ps = server("sync", [1, 2])
    reference = nn.Linear(3, 2)
    reference.load_state_dict({k: v.detach().clone() for k, v in ps.params.items()})
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        g1, g2 = grads(2 * step), grads(2 * step + 1)
        first = ps.push(2, step, 0.1, g2)  # arrival order must not matter
        assert not first.done() and ps.clocks == {1: step, 2: step}
        second = ps.push(1, step, 0.1, g1)
        assert first.done() and second.done() and ps.clocks == {1: step + 1, 2: step + 1}
        for name, p in reference.named_parameters():
            p.grad = (g1[name] + g2[name]) / 2
        ref_opt.step()
    pulled = ps.pull(with_optimizer=True)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(pulled["params"][name], p.detach(), atol=0, rtol=0)
        torch.testing.assert_close(pulled["optim"][name]["momentum_buffer"], ref_opt.state[p]["momentum_buffer"])
    assert all(r["worker_clock"] == r["min_clock"] for r in ps.records) and len(ps.records) == 6


def test_async_applies_each_push_at_lr_over_workers() -> None:
    ps = server("async", [1, 2], momentum=0.0)
    before = ps.pull()["params"]
    g = grads(0)
    for step in range(3):
        assert ps.push(1, step, 0.1, g).done()  # never waits for worker 2
    after = ps.pull()["params"]
    for name in g:
        torch.testing.assert_close(after[name], before[name] - 3 * 0.05 * g[name])
    assert [r["worker_clock"] - r["min_clock"] for r in ps.records] == [1, 2, 3]


def test_bounded_holds_the_fast_worker_until_the_slow_one_catches_up() -> None:
    ps = server("bounded", [1, 2], max_staleness=2)
    answers = [ps.push(2, step, 0.1, grads(step)) for step in range(3)]
    assert [a.done() for a in answers] == [True, True, False]  # clock 3 would be 3 ahead of worker 1's 0
    assert ps.clocks == {1: 0, 2: 3}  # applied on arrival, only the answer waits
    assert ps.push(1, 0, 0.1, grads(9)).done()
    assert answers[2].done()
    assert max(r["worker_clock"] - r["min_clock"] for r in ps.records) == 2


def test_bounded_gate_under_concurrent_pushes() -> None:
    ps = server("bounded", [1, 2, 3], max_staleness=1)

    def work(worker: int, steps: int) -> None:
        for step in range(steps):
            ps.push(worker, step, 0.01, grads(step)).wait()

    threads = [threading.Thread(target=work, args=(w, 40)) for w in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert ps.clocks == {1: 40, 2: 40, 3: 40}
    assert len(ps.records) == 120 and all(r["worker_clock"] - r["min_clock"] <= 1 for r in ps.records)


def test_out_of_order_push_is_refused() -> None:
    ps = server("async", [1, 2])
    with pytest.raises(RuntimeError, match="expected step 0"):
        ps.push(1, 5, 0.1, grads(0)).wait()
    with pytest.raises(RuntimeError, match="one of workers"):
        ps.push(7, 0, 0.1, grads(0)).wait()


def test_restore_sets_parameters_optimizer_state_and_clocks() -> None:
    ps = server("sync", [1, 2])
    ps.push(1, 0, 0.1, grads(0))
    ps.push(2, 0, 0.1, grads(1))
    saved = ps.pull(with_optimizer=True)
    fresh = server("sync", [1, 2])
    fresh.restore(1, saved)
    assert fresh.clocks == {1: 1, 2: 1}
    for a, b in ((ps, grads(2)), (fresh, grads(2))):
        a.push(1, 1, 0.1, b)
        a.push(2, 1, 0.1, b)
    for name, value in ps.pull()["params"].items():
        torch.testing.assert_close(fresh.pull()["params"][name], value, atol=0, rtol=0)


def test_done_releases_the_server_when_every_worker_is_done() -> None:
    ps = server("async", [1, 2])
    ps.done(1)
    assert not ps.wait_done(timeout=0)
    ps.done(2)
    assert ps.wait_done(timeout=0)


def test_a_server_without_parameters_still_keeps_clocks() -> None:
    ps = ParameterServer(1, {}, None, workers=[2, 3], mode="bounded", max_staleness=0)
    assert ps.push(2, 0, 0.1, {}).done() is False
    assert ps.push(3, 0, 0.1, {}).done()
    assert ps.clocks == {2: 1, 3: 1} and ps.pull() == {"params": {}, "optim": {}}


def test_a_failed_update_reaches_every_waiting_worker() -> None:
    ps = server("sync", [1, 2])
    first = ps.push(1, 0, 0.1, grads(0))
    second = ps.push(2, 0, 0.1, {"weight": torch.zeros(5, 5)})  # wrong shape: the optimizer step fails
    for answer in (first, second):
        with pytest.raises(RuntimeError):
            answer.wait()
