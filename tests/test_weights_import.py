"""`e2edet weights import`: an official-layout ``.pth`` (``{"model", "args"}``, MS-DETR / H-DETR share it) and a
transformers checkpoint folder become run folders that predict exactly what the source model predicts."""

from __future__ import annotations

import argparse

import pytest
import torch

from e2edet.cli import main
from e2edet.inference import Predictor
from e2edet.models.detr.deformable_detr import DeformableDETR

ARGS = dict(backbone="resnet18", hidden_dim=64, num_queries=20, num_feature_levels=4, enc_layers=2, dec_layers=2,
            nheads=4, dim_feedforward=128, dropout=0.1, enc_n_points=4, dec_n_points=4, with_box_refine=True,
            two_stage=True, lr=2e-4)


def _official_checkpoint(path, num_classes=5):
    """A tiny model saved the way the official ``main.py`` saves: backbone under ``backbone.0.body``, the decoder's
    references to the heads as extra keys, ``args`` an ``argparse.Namespace``."""
    torch.manual_seed(0)
    model = DeformableDETR("resnet18", num_classes=num_classes, pretrained=False, hidden_dim=64, num_queries=20,
                           enc_layers=2, dec_layers=2, num_heads=4, dim_feedforward=128, with_box_refine=True,
                           two_stage=True).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed" in name:
                p.normal_(0, 0.05)
    state = {k.replace("backbone.body.", "backbone.0.body."): v for k, v in model.state_dict().items()}
    state.update({f"transformer.decoder.{k}": v for k, v in model.state_dict().items()
                  if k.startswith(("bbox_embed.", "class_embed."))})
    torch.save({"model": state, "args": argparse.Namespace(**ARGS), "epoch": 49}, path)
    return model


def test_official_pth_imports_and_predicts_the_same(tmp_path):
    model = _official_checkpoint(tmp_path / "ckpt.pth")
    assert main(["weights", "import", str(tmp_path / "ckpt.pth"), "--out", str(tmp_path / "run")]) == 0
    predictor = Predictor.from_weights(tmp_path / "run", device="cpu")
    m = predictor.cfg.model
    assert (m.arch, m.num_classes, m.two_stage, m.with_box_refine, m.num_queries) == ("deformable_detr", 5, True, True, 20)
    images, sizes = torch.randn(1, 3, 96, 128), torch.tensor([[96, 128]])
    with torch.no_grad():
        expected, got = model(images, sizes), predictor.model(images, sizes)
    torch.testing.assert_close(got["pred_logits"], expected["pred_logits"])
    torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"])


def test_import_errors_are_one_line(tmp_path, capsys):
    _official_checkpoint(tmp_path / "ckpt.pth")
    ckpt = torch.load(tmp_path / "ckpt.pth", weights_only=False)
    ckpt["model"].pop("transformer.level_embed")
    ckpt["model"]["transformer.extra.weight"] = torch.zeros(2)
    torch.save(ckpt, tmp_path / "broken.pth")
    assert main(["weights", "import", str(tmp_path / "broken.pth"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.pth" in err[0] and "transformer.level_embed" in err[0]
    assert "transformer.extra.weight" in err[0]
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert main(["weights", "import", str(tmp_path / "junk.pth"), "--out", str(tmp_path / "r")]) == 2
    assert "junk.pth" in capsys.readouterr().err
    assert main(["weights", "import", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()


def test_transformers_folder_imports_and_predicts_the_same(tmp_path):
    transformers = pytest.importorskip("transformers")
    backbone = transformers.ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                                         layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    config = transformers.DeformableDetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone=None, backbone_config=backbone, d_model=64,
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_ffn_dim=128, num_queries=20, num_labels=3, id2label={0: "Platelets", 1: "RBC", 2: "WBC"},
        label2id={"Platelets": 0, "RBC": 1, "WBC": 2})
    torch.manual_seed(0)
    reference = transformers.DeformableDetrForObjectDetection(config).eval()
    reference.save_pretrained(tmp_path / "hf")
    assert main(["weights", "import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    predictor = Predictor.from_weights(tmp_path / "run", device="cpu")
    assert predictor.class_names == ["Platelets", "RBC", "WBC"] and predictor.cfg.model.backbone == "resnet18"
    images = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        ref = reference(pixel_values=images)
        got = predictor.model(images)
    torch.testing.assert_close(got["pred_logits"], ref.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(got["pred_boxes_norm"], ref.pred_boxes, rtol=0, atol=1e-4)
