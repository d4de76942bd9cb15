"""A seeded train/val split of a COCO detection dict, for datasets that come without a validation split.

The split depends only on the image list, ``val_fraction`` and ``seed`` (not on the training seed), so runs with
different training seeds are evaluated on the same images; it is the same split scikit-learn's
``train_test_split(shuffle=True)`` would make in spirit: a seeded permutation of the images, the first
``round(val_fraction * N)`` (at least 1) held out.
"""

from __future__ import annotations

import copy
import random

from e2edet.data.errors import dataset_error

__all__ = ["split_coco", "SPLIT_SEED"]

#: Seed of the held-out split (fixed: independent of ``train.seed``).
SPLIT_SEED = 0


def split_coco(coco: dict, val_fraction: float, source: str, seed: int = SPLIT_SEED) -> tuple[dict, dict]:
    """Split a COCO detection dict into ``(train, val)`` by image, annotations following their image.

    Args:
        coco: a COCO dict (``images``, ``annotations``, ``categories``; other top-level keys are copied to both).
        val_fraction: share of the images held out, in ``(0, 1)``; the count is ``round(val_fraction * N)``,
            at least 1 and at most ``N - 1``.
        source: the dataset the dict was read from (named in errors).
        seed: seed of the permutation (:data:`SPLIT_SEED` by default).

    Returns:
        Two new dicts with the same categories and the original image and annotation ids; the held-out images are
        listed in their original order.

    Raises:
        ValueError: ``val_fraction`` outside ``(0, 1)``.
        DatasetError: fewer than 2 images (nothing to split).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"data.val_fraction {val_fraction}: must be in (0, 1)")
    images = coco["images"]
    if len(images) < 2:
        raise dataset_error(source, "images", f"{len(images)} image(s): cannot hold out a validation split")
    order = list(range(len(images)))
    random.Random(seed).shuffle(order)
    n_val = min(len(images) - 1, max(1, round(val_fraction * len(images))))
    held = set(order[:n_val])
    parts = []
    for keep_val in (False, True):
        ids = {img["id"] for i, img in enumerate(images) if (i in held) == keep_val}
        part = {k: copy.deepcopy(v) for k, v in coco.items() if k not in ("images", "annotations")}
        part["images"] = [copy.deepcopy(img) for img in images if img["id"] in ids]
        part["annotations"] = [copy.deepcopy(a) for a in coco.get("annotations", []) if a["image_id"] in ids]
        parts.append(part)
    return parts[0], parts[1]
