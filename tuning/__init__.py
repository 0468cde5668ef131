"""Sweeps: Ray Tune with ASHA over the training recipe, the best trial exported.

- :mod:`tuning.space`: the sweep's options (search space, search algorithm, ASHA) and the Tune
  parameter space built from them;
- :mod:`tuning.trial`: the Tune trial function, a Ray Train driver that fits the same
  TorchTrainer as ``launch/train.py``;
- :mod:`tuning.sweep`: the Tuner (new or restored), the trials table and picture, the export of
  the best trial.

The command is ``launch/sweep.py`` / ``resnet18-dist sweep`` (``resnet18_dist.commands.sweep``).
"""
