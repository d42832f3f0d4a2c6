"""lmsqueeze.kernels: Triton kernels shared by several methods, each beside its PyTorch reference.

Importing this package does not import triton (kernel modules are loaded at first GPU call).
"""

from lmsqueeze.kernels.decode_attention import decode_attention, decode_attention_triton, default_num_splits
from lmsqueeze.kernels.merge import merge_attention_states
from lmsqueeze.kernels.reference import decode_attention_reference, decode_valid_mask

__all__ = ["decode_attention", "decode_attention_reference", "decode_attention_triton", "decode_valid_mask",
           "default_num_splits", "merge_attention_states"]
