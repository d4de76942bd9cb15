"""Training criterion of the O2F instance-segmentation variant (CondInst-style dynamic mask head on the dense
detector): the O2F detection losses with a mask-centroid prior and stride-normalised boxes, plus dice and semantic
losses.

Source: ``specs/dense.md`` §3.10; official ``strongwolf/o2f`` ``condinst_head.py`` ``E2ECondInstHead.loss`` and
``_get_target_single``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss

from e2edet.assign.base import DenseAssignment
from e2edet.assign.prior import mask_centroids
from e2edet.losses.dense_criterion import DenseCriterion
from e2edet.losses.focal import sigmoid_focal_loss
from e2edet.losses.masks import dice_loss, semantic_targets
from e2edet.ops.boxes import decode_ltrb, encode_ltrb
from e2edet.ops.dynamic_mask import dynamic_mask_logits

__all__ = ["CondInstCriterion"]


class CondInstCriterion(DenseCriterion):
    """:class:`DenseCriterion` (O2F) + CondInst mask losses. No parameters.

    Differences from the O2F box detector's criterion (§3.10):

    - the O2F prior is centered on each GT's **mask centroid** (:func:`~e2edet.assign.prior.mask_centroids`);
    - ``loss_box`` is the GIoU of the boxes decoded around each positive point from the **stride-normalised**
      distances (prediction ``pred_ltrb / stride``, target ``ltrb / stride``), as the official head trains; GIoU is
      invariant to that common scaling, so the value equals the pixel-space GIoU up to rounding; weight
      ``reg_weight`` (1.0 in the CondInst configs), centerness-weighted, normalised by the centerness sum.

    Mask losses, for every foreground point of the main assignment (certain and soft, ``topk_proposals_per_im=-1``):

    - ``loss_mask`` = ``mask_weight`` (2) x the mean over those points of the :func:`~e2edet.losses.masks.dice_loss`
      of ``sigmoid`` of their dynamic-head logits at stride ``mask_out_stride`` (4) against their GT's mask sampled at
      the stride-4 pixel centers (``masks[:, 2::4, 2::4]`` of the padded frame). The official per-instance dice vector
      is averaged by mmdet's ``_parse_losses``; no cross-process normaliser.
    - ``loss_sem`` = ``sem_weight`` x the sigmoid focal loss (alpha 0.25, gamma 2; on logits, which equals the
      official focal loss on probabilities) of ``pred_semantic`` against :func:`~e2edet.losses.masks.semantic_targets`
      at the mask-feature stride, summed and divided by the number of foreground pixels (at least 1). Skipped when
      the outputs hold no ``pred_semantic``.

    With no foreground point in the batch, ``loss_mask`` is an exact zero connected to the mask outputs.

    Args:
        num_classes: ``K``.
        mask_weight: weight of ``loss_mask`` (official ``mask_loss_weight = 2``).
        sem_weight: weight of ``loss_sem`` (the config's ``loss_cls`` weight, 1.0).
        mask_out_stride: stride of the supervised mask logits (4).
        **dense: the arguments of :class:`DenseCriterion`; ``assigner`` must be ``"o2f"``.
    Raises:
        ValueError: another assigner than O2F.
    """

    def __init__(self, num_classes: int, mask_weight: float = 2.0, sem_weight: float = 1.0, mask_out_stride: int = 4,
                 **dense) -> None:
        super().__init__(num_classes, **dense)
        if self.assigner_name != "o2f":
            raise ValueError(f"the CondInst variant trains with the O2F assigner, got {self.assigner_name!r}")
        self.mask_weight = float(mask_weight)
        self.sem_weight = float(sem_weight)
        self.mask_out_stride = int(mask_out_stride)

    def _giou(self, outputs: dict, pos: Tensor, box_target: Tensor) -> Tensor:
        """GIoU of the boxes decoded from stride-normalised distances around the positive points (official
        ``loss``: ``bbox_targets_i / strides_i``, ``distance2bbox(points_i, ...)``)."""
        batch = pos.shape[0]
        points = outputs["points"].float().unsqueeze(0).expand(batch, -1, -1)[pos]
        strides = outputs["strides"].float().unsqueeze(0).expand(batch, -1)[pos].unsqueeze(-1)
        pred = decode_ltrb(points, outputs["pred_ltrb"][pos].float() / strides)
        target = decode_ltrb(points, encode_ltrb(points, box_target) / strides)
        return generalized_box_iou_loss(pred, target, reduction="none")

    def forward(self, outputs: dict, targets: list[dict], epoch: int = 0, max_epoch: int = 1) -> dict[str, Tensor]:
        """Compute the losses of one batch.

        Args:
            outputs: the dense model output dict with the mask keys (``docs/architecture.md``): ``pred_mask_params
                [B, R, P]``, ``mask_feats [B, num_bases, Hm, Wm]``, ``mask_feat_stride`` (int), and in training
                ``pred_semantic [B, K, Hm, Wm]``.
            targets: B dicts with ``boxes``, ``labels`` and ``masks`` (``[G, Hp, Wp]`` 0/1, padded like the images:
                :func:`e2edet.data.collate.collate`).
            epoch, max_epoch: see :meth:`DenseCriterion.losses_and_assignment`.
        Returns:
            The O2F losses and statistics plus ``loss_mask`` and ``loss_sem``, and the statistic ``num_mask``.
        Raises:
            KeyError: a target without ``masks`` or outputs without the mask keys.
        """
        centers = []
        for t in targets:
            if "masks" not in t:
                raise KeyError("the CondInst criterion needs instance masks in every target (data.masks=true)")
            centers.append(mask_centroids(t["masks"], t["boxes"]))
        losses, assignment = self.losses_and_assignment(outputs, targets, epoch, max_epoch, centers=centers)
        losses["loss_mask"], num_mask = self._mask_loss(outputs, targets, assignment)
        if "pred_semantic" in outputs:
            losses["loss_sem"] = self._semantic_loss(outputs, targets)
        losses["num_mask"] = num_mask
        return losses

    def _mask_loss(self, outputs: dict, targets: list[dict], assignment: DenseAssignment) -> tuple[Tensor, Tensor]:
        """``mask_weight`` x mean dice over the foreground points, and their number (a detached float)."""
        feats, params = outputs["mask_feats"], outputs["pred_mask_params"]
        feat_stride = int(outputs["mask_feat_stride"])
        s = self.mask_out_stride
        dice = []
        for b, t in enumerate(targets):
            pos = torch.nonzero(assignment.pos_mask[b], as_tuple=True)[0]
            if pos.numel() == 0:
                continue
            logits = dynamic_mask_logits(feats[b], params[b][pos], outputs["points"][pos], outputs["strides"][pos],
                                         feat_stride, s)
            masks = t["masks"][:, s // 2 :: s, s // 2 :: s]
            if masks.shape[-2:] != logits.shape[-2:]:
                raise ValueError(f"target masks sampled at stride {s} are {tuple(masks.shape[-2:])} but the mask "
                                 f"logits are {tuple(logits.shape[-2:])}: masks must be padded like the images")
            target = masks[assignment.gt_index[b][pos]].gt(0.5).float().unsqueeze(1)
            dice.append(dice_loss(logits.float().sigmoid(), target))
        if not dice:
            zero = feats.sum() * 0.0 + params.sum() * 0.0
            return zero.float(), torch.zeros((), device=feats.device)
        dice = torch.cat(dice)
        return self.mask_weight * dice.mean(), torch.tensor(float(dice.numel()), device=feats.device)

    def _semantic_loss(self, outputs: dict, targets: list[dict]) -> Tensor:
        """``sem_weight`` x focal loss of the semantic logits / number of foreground pixels."""
        logits = outputs["pred_semantic"]
        stride = int(outputs["mask_feat_stride"])
        labels = torch.stack([semantic_targets(t["masks"], t["labels"], self.num_classes, stride) for t in targets])
        if labels.shape[-2:] != logits.shape[-2:]:
            raise ValueError(f"semantic targets {tuple(labels.shape[-2:])} do not match the semantic logits "
                             f"{tuple(logits.shape[-2:])}: masks must be padded like the images")
        one_hot = F.one_hot(labels, self.num_classes + 1)[..., : self.num_classes].permute(0, 3, 1, 2)
        num_fg = (labels < self.num_classes).sum().float().clamp(min=1.0)
        return self.sem_weight * sigmoid_focal_loss(logits, one_hot, 0.25, 2.0, reduction="sum") / num_fg
