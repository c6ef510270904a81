"""Plain-PyTorch reference implementations: readable, float64-capable, differentiable by autograd.

They define the semantics of every vosops op; every backend is tested against them and every benchmark uses
them as the baseline.
"""

from .flow_warp import flow_warp, flow_warp_valid
from .kmeans import kmeans_assign, kmeans_step

__all__ = ["flow_warp", "flow_warp_valid", "kmeans_assign", "kmeans_step"]
