"""Query-based detectors: Sparse R-CNN and AdaMixer, each with a ``drmm`` switch (D-RMM mixture outputs), and the
shared query post-processor. Output contract: ``docs/architecture.md`` "Query model output"."""

from e2edet.models.query.adamixer import AdaMixer
from e2edet.models.query.postprocess import QueryPostProcessor
from e2edet.models.query.sparse_rcnn import SparseRCNN

__all__ = ["AdaMixer", "QueryPostProcessor", "SparseRCNN"]
