"""The one decoder-stage loop of the query detectors (Sparse R-CNN, AdaMixer, D-RMM on both).

Spec ``query.md`` "Design notes for one codebase" (one stage loop; box states detached between stages, content not)
and ``detr.md`` "Design notes for one codebase" (SQR as a wrapper over stage callables). Reference loops:
mmdet 2.x ``SparseRoIHead.forward_train`` / ``simple_test`` (``mmdet/models/roi_heads/sparse_roi_head.py``:
``object_feats`` carried on as they are, the next stage's proposals are ``detach_proposal_list``) and
``MCG-NJU/AdaMixer`` ``AdaMixerDecoder.forward_train`` / ``simple_test``
(``mmdet/models/roi_heads/adamixer_decoder.py``: ``query_content`` carried on, ``query_xyzr`` detached); D-RMM's
``DRMMHead.forward_train`` (``mmdet/models/roi_heads/drmm_head.py``) is the same loop.

Pieces:

- ``QueryState(content, reference)``: the queries that enter a stage. ``content`` ``[B, N, d]`` (query features);
  ``reference`` ``[B, N, 4]`` float32, the model's box state (Sparse R-CNN / D-RMM: xyxy pixels of the padded input;
  AdaMixer: xyzr, ``ops.boxes.xyxy_to_xyzr``).
- a **stage step** (``StageStep``), written once per model: ``step(stage, state, features) -> (next_state,
  outputs)`` runs ONE stage (``stage``: the stage's module, i.e. its head too) on ``state``; ``next_state.reference``
  is returned *not* detached (the loop detaches it); ``outputs`` is the stage's ``docs/architecture.md`` dict
  (``pred_logits`` ``[B, N, K]``, ``pred_boxes`` float32 ``[B, N, 4]`` xyxy pixels of the padded input, D-RMM also
  ``pred_fg`` ``[B, N]`` and ``pred_scales`` float32 ``[B, N, 4]``). ``features``: per-image tensors, batch first
  (FPN / ChannelMapping maps ``[B, C, H_l, W_l]``); constants (strides, sizes of levels) are closed over by the step.
  The step must treat the batch rows independently (attention within an image, per-image RoI/sampling), which makes
  running several query sets concatenated along the batch exact.
- ``stage_pass``: one stage on one or more query sets (batched, see below), each next reference detached.
- ``run_stages``: the sequential chain ``S_{L-1}(... S_1(S_0(Q_0)))`` used by every query detector, returning the
  per-stage output dicts (``outputs["stages"]``).
- the input checks of every detector are :func:`e2edet.models.inputs.check_inputs`.

Hook point for training-only query strategies: SQR (``detr.md`` section 2) is written once for all query
detectors in :mod:`e2edet.models.query.recollection`, on ``stage_pass``: it replaces ``run_stages`` -- never the
per-model step -- when ``model.training`` (switched on ``self.training``, not on ``requires_grad``). Several query
sets are concatenated along the batch (set-major: set 0 images 0..B-1, set 1 ...), ``features`` repeated per set,
run once and split back by the true batch size B; each set keeps its own detached reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch
from torch import Tensor


__all__ = ["QueryState", "StageStep", "stage_pass", "run_stages"]


class QueryState(NamedTuple):
    """Queries entering a stage: ``content`` ``[B, N, d]`` and ``reference`` ``[B, N, 4]`` float32 box state
    (Sparse R-CNN: xyxy pixels of the padded input; AdaMixer: xyzr; Deformable DETR: normalised (cx, cy, w, h), or
    (cx, cy) ``[B, N, 2]`` without refinement). Only stage 0's reference may carry a gradient (Sparse R-CNN's
    learnable proposal boxes); the loop detaches every later one.

    ``carry``: optional ``[B, N, k]`` tensor the loop passes on **as it is** (not detached), batched and split with
    the set like ``content``: Deformable DETR's reference for its predictions when that one keeps its gradient
    (look-forward-twice: the refined box before detaching; without refinement: the learned initial reference)."""

    content: Tensor
    reference: Tensor
    carry: Tensor | None = None


class StageStep(Protocol):
    """``step(stage, state, features) -> (next_state, outputs)``: one stage of one model (see the module docstring).

    ``next_state.reference`` is not detached; ``outputs`` holds the stage's ``docs/architecture.md`` tensors, batch
    first."""

    def __call__(self, stage, state: QueryState,
                 features: Sequence[Tensor]) -> tuple[QueryState, dict[str, Tensor]]: ...


def stage_pass(step: StageStep, stage, sets: Sequence[QueryState],
               features: Sequence[Tensor]) -> list[tuple[QueryState, dict[str, Tensor]]]:
    """Run one stage on ``G = len(sets)`` query sets that share the images of ``features``.

    One set: ``step`` called as is. Several sets (the SQR hook, see the module docstring): contents and references
    concatenated along dim 0, set-major (``[G·B, N, ...]``: set 0 images 0..B-1, then set 1, ...), each feature
    tensor repeated G times along dim 0, ``step`` called once, every output split back by the true batch size
    ``B`` (the sets' batch, which ``features`` must share: never a hard-coded size, ``detr.md`` 2.9). Sets whose
    reference (or carry) shapes differ are batched in groups of one shape, the results returned in order.

    Args:
        step: the model's stage step. stage: the consuming stage (module or any per-stage object ``step`` takes).
        sets: ``QueryState`` per set, each ``[B, N, d]`` / ``[B, N, 4]``.
        features: per-image tensors ``[B, ...]`` (batch first).

    Returns:
        per set, in order, ``(next_state, outputs)`` with ``next_state.reference`` **detached** (content and carry
        not) and ``outputs`` the stage's output dict for that set (tensors ``[B, ...]``).

    Raises:
        ValueError: no set, or (several sets) a set or feature whose batch differs from the first set's.
    """
    if len(sets) == 1:
        state, out = step(stage, sets[0], features)
        return [(state._replace(reference=state.reference.detach()), out)]
    if not sets:
        raise ValueError("stage_pass needs at least one query set")
    batch, groups = sets[0].content.shape[0], len(sets)
    bad = [tuple(t.shape) for t in [*features, *(x for s in sets for x in s if x is not None)]
           if t.shape[0] != batch]
    if bad:
        raise ValueError(f"stage_pass: every query set and feature must have the batch of {batch} images first, "
                         f"got shapes {bad}")
    kinds = [(tuple(s.reference.shape[1:]), None if s.carry is None else tuple(s.carry.shape[1:])) for s in sets]
    if len(set(kinds)) > 1:  # e.g. Deformable DETR: a 2-d learned reference beside 4-d refined ones: batch by kind
        results: list = [None] * groups
        for kind in dict.fromkeys(kinds):
            idx = [j for j, k in enumerate(kinds) if k == kind]
            for j, r in zip(idx, stage_pass(step, stage, [sets[j] for j in idx], features)):
                results[j] = r
        return results
    joint = QueryState(torch.cat([s.content for s in sets]), torch.cat([s.reference for s in sets]),
                       None if sets[0].carry is None else torch.cat([s.carry for s in sets]))
    repeated = [f.repeat(groups, *([1] * (f.dim() - 1))) for f in features]
    state, out = step(stage, joint, repeated)
    contents, references = state.content.split(batch), state.reference.detach().split(batch)
    carries = [None] * groups if state.carry is None else state.carry.split(batch)
    split = {k: v.split(batch) for k, v in out.items()}
    return [(QueryState(contents[j], references[j], carries[j]), {k: v[j] for k, v in split.items()})
            for j in range(groups)]


def run_stages(stages: Sequence, step: StageStep, queries: QueryState,
               features: Sequence[Tensor]) -> list[dict[str, Tensor]]:
    """The sequential decoder-stage loop: ``queries`` through ``stages[0]``, ..., ``stages[-1]`` in order.

    The content is carried on as it is (gradients flow back through every stage); the reference that enters stage
    ``s > 0`` is stage ``s-1``'s new reference **detached**; stage 0's reference is used as given.

    Args:
        stages: the per-stage modules, stage 0 first (``model.stages``). step: the model's ``StageStep``.
        queries: ``QueryState`` entering stage 0, ``[B, N, d]`` / ``[B, N, 4]``.
        features: per-image tensors ``[B, ...]`` given to every stage.

    Returns:
        the per-stage output dicts, stage 0 first (``outputs["stages"]`` of ``docs/architecture.md``).

    Raises:
        ValueError: no stage.
    """
    if len(stages) == 0:
        raise ValueError("run_stages needs at least one stage")
    outputs = []
    for stage in stages:
        [(queries, out)] = stage_pass(step, stage, [queries], features)
        outputs.append(out)
    return outputs
