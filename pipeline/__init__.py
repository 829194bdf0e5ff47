"""polytask training pipeline: config, data, model, training on Ray, evaluation, affinity."""

__version__ = "0.1.0"
