"""Plain-PyTorch reference implementations: readable, float64-capable, differentiable by autograd.

They define the semantics of every vosops op; every backend is tested against them and every benchmark uses
them as the baseline.
"""

from .flow_warp import flow_warp, flow_warp_valid
from .local_attention import local_affinity, local_aggregate, local_attention
from .topk import global_topk, merge_topk, topk_aggregate, topk_attention
from .kmeans import kmeans_assign, kmeans_step

__all__ = ["flow_warp", "flow_warp_valid", "local_affinity", "local_aggregate", "local_attention",
           "global_topk", "merge_topk", "topk_aggregate", "topk_attention", "kmeans_assign", "kmeans_step"]
