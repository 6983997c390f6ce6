"""Triton backend of epic_ext: the kernel entry points with the signatures of
epic_ext._C.cpu and epic_ext.reference (see csrc/include/epic/ops.h for the contracts).

Runs CUDA tensors, and CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, which must be
set before this package is imported). Importing it raises ImportError when triton is missing.
"""
from .attn_scores import attn_scores
from .gather_merge import compress_topk, gather_merge, gather_merge_backward
from .kl import kl_div
from .select import iqr_select, select_topk

__all__ = ["attn_scores", "compress_topk", "gather_merge", "gather_merge_backward", "iqr_select", "kl_div",
           "select_topk"]
