"""Datasets: COCO-format sets (COCO 2017 or a user's own), the synthetic set, and batching."""
from detectors.data.coco import CocoDetection, load_coco_json
from detectors.data.errors import DatasetError
from detectors.data.loader import build_datasets, collate_detection
from detectors.data.synthetic import (
    CLASSES as SYNTHETIC_CLASSES,
    default_data_dir,
    ensure_synthetic,
    generate_synthetic_coco,
    synthetic_cache_key,
)
from detectors.data.transforms import training_transforms

__all__ = [
    "CocoDetection",
    "DatasetError",
    "SYNTHETIC_CLASSES",
    "build_datasets",
    "collate_detection",
    "default_data_dir",
    "ensure_synthetic",
    "generate_synthetic_coco",
    "load_coco_json",
    "synthetic_cache_key",
    "training_transforms",
]
