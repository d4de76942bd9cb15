"""SQR, selective query recollection (Chen et al., CVPR 2023): the training-only decoder loop in which every stage
also re-processes the query sets produced by earlier stages, each set supervised on its own.

Spec ``detr.md`` §2.2 ("Recollection rule", "What is recollected", "Two implementations") and §2.9 (pitfalls).
Reference: ``Fangyi-Chen/SQR`` (commit ``b576a6e``) ``mmdet/models/roi_heads/adamixer_decoder_Qrecycle.py``
(``AdaMixerDecoder_Qrecycle.forward_train``, the loop) and ``adamixer_decoder_Qrecycle_optimize.py``
(``AdaMixerDecoder_Qrecycle_optimize.forward_train``, the batched version), configs
``configs/sqr/adamixer_SQR_r50_1x_coco.py`` (``start_q = [0, 0, 1, 2, 4, 7]``, ``end_q = [1, 2, 4, 7, 12, 20]``)
and ``configs/adamixer/adamixer_Qrecycle_r50_1x_coco.py`` (the commented "recollection starting stage" lists).

The rule, over a growing list ``R`` of query sets that starts as ``[Q0]``: stage ``s`` takes ``R[start[s]:end[s]]``,
runs every set in it and appends each output to ``R`` in order. With ``O_s`` the outputs of stage ``s``
(``O_-1 = [Q0]``, ``O_-2 = []``), selective recollection gives stage ``s`` the sets ``O_{s-2} ++ O_{s-1}`` (1, 2, 3,
5, 8, 13 sets for 6 stages: 32 stage passes instead of 6); dense recollection gives it every earlier set (2^s).
Stages before ``start_stage`` take ``O_{s-1}`` only. The last set of every stage is the sequential chain
``S_s(...S_0(Q0))``, the one inference uses.

What is recollected: the content, **not** detached (later stages' losses reach earlier stages through it), and the
set's own box state, detached (AdaMixer's ``query_xyzr``; issue #6: box-refining models must keep a reference per
set). The official batched AdaMixer version splits the sets with a hard-coded batch of 2 (spec 2.9); here the split
uses the true batch (``stages.stage_pass``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from e2edet.models.query.stages import QueryState, StageStep, run_stages, stage_pass

__all__ = ["RECOLLECTION_MODES", "Recollection", "check_recollection", "decode_stages", "run_recollection"]

#: ``"selective"``: stage s takes O_{s-2} ++ O_{s-1} (SQR). ``"dense"``: stage s takes every earlier set (DQR, the
#: paper's strawman).
RECOLLECTION_MODES = ("selective", "dense")


@dataclass(frozen=True)
class Recollection:
    """Which query sets each decoder stage consumes: the official ``start_q`` / ``end_q`` index lists over ``R``.

    Attributes:
        starts, ends: per stage, the slice ``R[starts[s]:ends[s]]`` of the stored sets it consumes (``R[0]`` = the
            initial queries, then every stage output in order).
        batched: run all sets of a stage as one batch (``stages.stage_pass``, set-major, features repeated per
            set: faster, more memory; ``AdaMixerDecoder_Qrecycle_optimize``) or one set at a time (the loop version,
            ``AdaMixerDecoder_Qrecycle``). Both give the same outputs with dropout off.

    Raises:
        ValueError: lists of different lengths, empty, or a slice that is empty or reaches past the sets that exist
            when its stage runs.
    """

    starts: tuple[int, ...]
    ends: tuple[int, ...]
    batched: bool = True

    def __post_init__(self) -> None:
        starts, ends = tuple(int(v) for v in self.starts), tuple(int(v) for v in self.ends)
        object.__setattr__(self, "starts", starts)
        object.__setattr__(self, "ends", ends)
        if not starts or len(starts) != len(ends):
            raise ValueError(f"recollection start/end lists must be non-empty and of one length, got {starts} and "
                             f"{ends}")
        stored = 1  # R = [Q0]
        for s, (a, b) in enumerate(zip(starts, ends)):
            if not 0 <= a < b <= stored:
                raise ValueError(f"recollection stage {s}: slice R[{a}:{b}] must be non-empty within the {stored} "
                                 f"sets stored before it (starts {starts}, ends {ends})")
            stored += b - a

    @classmethod
    def build(cls, num_stages: int, mode: str = "selective", start_stage: int = 1,
              batched: bool = True) -> Recollection:
        """The index lists of ``mode`` (:data:`RECOLLECTION_MODES`) for ``num_stages`` stages.

        ``start_stage``: the first stage that recollects; earlier stages take only the previous stage's outputs.
        ``mode="selective"``, 6 stages: ``start_stage=1`` gives the official SQR lists ``[0, 0, 1, 2, 4, 7]`` /
        ``[1, 2, 4, 7, 12, 20]``; 2, 3, 4 and 5 the commented ablation lists of ``adamixer_Qrecycle_r50_1x_coco.py``
        (set counts 1, 1, 2, 3, 5, 8 / 1, 1, 1, 2, 3, 5 / 1, 1, 1, 1, 2, 3 / 1, 1, 1, 1, 1, 2). ``start_stage >=
        num_stages`` is the plain sequential loop.

        Raises:
            ValueError: an unknown mode, ``num_stages < 1`` or ``start_stage < 1``.
        """
        if mode not in RECOLLECTION_MODES:
            raise ValueError(f"recollection mode must be one of {RECOLLECTION_MODES}, got {mode!r}")
        if num_stages < 1 or start_stage < 1:
            raise ValueError(f"recollection needs num_stages >= 1 and start_stage >= 1, got {num_stages} and "
                             f"{start_stage}")
        starts, ends = [], []
        first = [0, 0]  # first index in R of O_{s-2} and of O_{s-1} (O_-1 = [Q0] at 0; O_-2 empty, also at 0)
        stored = 1
        for s in range(num_stages):
            if s < start_stage:
                start = first[1]
            else:
                start = 0 if mode == "dense" else first[0]
            starts.append(start)
            ends.append(stored)
            first = [first[1], stored]
            stored += stored - start
        return cls(tuple(starts), tuple(ends), batched)

    @property
    def set_counts(self) -> list[int]:
        """Query sets per stage (``[1, 2, 3, 5, 8, 13]`` for the official SQR lists)."""
        return [b - a for a, b in zip(self.starts, self.ends)]

    @property
    def output_stages(self) -> list[int]:
        """The stage of every recollected output, in the order :func:`run_recollection` returns them (length
        ``sum(set_counts)``; stage boundaries at the cumulative counts 1, 3, 6, 11, 19, 32)."""
        return [s for s, count in enumerate(self.set_counts) for _ in range(count)]


def run_recollection(stages: Sequence, step: StageStep, queries: QueryState, features: Sequence[Tensor],
                     recollection: Recollection) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]], list[int]]:
    """The SQR training loop over the shared stage step (``stages.StageStep``).

    For stage ``s``: the sets ``R[starts[s]:ends[s]]`` go through ``stages[s]`` (each from its own detached
    reference; stage 0 gets ``queries`` as given), batched along the batch axis or one by one
    (``recollection.batched``); every output state is appended to ``R`` (content not detached, reference detached,
    ``stages.stage_pass``) and every output dict kept with its stage.

    Args:
        stages: the per-stage modules, stage 0 first; ``len(stages)`` must equal the lists' length.
        step: the model's stage step. queries: ``QueryState`` entering stage 0 (``[B, N, d]`` / ``[B, N, 4]``).
        features: per-image tensors ``[B, ...]`` given to every stage.
        recollection: the index lists.

    Returns:
        ``(chain, outputs, output_stages)``: ``chain`` the per-stage output dicts of the sequential chain (the last
        set of each stage; what ``stages.run_stages`` returns, up to dropout), ``outputs`` every set's output dict
        in order (``sum(set_counts)`` dicts, tensors ``[B, ...]``) and ``output_stages`` the stage of each.

    Raises:
        ValueError: a stage count other than the lists' length.
    """
    if len(stages) != len(recollection.starts):
        raise ValueError(f"recollection lists cover {len(recollection.starts)} stages, the model has {len(stages)}")
    stored = [queries]
    chain, outputs, output_stages = [], [], []
    for s, stage in enumerate(stages):
        sets = stored[recollection.starts[s]:recollection.ends[s]]
        if recollection.batched:
            results = stage_pass(step, stage, sets, features)
        else:
            results = [r for one in sets for r in stage_pass(step, stage, [one], features)]
        for state, out in results:
            stored.append(state)
            outputs.append(out)
            output_stages.append(s)
        chain.append(results[-1][1])
    return chain, outputs, output_stages


def decode_stages(stages: Sequence, step: StageStep, queries: QueryState, features: Sequence[Tensor],
                  recollection: Recollection | None = None) -> dict:
    """The decoder part of a query detector's output dict (``docs/architecture.md``): the sequential chain
    (``stages.run_stages``), or with ``recollection`` (pass it only in training, switched on ``model.training``,
    never on ``requires_grad``: spec 2.9) the SQR loop.

    Returns:
        ``{"stages": [per-stage dicts], **last stage's tensors}``; with ``recollection`` also ``"recollected"`` (every
        set's output dict, in order) and ``"recollected_stages"`` (the stage of each, python ints), which the set
        criterion supervises instead of ``"stages"``.

    Raises:
        ValueError: as :func:`stages.run_stages` / :func:`run_recollection`.
    """
    if recollection is None:
        chain = run_stages(stages, step, queries, features)
        return {"stages": chain, **chain[-1]}
    chain, outputs, output_stages = run_recollection(stages, step, queries, features, recollection)
    return {"stages": chain, **chain[-1], "recollected": outputs, "recollected_stages": output_stages}


def check_recollection(recollection: Recollection | None, num_stages: int, drmm: bool = False) -> Recollection | None:
    """A model's ``recollection`` argument, checked against its stage count.

    Raises:
        ValueError: lists for another number of stages, or SQR with D-RMM (its mixture loss supervises
            ``outputs["stages"]`` only, so the recollected sets would go unsupervised).
        TypeError: not a :class:`Recollection` or None.
    """
    if recollection is None:
        return None
    if not isinstance(recollection, Recollection):
        raise TypeError(f"recollection must be a Recollection or None, got {type(recollection).__name__}")
    if len(recollection.starts) != num_stages:
        raise ValueError(f"recollection lists cover {len(recollection.starts)} stages, the model has {num_stages}")
    if drmm:
        raise ValueError("SQR recollection works with the Hungarian set loss, not with D-RMM's mixture loss")
    return recollection
