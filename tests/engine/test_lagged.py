"""The trainer reads a step's losses one step late, and reads nothing else from the device."""

from __future__ import annotations

import math

import pytest
import torch
from sync_counting import count_syncs

from megdet.engine.hooks import Hook, StepValues
from megdet.engine.lagged import LaggedReader
from megdet.engine.setup import build_train_state
from megdet.engine.trainer import Trainer, forward_backward


def test_reader_returns_copies_oldest_first() -> None:
    reader = LaggedReader()
    a = torch.tensor([1.0, 2.0])
    reader.push(1, a, info="one")
    a.add_(10)  # the values pushed are those of the moment of the push
    reader.push(2, torch.tensor([3.0, float("nan")]), info="two")
    read = reader.pop()
    assert [(e.iteration, e.info) for e, _ in read] == [(1, "one"), (2, "two")]
    assert read[0][1] == [1.0, 2.0] and read[1][1][0] == 3.0 and math.isnan(read[1][1][1])
    reader.push(3, torch.tensor([5.0, 6.0]))
    assert len(reader) == 1 and [e.iteration for e, _ in reader.pop()] == [3] and reader.pop() == []


class _Values(Hook):
    def __init__(self) -> None:
        self.seen: list[tuple[int, dict[str, float], float | None]] = []

    def after_values(self, state, values: StepValues) -> None:
        self.seen.append((values.iteration, values.losses, values.grad_norm))


def test_a_trainer_step_waits_only_for_the_previous_steps_values(tiny_cfg) -> None:
    cfg = tiny_cfg("train.max_iters=5", "train.grad_clip=10.0")
    cpu = torch.device("cpu")
    state = build_train_state(cfg, rank=0, world_size=1, local_rank=0, device=cpu)
    try:
        state.start_streams()
        values = _Values()
        trainer = Trainer(state, [values])
        batches = state.next_batches()
        trainer.next_batches = lambda: batches  # the same images every step: equal model work
        trainer.run_step()  # warm-up (cached anchors); its values stay pending
        assert values.seen == [] and len(trainer.reader) == 1

        with pytest.MonkeyPatch.context() as mp, count_syncs(mp) as model_alone:
            forward_backward(state.net, batches, device=cpu)
        state.optimizer.zero_grad(set_to_none=True)

        real_pop = trainer.reader.pop
        with pytest.MonkeyPatch.context() as mp, count_syncs(mp) as step:

            def pop_uncounted():
                step.paused = True
                try:
                    return real_pop()
                finally:
                    step.paused = False

            trainer.reader.pop = pop_uncounted
            result = trainer.run_step()
            trainer.reader.pop = real_pop
        # Outside the lagged read the trainer adds no host read to the model's own.
        assert step.syncs == model_alone.syncs, (dict(step.syncs), dict(model_alone.syncs))
        # The step read the previous step's values (iteration 1), not its own.
        assert [it for it, _, _ in values.seen] == [1] and len(trainer.reader) == 1
        iteration, losses, grad_norm = values.seen[0]
        assert {"total_loss", "loss_classifier", "loss_objectness"} <= losses.keys()
        assert losses["total_loss"] == pytest.approx(sum(v for k, v in losses.items() if k != "total_loss"), rel=1e-5)
        assert grad_norm is not None and grad_norm > 0

        result.settle()  # what a checkpoint or an evaluation does first
        assert [it for it, _, _ in values.seen] == [1, 2] and len(trainer.reader) == 0

        # The counter is not blind to the read it was told to skip: counted, it is one more.
        trainer.run_step()  # nothing pending before it: nothing read
        assert [it for it, _, _ in values.seen] == [1, 2]
        with pytest.MonkeyPatch.context() as mp, count_syncs(mp) as counted:
            trainer.run_step()
        extra = counted.syncs - model_alone.syncs
        assert sum(extra.values()) == 1 and extra["Tensor.tolist"] == 1, dict(extra)
    finally:
        state.close()


@pytest.mark.cuda
def test_reader_on_cuda_copies_without_blocking_and_reads_the_right_values() -> None:
    dev = torch.device("cuda")
    reader = LaggedReader()
    x = torch.arange(4, dtype=torch.float32, device=dev)
    big = torch.randn(4096, 4096, device=dev)
    reader.push(1, x * 2)
    for _ in range(20):  # queued after the copy: the read below need not wait for them
        big = big @ big.T / 4096
    entry, values = reader.pop()[0]
    assert entry.host.is_pinned() and values == [0.0, 2.0, 4.0, 6.0]
