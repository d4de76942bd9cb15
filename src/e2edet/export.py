"""ONNX export of an end-to-end detector, self-contained and checked against onnxruntime.

The exported graph is the whole detector *and* its NMS-free post-processing: ``images [B, 3, H, W]`` (normalised
RGB, zero-padded at the bottom/right; ``H``/``W`` multiples of 32) and, for the models that use it (query and
DETR detectors), ``image_sizes`` int64 ``[B, 2]`` ``(h, w)`` of each unpadded image → ``boxes [B, N, 4]`` (xyxy
pixels of the input), ``scores [B, N]`` and ``labels [B, N]`` (int64), the top ``N = test.max_detections``
(point, class) pairs by the recipe's score; instance-segmentation models (``model.masks``) also give
``masks [B, N, H/4, W/4]``, each detection's mask probability at stride 4 over the padded input (the runtime
pastes them into the original image: :func:`e2edet.models.dense.mask_postprocess.paste_masks`). There is no NMS
node: DeFCN's own inference is a sort and top-k (``specs/dense.md`` §2.5; the per-level top-1000 is a no-op for the
top 100 and the 0.05 threshold commutes with the top-k, so :class:`e2edet.inference.OnnxPredictor` applies it
afterwards; as the DeFCN maintainer says in issue #11, both can be dropped). O2F CondInst thresholds the cls
probability before ranking by cls·ctr: the graph zeroes the scores below it. Recipes whose evaluation needs NMS
(FCOS) are refused.

Height and width are dynamic where the graph allows it (dense detectors, Sparse R-CNN): the file then runs on any
padded size, and ``--size`` is only the size it is traced and checked at. AdaMixer and Deformable DETR graphs are
fixed at the export size (see :func:`supports_dynamic_size`). The file carries everything a runtime needs in its
``metadata_props`` (:func:`onnx_metadata`): class names, mean/std, the resize and padding rules, the input size,
the score mode and the post-processing left to do, the recipe, the e2edet version and the whole config.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import e2edet
from e2edet.config import Config, ConfigError, to_dict
from e2edet.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from e2edet.models.dense.detector import DenseDetector
from e2edet.models.dense.points import anchor_points
from e2edet.models.dense.postprocess import class_probabilities
from e2edet.models.query.postprocess import query_scores
from e2edet.models.query.sparse_rcnn import SparseRCNN
from e2edet.ops.dynamic_mask import dynamic_mask_logits
from e2edet.utils import error_text
from e2edet.utils.compare_outputs import compare_detections, compare_masks  # noqa: F401 (public here too)


#: Score modes whose top-k is the final output (no NMS): POTO, DeFCN, O2F, O2F CondInst, Sparse R-CNN / AdaMixer,
#: D-RMM, Deformable DETR (its deformable attention exports as ``GridSample``, opset >= 16).
END_TO_END_SCORES = ("cls", "cls_filter", "cls_ctr", "cls_ctr_cls_thresh", "drmm")

#: Stride of the ``masks`` output (the CondInst mask-logit stride, ``specs/dense.md`` 3.10).
MASK_STRIDE = 4

#: Largest export side in pixels (a guard against typos such as 41600x576 that would exhaust memory).
MAX_SIDE = 8192


#: ``e2edet_format`` of the metadata written by :func:`onnx_metadata` (read by :class:`e2edet.inference.OnnxPredictor`).
ONNX_FORMAT = "e2edet-onnx-v1"


class ExportError(ConfigError):
    """Bad export input: a recipe that needs NMS, an input size that is not ``N`` or ``HxW`` positive multiples of
    32, dynamic sizes asked of a graph that cannot have them, or an output path that cannot be written. The
    one-line message names the option or the path."""


class ExportMismatchError(RuntimeError):
    """The exported graph's detections, run by onnxruntime, differ from PyTorch's (see :func:`compare_detections`).

    Not a user input error: the command line ends with exit status :attr:`exit_code` and the one-line message,
    which names the ONNX file and the worst difference.
    """

    exit_code = 1


def _import_onnxruntime():
    """``onnxruntime`` (and a check that ``onnx``, which the exporter needs, is installed).

    Raises:
        ExportError: either package is missing, with the command that installs them.
    """
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as err:
        raise ExportError(f"ONNX export needs the onnx and onnxruntime packages ({error_text(err)}); install the "
                          'export extra: pip install "e2edet[export]"') from err
    return onnxruntime


def check_size(height: int, width: int, key: str = "size") -> tuple[int, int]:
    """Check an export input size: positive multiples of 32 (the detectors' largest stride), at most
    :data:`MAX_SIDE`.

    Raises:
        ExportError: naming ``key`` (``--size`` on the command line), with the nearest valid size.
    """
    if not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE) or height % 32 or width % 32:
        near = "x".join(str(min(MAX_SIDE, max(32, round(v / 32) * 32))) for v in (height, width))
        raise ExportError(f"{key} {height}x{width}: height and width must be multiples of 32 between 32 and "
                          f"{MAX_SIDE} pixels, e.g. {near}")
    return height, width


def parse_size(text: str, key: str = "--size") -> tuple[int, int]:
    """Parse ``"N"`` (square, e.g. ``416``) or ``"HxW"`` (e.g. ``416x576``) into ``(height, width)`` and
    :func:`check_size` it.

    Raises:
        ExportError: not one integer or two joined by ``x``, or a size :func:`check_size` refuses; names ``key``.
    """
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", str(text))
    if match is None:
        raise ExportError(f"{key} {text!r}: expected N (square) or HEIGHTxWIDTH in pixels, multiples of 32, e.g. 416 "
                          "or 416x576")
    height = int(match.group(1))
    return check_size(height, int(match.group(2) or height), key)


def _check_writable(out: Path) -> Path:
    """Create ``out``'s folder and probe that ``out``'s temporary sibling can be written; returns that sibling.

    Raises:
        ExportError: ``out`` is a folder, its folder cannot be created, or the file cannot be written (names
        ``out`` and the system's reason).
    """
    if out.is_dir():
        raise ExportError(f"{out}: is a folder; give the ONNX file to write, e.g. {out / 'model.onnx'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"{out}: cannot create the folder {out.parent} ({err.strerror or err})") from err
    tmp = out.with_name(out.name + ".tmp")
    try:
        with open(tmp, "wb"):
            pass
    except OSError as err:
        raise ExportError(f"{out}: cannot write the ONNX file there ({err.strerror or err})") from err
    return tmp


def supports_dynamic_size(model: nn.Module) -> bool:
    """Whether ``model``'s graph, as traced by :class:`EndToEndDetector`, takes any input height/width (ONNX
    dynamic axes).

    True for the models verified to trace so (and checked at a second size by every dynamic export): dense
    detectors (their anchor points are rebuilt from the traced feature sizes) and Sparse R-CNN. False otherwise,
    e.g. Deformable DETR, whose multi-scale deformable attention splits the flattened memory by the level sizes as
    Python ints (:func:`e2edet.ops.ms_deform_attn.ms_deform_attn_core`), and AdaMixer, whose 3D sampling also
    keeps the traced level sizes: tracing turns those into constants, so these graphs are fixed at the export size.
    """
    return isinstance(model, (DenseDetector, SparseRCNN))


class EndToEndDetector(nn.Module):
    """Detector + top-k post-processing as one traceable module (see the module docstring for shapes).

    ``forward(images, image_sizes=None)``: ``images`` float32 ``[B, 3, H, W]`` normalised and padded;
    ``image_sizes`` int64 ``[B, 2]`` (h, w) of the unpadded images, where a row of zeros (and None) means the
    whole padded input; returns ``boxes [B, N, 4]`` xyxy pixels of the input, ``scores [B, N]``, ``labels [B, N]``.
    For dense detectors the boxes are decoded from the regression output (``pred_ltrb``, or ``pred_deltas`` of the
    anchors) at anchor points built from the traced feature sizes (:meth:`DenseDetector.decode_boxes`; equal to the
    model's ``pred_boxes``; the model's own points are Python-int constants under tracing).

    A dense model with a mask head (``model.mask_branch``) also returns ``masks [B, N, H/4, W/4]``: the sigmoid of
    the dynamic mask head (:func:`~e2edet.ops.dynamic_mask.dynamic_mask_logits`) of each detection's anchor point.

    Args:
        model: a detector obeying the model contract (``docs/architecture.md``): dense, query-based or DETR.
        score: ``cls`` (sigmoid of the logits), ``cls_filter`` (times sigmoid of the 3DMF filter logit), ``cls_ctr``
            (O2F: times sigmoid of the centerness logit), ``cls_ctr_cls_thresh`` (O2F CondInst: ``cls_ctr`` where
            the cls probability exceeds ``score_thresh``, else 0, so the runtime keeps the scores above 0) or
            ``drmm`` (D-RMM: softmax of the class logits times sigmoid of the foreground logit).
        max_detections: ``N``, detections per image.
        score_thresh: the cls-probability threshold of ``cls_ctr_cls_thresh`` (``test.score_thresh``).
    Raises:
        ValueError: an unsupported score mode.
    """

    def __init__(self, model: nn.Module, score: str, max_detections: int, score_thresh: float = 0.05):
        super().__init__()
        if score not in END_TO_END_SCORES:
            raise ValueError(f"score mode {score!r} is not end-to-end (export supports {', '.join(END_TO_END_SCORES)})")
        self.model, self.score, self.max_detections = model, score, max_detections
        self.score_thresh = float(score_thresh)
        self.dense = isinstance(model, DenseDetector)
        self.masks = self.dense and getattr(model, "mask_branch", None) is not None

    def forward(self, images: torch.Tensor, image_sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        if image_sizes is not None and not self.dense:  # zeros: the padded size (the graph input's default)
            full = torch._shape_as_tensor(images)[2:].to(image_sizes.dtype)
            image_sizes = torch.where(image_sizes > 0, image_sizes, full).expand(images.shape[0], 2)
        features: list[list[torch.Tensor]] = []
        hook = self.model.head.register_forward_pre_hook(lambda m, args: features.append(args[0])) if self.dense \
            else None
        try:
            out = self.model(images, None if self.dense else image_sizes)
        finally:
            if hook is not None:
                hook.remove()
        prob = query_scores(out, "drmm") if self.score == "drmm" else class_probabilities(out, self.score)
        if self.score == "cls_ctr_cls_thresh":  # threshold on the cls probability, rank by cls * ctr
            prob = torch.where(prob > self.score_thresh, prob * out["pred_ctr"].float().sigmoid().unsqueeze(-1), 0.0)
        num_classes = prob.shape[-1]
        scores, index = prob.flatten(1).topk(min(self.max_detections, prob.shape[1] * num_classes), dim=1)
        point = torch.div(index, num_classes, rounding_mode="floor")
        boxes = out["pred_boxes"]
        if self.dense:
            sizes = [(f.shape[-2], f.shape[-1]) for f in features[0]]
            points, strides = anchor_points(sizes, self.model.strides, device=images.device)[:2]
            boxes = self.model.decode_boxes(points, strides, out)
        boxes = boxes.gather(1, point.unsqueeze(-1).expand(-1, -1, 4))
        if not self.masks:
            return boxes, scores, index % num_classes
        all_params = out["pred_mask_params"]
        params = all_params.gather(1, point.unsqueeze(-1).expand(-1, -1, all_params.shape[-1]))
        logits = dynamic_mask_logits(out["mask_feats"], params, points[point], strides[point],
                                     int(out["mask_feat_stride"]), MASK_STRIDE)
        return boxes, scores, index % num_classes, logits[:, :, 0].float().sigmoid()


def onnx_metadata(cfg: Config, height: int, width: int, dynamic: bool) -> dict[str, str]:
    """The ``metadata_props`` :func:`export_onnx` writes: what a runtime needs to feed the graph and read its
    outputs. Every value is JSON text (:class:`e2edet.inference.OnnxPredictor` reads them).

    Keys: ``e2edet_format`` (:data:`ONNX_FORMAT`, plain text), ``e2edet_version``, ``recipe``, ``class_names``
    (label order), ``mean``/``std`` (RGB, of pixels scaled to ``[0, 1]``), ``resize`` (``{"rule":
    "shortest_edge", "min_size", "max_size"}``: scale ``min(min_size / shorter, max_size / longer)``, and at most
    the fixed input size), ``pad`` (``{"position": "bottom_right", "value": 0.0, "size_divisibility": 32,
    "fixed_size": [H, W] or null}``: zeros after normalisation, to multiples of 32 or to the fixed size),
    ``input_size`` (``[H, W]`` traced), ``dynamic_size``, ``inputs``/``outputs`` (names), ``box_format``,
    ``score`` (the score mode), ``max_detections``, ``postprocess`` (``{"score_thresh": float or null, "clip":
    bool}``: what follows the graph, as the recipe's post-processor does it: dense recipes keep scores above
    ``test.score_thresh`` (``cls_ctr_cls_thresh``: above 0, the graph has applied the threshold to the cls
    probability) and clip boxes to the image; instance-segmentation models also ``"masks": {"stride": 4,
    "threshold": 0.5}``: paste the ``masks`` output into the original image, as
    :func:`~e2edet.models.dense.mask_postprocess.paste_masks`) and ``e2edet_config`` (the whole config).
    """
    dense = cfg.model.arch == "dense"
    masks = dense and bool(getattr(cfg.model, "masks", False))
    thresh = (0.0 if cfg.test.score == "cls_ctr_cls_thresh" else cfg.test.score_thresh) if dense else None
    postprocess = {"score_thresh": thresh, "clip": dense}
    if masks:
        postprocess["masks"] = {"stride": MASK_STRIDE, "threshold": 0.5}
    values = {
        "e2edet_version": e2edet.__version__,
        "recipe": cfg.name,
        "class_names": list(cfg.model.class_names),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "resize": {"rule": "shortest_edge", "min_size": cfg.data.test_min_size, "max_size": cfg.data.test_max_size},
        "pad": {"position": "bottom_right", "value": 0.0, "size_divisibility": 32,
                "fixed_size": None if dynamic else [height, width]},
        "input_size": [height, width],
        "dynamic_size": dynamic,
        "inputs": ["images"] if dense else ["images", "image_sizes"],
        "outputs": ["boxes", "scores", "labels", *(["masks"] if masks else [])],
        "box_format": "xyxy pixels of the network input (the resized, unpadded image); scale by original / resized "
                      "size per axis",
        "score": cfg.test.score,
        "max_detections": cfg.test.max_detections,
        "postprocess": postprocess,
        "e2edet_config": to_dict(cfg),
    }
    return {"e2edet_format": ONNX_FORMAT, **{k: json.dumps(v) for k, v in values.items()}}


def _finish_onnx(path: Path, metadata: dict[str, str], optional_sizes: bool) -> None:
    """Write ``metadata`` into the file's ``metadata_props`` and, with ``optional_sizes``, give the ``image_sizes``
    input a default (an initializer of that name: ``[[0, 0]]``, the whole padded input), so a graph fed only
    ``images`` runs as the PyTorch model called without ``image_sizes``."""
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = (f"e2edet {metadata['e2edet_format']}: images [B, 3, H, W] -> boxes, scores, labels; read the "
                        "metadata_props for the preprocessing")
    if optional_sizes and any(i.name == "image_sizes" for i in proto.graph.input):
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((1, 2), np.int64), "image_sizes"))
    onnx.save(proto, str(path))


def _check_run(session, wrapper: EndToEndDetector, images: torch.Tensor, sizes: torch.Tensor | None, out: Path,
               what: str) -> None:
    """Run ``images`` (and ``sizes``) through onnxruntime and PyTorch; raise :class:`ExportMismatchError` naming
    ``out`` and ``what`` when the detections differ as sets (:func:`compare_detections`)."""
    names = {i.name for i in [*session.get_inputs(), *session.get_overridable_initializers()]}
    feed = {"images": images.numpy()}
    if sizes is not None and "image_sizes" in names:
        feed["image_sizes"] = sizes.numpy()
    with torch.no_grad():
        ref = [t.numpy() for t in wrapper(images, sizes if "image_sizes" in feed else None)]
    got = session.run(None, feed)
    problems = compare_detections(tuple(ref[:3]), tuple(got[:3]))
    if not problems and wrapper.masks:
        problems = compare_masks(ref, got)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ExportMismatchError(f"{out}: onnxruntime differs from PyTorch on {what}; worst difference: "
                                  f"{problems[0]}{more}")


def export_onnx(model: nn.Module, cfg: Config, out: str | Path, height: int, width: int, opset: int = 17,
                dynamic: bool | None = None) -> Path:
    """Export ``model`` (with its end-to-end post-processing) to a self-contained ONNX file and check it with
    onnxruntime.

    The graph (module docstring) has a dynamic batch and, when ``dynamic``, dynamic height and width; the file's
    ``metadata_props`` hold :func:`onnx_metadata`. The check runs onnxruntime and PyTorch on a random input of the
    export size (query and DETR models: with ``image_sizes`` smaller than the input, so the padding masks and
    box scales are checked too), then on a batch of two (the batch axis is dynamic for every graph) at, for a
    dynamic graph, a second size (64 px more in each side).

    Args:
        model: the trained detector; cfg: its config (score mode, max detections, class names, test sizes).
        out: ``.onnx`` path to write. height, width: input size in pixels, multiples of 32.
        opset: ONNX opset (>= 16 for Deformable DETR's ``GridSample``).
        dynamic: dynamic height/width; None (default) = where the model allows it (:func:`supports_dynamic_size`).
    Returns:
        The written path.
    Raises:
        ExportError (a ``ConfigError``): an FCOS-style recipe (needs NMS), a size that is not a positive multiple
            of 32, ``dynamic=True`` for a model that cannot have it, an ``out`` that cannot be written, or
            ``onnx``/``onnxruntime`` not installed.
        ExportMismatchError: onnxruntime's detections differ from PyTorch's when compared as sets
            (:func:`compare_detections`: same labels, scores within 1e-4, boxes IoU >= 0.99 or within 0.05 px;
            near-ties at the top-k cut-off may differ), or their masks by more than 1e-3 (:func:`compare_masks`);
            the message names ``out`` and the worst difference.
    """
    if cfg.test.nms_iou > 0:
        raise ExportError(f"{cfg.name} is evaluated with NMS (test.nms_iou={cfg.test.nms_iou}); export an end-to-end "
                          "recipe (poto, poto_3dmf, defcn, anchor, center, fg_loss, o2f, sparse_rcnn, adamixer, "
                          "drmm_*, deformable_detr*)")
    check_size(height, width)
    if cfg.model.arch == "dense" and cfg.test.topk_candidates < cfg.test.max_detections:
        raise ExportError(f"test.topk_candidates={cfg.test.topk_candidates} < test.max_detections="
                          f"{cfg.test.max_detections}: the graph's single top-k equals the per-level top-k only when "
                          "topk_candidates >= max_detections")
    if dynamic and not supports_dynamic_size(model):
        raise ExportError(f"{cfg.name}: its graph is traced for one input size (see supports_dynamic_size); export "
                          "it with a fixed size (--static)")
    dynamic = supports_dynamic_size(model) if dynamic is None else bool(dynamic)
    ort = _import_onnxruntime()

    wrapper = EndToEndDetector(model, cfg.test.score, cfg.test.max_detections, cfg.test.score_thresh).eval()
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(1, 3, height, width, generator=generator)
    sizes = torch.tensor([[height - 16 if height > 32 else height, width - 24 if width > 32 else width]])
    axes = {"images": {0: "batch", 2: "height", 3: "width"} if dynamic else {0: "batch"}, "image_sizes": {0: "batch"}}
    axes.update({name: {0: "batch"} for name in ("boxes", "scores", "labels")})
    axes["masks"] = {0: "batch", 2: "mask_height", 3: "mask_width"} if dynamic else {0: "batch"}
    out = Path(out)
    tmp = _check_writable(out)
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter (no onnxscript dependency) warns that it is legacy, and the tracer about
            # Python ints taken from shapes (constants of a fixed-size graph; a dynamic graph is checked at a second
            # size below).
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # the mask head's slices that are not constants (dynamic sizes): only an optimisation is skipped
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
            args = (example,) if wrapper.dense else (example, sizes)
            inputs = ["images"] if wrapper.dense else ["images", "image_sizes"]
            outputs = ["boxes", "scores", "labels", *(["masks"] if wrapper.masks else [])]
            torch.onnx.export(wrapper, args, str(tmp), input_names=inputs, output_names=outputs, opset_version=opset,
                              dynamo=False, dynamic_axes={k: axes[k] for k in [*inputs, *outputs]})
        _finish_onnx(tmp, onnx_metadata(cfg, height, width, dynamic), optional_sizes=not wrapper.dense)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # not the warning that the image_sizes default is no constant (intended)
        session = ort.InferenceSession(str(tmp), options, providers=["CPUExecutionProvider"])
        _check_run(session, wrapper, example, sizes, out, "a random input")
        # the batch axis is dynamic for every graph: check a batch of two images with different image_sizes, at a
        # second size where height/width are dynamic too
        h2, w2 = (height + 64, width + 64) if dynamic else (height, width)
        other = torch.randn(2, 3, h2, w2, generator=generator)
        sizes2 = torch.cat([sizes, torch.tensor([[h2, w2]])])
        _check_run(session, wrapper, other, sizes2, out, f"a random batch of 2 at {h2}x{w2}")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    return out
