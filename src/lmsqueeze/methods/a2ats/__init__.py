"""A²ATS: windowed RoPE, query-aware VQ of keys, top-k token retrieval, host-offloaded KV (He et al., 2025)."""

from lmsqueeze.methods.a2ats.method import A2ATS, random_artifact, with_settings

__all__ = ["A2ATS", "random_artifact", "with_settings"]
