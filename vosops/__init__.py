"""vosops: fused CPU, CUDA and Triton kernels for video object segmentation mask propagation.

Every op takes `backend=` ("auto", "reference", "cpu", "cuda", "triton"); `vosops.use_backend(name)` sets it for
a block. See README.md for the op table.
"""

from ._version import __version__
from . import _native  # loads vosops._C (warns once if it cannot)
from ._backends import BACKENDS, BackendUnavailableError, current_backend, use_backend
from .ops.flow_warp import flow_warp
from .ops.local_attention import local_affinity, local_aggregate, local_attention
from .ops.topk import global_topk, merge_topk, topk_aggregate, topk_attention
from .ops.kmeans import KMeansResult, kmeans, kmeans_predict
from .ops.pseudo_labels import position_encoding_3d, video_pseudo_labels

__all__ = [
    "__version__",
    "BACKENDS",
    "BackendUnavailableError",
    "current_backend",
    "use_backend",
    "flow_warp",
    "local_affinity",
    "local_aggregate",
    "local_attention",
    "global_topk",
    "merge_topk",
    "topk_aggregate",
    "topk_attention",
    "KMeansResult",
    "kmeans",
    "kmeans_predict",
    "position_encoding_3d",
    "video_pseudo_labels",
]
