"""Pure tensor operations shared by models, assigners and losses; this package imports nothing else from e2edet.

- :mod:`e2edet.ops.boxes`: box transforms and coders (ltrb, DeltaXYWH, xyzr, normalised cxcywh, inverse sigmoid,
  normalisation by image size, rescaling to the original image).
- :mod:`e2edet.ops.ms_deform_attn`: the multi-scale deformable attention sampling core (``grid_sample``, float32
  under autocast, ONNX-exportable).
"""
