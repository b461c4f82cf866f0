"""Libra R-CNN on torchvision's Faster R-CNN + FPN, with each of its three components switchable.

Knows nothing of Ray, Optuna or MLflow: one detector, one dataset, the devices it is handed.
"""
from detectors.config import ConfigError, DetectorConfig, TrainConfig

__all__ = ["ConfigError", "DetectorConfig", "TrainConfig", "build_detector"]


def build_detector(cfg):
    """Build the detector described by `cfg` (a DetectorConfig); see detectors/build.py."""
    from detectors.build import build_detector as _build

    return _build(cfg)
