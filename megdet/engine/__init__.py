"""The large mini-batch training engine.

- :mod:`megdet.engine.lr_policy`: lr scaling with the batch, the warmup rule, step/cosine decay, the
  optimizer and its param groups (:mod:`megdet.engine.layerwise`: LARS and LAMB).
- :mod:`megdet.engine.setup`: :func:`~megdet.engine.setup.build_train_state`, everything a run needs
  (model, data, optimizer, scaler, DDP, resume) in a :class:`~megdet.engine.setup.TrainState`.
- :mod:`megdet.engine.hooks`: what happens around the steps (metrics, checkpoints, evaluation,
  signals, the final weights).
- :mod:`megdet.engine.trainer`: :func:`~megdet.engine.trainer.train` and the loop.

Import from the submodules (``from megdet.engine.trainer import train``); this package module itself
imports nothing, so that importing one part does not pay for the others.
"""
