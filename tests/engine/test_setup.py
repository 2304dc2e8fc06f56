"""The training set-up: the benchmarks' model is the run's, and a finished state stops its loader workers."""

from __future__ import annotations

import torch

from megdet.engine.setup import build_train_state, build_training_model


def test_training_model_is_the_runs_and_close_stops_the_workers(tiny_cfg) -> None:
    cfg = tiny_cfg("data.num_workers=2", "train.sublinear_memory=stages", "model.trainable_layers=3")
    cpu = torch.device("cpu")
    state = build_train_state(cfg, rank=0, world_size=1, local_rank=0, device=cpu)
    assert state.net is state.model and state.iteration == state.start_iter == 0 and state.total_iters > 0
    model, recomputed = build_training_model(cfg, cpu)
    assert recomputed == state.recomputed and "backbone.body.layer2" in recomputed
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), state.model.state_dict().values()))

    assert state.start_streams() is None
    assert len(state.next_batches()) == cfg.train.grad_accum_steps
    workers = list(state.data_iter._workers)
    assert len(workers) == 2 and all(w.is_alive() for w in workers)
    state.close()  # not left to garbage collection: workers ignore SIGTERM, so exit could not stop them
    for w in workers:
        w.join(timeout=60)  # told to stop; a loaded machine may take a moment to schedule them
    assert state.data_iter is None and not any(w.is_alive() for w in workers)
