"""Squeezed Attention: prepare a fixed context offline (K-means of its keys), read only the keys that matter."""

from lmsqueeze.methods.squeezed.method import SqueezedAttention

__all__ = ["SqueezedAttention"]
