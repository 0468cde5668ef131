"""Sweeps: Ray Tune with ASHA over the training recipe, the best trial exported.

Imported as ``resnet18_dist.tuning`` (installed there, never as a top-level ``tuning``; see
``resnet18_dist/__init__.py``):

- ``.space``: the sweep's options (search space, search algorithm, ASHA) and the Tune parameter
  space built from them;
- ``.trial``: the Tune trial function, a Ray Train driver that fits the same TorchTrainer as
  ``launch/train.py``;
- ``.sweep``: the Tuner (new or restored), the trials table and picture, the export of the best
  trial.

The command is ``launch/sweep.py`` / ``resnet18-dist sweep`` (``resnet18_dist.commands.sweep``).
"""
