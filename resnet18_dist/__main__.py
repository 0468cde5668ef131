"""``python -m resnet18_dist`` is the ``resnet18-dist`` command."""

from resnet18_dist.commands import console

console()
