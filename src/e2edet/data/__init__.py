"""Data: COCO-JSON detection dataset, VOC/YOLO importers, validation, transforms, batching, samples.

Batch contract (see ``docs/architecture.md``): images ``float32 [B, 3, Hp, Wp]`` normalised and zero-padded
to multiples of 32; targets a list of dicts with ``boxes`` ``float32 [G, 4]`` xyxy pixels, ``labels``
``int64 [G]``, ``image_id`` ``int``, ``size`` and ``orig_size`` ``int64 [2]`` as ``(h, w)``.
"""

from e2edet.data.coco import CocoDetection, read_image
from e2edet.data.collate import collate, pad_images
from e2edet.data.convert import odgt_to_coco, read_class_names, save_coco_json, voc_to_coco, yolo_to_coco
from e2edet.data.datasets import DatasetPaths, resolve_dataset
from e2edet.data.errors import DatasetError, RegistryError
from e2edet.data.loader import build_loader
from e2edet.data.samples import cache_dir, ensure_mobilenet_weights, fetch_wheel, prepare_trees
from e2edet.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_eval_transforms, build_train_transforms
from e2edet.data.validate import load_coco_json, validate_coco

__all__ = [
    "CocoDetection", "read_image", "odgt_to_coco", "collate", "pad_images", "read_class_names", "save_coco_json", "voc_to_coco",
    "yolo_to_coco", "DatasetPaths", "resolve_dataset", "DatasetError", "RegistryError", "build_loader",
    "cache_dir", "ensure_mobilenet_weights", "fetch_wheel", "prepare_trees", "IMAGENET_MEAN", "IMAGENET_STD",
    "build_eval_transforms", "build_train_transforms", "load_coco_json", "validate_coco",
]
