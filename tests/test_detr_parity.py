"""Deformable DETR against an independent implementation: Hugging Face ``transformers``
``DeformableDetrForObjectDetection`` (a test-only dependency, the ``dev`` extra).

transformers' model is built from a small config with random weights and its own ResNet-18-shaped backbone (no
download: ``use_pretrained_backbone=False``, ``use_timm_backbone=False``); its state dict is converted with
:func:`e2edet.models.detr.convert.from_transformers` and loaded strictly into e2edet's model. On two real BCCD images
of different sizes (padded batch, so the masks, valid ratios and padded position encodings are exercised) both must
give the same ``pred_logits`` and normalised ``pred_boxes`` (<= 1e-4) for every decoder layer, for the plain,
refine and two-stage variants, and the same encoder proposals in two-stage.
"""

from __future__ import annotations

import pytest
import torch

from e2edet.data.coco import CocoDetection
from e2edet.data.collate import collate
from e2edet.data.convert import save_coco_json, voc_to_coco
from e2edet.data.transforms import build_eval_transforms
from e2edet.models.detr.convert import from_transformers
from e2edet.models.detr.deformable_detr import DeformableDETR

transformers = pytest.importorskip("transformers")

VARIANTS = {"plain": {}, "refine": {"with_box_refine": True}, "two_stage": {"with_box_refine": True, "two_stage": True}}
SIZES = dict(d_model=64, layers=2, heads=4, ffn=128, queries=30, classes=3)


@pytest.fixture(scope="module")
def bccd_batch(bccd_root, tmp_path_factory):
    """Two BCCD val images at two sizes (192/256 and 160/224), padded into one batch, with their unpadded sizes."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        coco = voc_to_coco(bccd_root, split="val", class_names=["Platelets", "RBC", "WBC"])
    work = tmp_path_factory.mktemp("detr_parity")
    save_coco_json(coco, work / "val.json")
    a = CocoDetection(work / "val.json", bccd_root / "JPEGImages", build_eval_transforms(192, 256))[0]
    b = CocoDetection(work / "val.json", bccd_root / "JPEGImages", build_eval_transforms(160, 224))[1]
    images, targets = collate([a, b])
    return images, torch.stack([t["size"] for t in targets])


def _models(variant: str):
    s = SIZES
    backbone = transformers.ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                                         layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    config = transformers.DeformableDetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone=None, backbone_config=backbone,
        d_model=s["d_model"], encoder_layers=s["layers"], decoder_layers=s["layers"],
        encoder_attention_heads=s["heads"], decoder_attention_heads=s["heads"], encoder_ffn_dim=s["ffn"],
        decoder_ffn_dim=s["ffn"], num_queries=s["queries"], two_stage_num_proposals=s["queries"],
        num_labels=s["classes"], auxiliary_loss=True, **VARIANTS[variant])
    torch.manual_seed(0)
    reference = transformers.DeformableDetrForObjectDetection(config).eval()
    with torch.no_grad():  # random, non-trivial heads and BN statistics (the init zeroes the box heads)
        for name, p in reference.named_parameters():
            if "bbox_embed" in name or "class_embed" in name:
                p.normal_(0, 0.05)
        for name, buf in reference.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                buf.normal_(0, 0.1)
    ours = DeformableDETR("resnet18", num_classes=s["classes"], pretrained=False, hidden_dim=s["d_model"],
                          num_queries=s["queries"], enc_layers=s["layers"], dec_layers=s["layers"],
                          num_heads=s["heads"], dim_feedforward=s["ffn"], **VARIANTS[variant]).eval()
    state = from_transformers(reference.state_dict())
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert [k for k in missing if not k.endswith("num_batches_tracked")] == [] and unexpected == []
    return reference, ours


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_same_outputs_as_transformers(variant, bccd_batch):
    images, sizes = bccd_batch
    reference, ours = _models(variant)
    h, w = images.shape[-2:]
    pixel_mask = ((torch.arange(h)[None, :, None] < sizes[:, 0, None, None])
                  & (torch.arange(w)[None, None, :] < sizes[:, 1, None, None])).long()
    assert (pixel_mask == 0).any()  # the batch is padded
    with torch.no_grad():
        ref = reference(pixel_values=images, pixel_mask=pixel_mask, output_hidden_states=False)
        out = ours(images, sizes)
    torch.testing.assert_close(out["pred_logits"], ref.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(out["pred_boxes_norm"], ref.pred_boxes, rtol=0, atol=1e-4)
    # every decoder layer: transformers' own heads on its intermediate states and references (its per-layer outputs
    # are only returned with labels), against e2edet's stages
    with torch.no_grad():
        for layer in range(SIZES["layers"]):
            hidden = ref.intermediate_hidden_states[:, layer]
            start = ref.init_reference_points if layer == 0 else ref.intermediate_reference_points[:, layer - 1]
            delta = reference.bbox_embed[layer](hidden)
            logit = torch.cat([delta[..., :2] + torch.logit(start[..., :2], eps=1e-5), delta[..., 2:]
                               + (torch.logit(start[..., 2:], eps=1e-5) if start.shape[-1] == 4 else 0)], -1)
            torch.testing.assert_close(out["stages"][layer]["pred_logits"], reference.class_embed[layer](hidden),
                                       rtol=0, atol=1e-4)
            torch.testing.assert_close(out["stages"][layer]["pred_boxes_norm"], logit.sigmoid(), rtol=0, atol=1e-4)
    if variant == "two_stage":
        valid = ref.enc_outputs_coord_logits.isfinite().all(-1)
        torch.testing.assert_close(out["enc_outputs"]["pred_logits"], ref.enc_outputs_class, rtol=0, atol=1e-4)
        torch.testing.assert_close(out["enc_outputs"]["pred_boxes_norm"][valid],
                                   ref.enc_outputs_coord_logits.sigmoid()[valid], rtol=0, atol=1e-4)


def test_conversion_rejects_unknown_keys():
    with pytest.raises(KeyError, match="model.something_new"):
        from_transformers({"model.something_new": torch.zeros(1)})
