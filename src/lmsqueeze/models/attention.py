"""Our attention forward for Llama / Mistral / Qwen2 / Qwen3 attention modules.

It computes q/k/v with the module's own projections (Qwen3's q/k norms and Qwen2's biases come with the
modules), and hands *pre-RoPE* q/k, v, positions and the layer's cos/sin to the active session's backend.
"""

from __future__ import annotations

import torch


def lmsqueeze_attention_forward(self, hidden_states: torch.Tensor, position_embeddings=None,
                                attention_mask=None, past_key_values=None, cache=None, **kwargs):
    """Drop-in for `XAttention.forward` (transformers >= 5.4). hidden_states: [B, T, hidden].

    The cache comes as `past_key_values` (transformers < 5.24) or `cache` (5.24 renamed it)."""
    past_key_values = past_key_values if past_key_values is not None else cache
    B, T, _ = hidden_states.shape
    shape = (B, T, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(shape)
    k = self.k_proj(hidden_states).view(shape)
    v = self.v_proj(hidden_states).view(shape)
    if hasattr(self, "q_norm"):
        q = self.q_norm(q)
        k = self.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    cos, sin = position_embeddings
    positions = kwargs.get("position_ids")
    out = self._lmsqueeze_session.attend(self, q, k, v, cos, sin, positions, past_key_values)
    out = out.transpose(1, 2).reshape(B, T, -1)
    return self.o_proj(out), None
