"""resnet18-dist: distributed ResNet18 training on Ray Train, DALI pipelines, export and serving."""

__version__ = "0.1.0"
