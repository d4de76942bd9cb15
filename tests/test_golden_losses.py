"""Golden losses: the first training step of every ``*_cpu`` recipe on a fixed batch of two real BCCD images.

Recorded before the architecture refactor (issue "Make room for the DETR family") and kept: a refactor that changes
no behaviour must reproduce every value of ``tests/fixtures/golden_losses.json`` to 1e-5 relative.

The batch: the first two images of BCCD ``val`` (VOC importer, classes Platelets/RBC/WBC), through the evaluation
transforms at ``data.test_min_size=192``, ``data.test_max_size=256`` (no randomness), collated as in training. The
model: the recipe with ``model.pretrained=false``, built after ``torch.manual_seed(0)``, in training mode; the forward
pass also runs after ``torch.manual_seed(1)`` (dropout). The criterion is called with ``epoch=0`` and the recipe's
``max_epoch``. Every scalar entry of the loss dict is recorded (losses and statistics).

Regenerate (only on purpose, e.g. after an intended change of a method, saying why in the commit)::

    .venv/bin/python -m tests.test_golden_losses --write
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from e2edet.build import build_criterion, build_model
from e2edet.config import apply_overrides
from e2edet.data.coco import CocoDetection
from e2edet.data.collate import collate
from e2edet.data.convert import save_coco_json, voc_to_coco
from e2edet.data.transforms import build_eval_transforms
from e2edet.recipes import get_recipe, list_recipes

FIXTURE = Path(__file__).parent / "fixtures" / "golden_losses.json"
#: Instance-segmentation recipes (``model.masks``) are left out: BCCD has no masks (their training step is checked in
#: ``tests/test_models_condinst.py`` and ``tests/test_recipes.py``).
RECIPES = [name for name, _ in list_recipes()
           if name.endswith("_cpu") and not getattr(get_recipe(name).model, "masks", False)]
CLASSES = ["Platelets", "RBC", "WBC"]
RTOL, ATOL = 1e-5, 1e-7


def make_batch(bccd_root: Path, work: Path) -> tuple[torch.Tensor, list[dict]]:
    """The fixed batch (see the module docstring)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BCCD's one zero-size box is reported and dropped
        coco = voc_to_coco(bccd_root, split="val", class_names=CLASSES)
    keep = {img["id"] for img in coco["images"][:2]}
    coco["images"] = [i for i in coco["images"] if i["id"] in keep]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
    save_coco_json(coco, work / "val2.json")
    dataset = CocoDetection(work / "val2.json", bccd_root / "JPEGImages", build_eval_transforms(192, 256))
    return collate([dataset[0], dataset[1]])


def first_step_losses(name: str, images: torch.Tensor, targets: list[dict]) -> dict[str, float]:
    """Every scalar entry of ``name``'s loss dict for the batch (see the module docstring)."""
    cfg = apply_overrides(get_recipe(name), ["model.pretrained=false"])
    cfg.model.num_classes, cfg.model.class_names = len(CLASSES), tuple(CLASSES)
    torch.manual_seed(0)
    model, criterion = build_model(cfg).train(), build_criterion(cfg)
    sizes = torch.stack([t["size"] for t in targets])
    torch.manual_seed(1)
    outputs = model(images, sizes)
    losses = criterion(outputs, targets, epoch=0, max_epoch=cfg.train.epochs or 1)
    return {k: float(torch.as_tensor(v).detach()) for k, v in sorted(losses.items())
            if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)}


@pytest.fixture(scope="module")
def batch(bccd_root, tmp_path_factory):
    return make_batch(bccd_root, tmp_path_factory.mktemp("golden"))


def test_fixture_covers_every_cpu_recipe():
    assert sorted(json.loads(FIXTURE.read_text())) == sorted(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_first_step_losses_match_the_recording(name, batch):
    expected = json.loads(FIXTURE.read_text())[name]
    got = first_step_losses(name, *batch)
    assert sorted(got) == sorted(expected), f"{name}: loss keys changed"
    for key, value in expected.items():
        assert math.isfinite(got[key]) and got[key] == pytest.approx(value, rel=RTOL, abs=ATOL), (name, key)


def _write() -> None:  # pragma: no cover - run by hand
    import tempfile

    from tests.conftest import _bccd_root

    root = _bccd_root()
    if root is None:
        raise SystemExit("BCCD not found (../shared/data/bccd or $E2EDET_BCCD)")
    with tempfile.TemporaryDirectory() as tmp:
        images, targets = make_batch(root, Path(tmp))
        table = {name: first_step_losses(name, images, targets) for name in RECIPES}
    FIXTURE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"{FIXTURE}: {len(table)} recipes, {sum(len(v) for v in table.values())} values")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: python -m tests.test_golden_losses --write")
    _write()
