"""The large mini-batch training engine.

- :mod:`megdet.engine.lr_policy`: linear lr scaling, the warmup rule, step/cosine decay, SGD param groups.
- :mod:`megdet.engine.trainer`: :func:`~megdet.engine.trainer.train`, the resumable training loop.

Import from the submodules (``from megdet.engine.trainer import train``); this package module itself
imports nothing, so that importing one part does not pay for the others.
"""
