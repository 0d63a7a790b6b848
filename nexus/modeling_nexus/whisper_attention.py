"""Whisper's attention layout, shared by the audio encoder and the ``whisper_decoder`` tower: q/v/out biases, no k
bias, SDPA with scale ``head_dim ** -0.5``. ``forward(x)`` is bidirectional self-attention (the encoder); the tower
calls ``heads`` and ``attend`` itself for causal self-attention with a cache and for cross-attention.

This file imports only torch: it is copied into every checkpoint.
"""

import torch.nn.functional as F
from torch import nn


class NexusWhisperAttention(nn.Module):
    def __init__(self, d_model, num_heads, head_dim, kv_size=None):
        """``kv_size``: width of what keys/values are read from (cross-attention over a prefix of another width;
        default ``d_model``)."""
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        kv_size = kv_size or d_model
        self.q_proj = nn.Linear(d_model, num_heads * head_dim, bias=True)
        self.k_proj = nn.Linear(kv_size, num_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(kv_size, num_heads * head_dim, bias=True)
        self.out_proj = nn.Linear(num_heads * head_dim, d_model, bias=True)

    def heads(self, proj, x):
        """(B, T, d) through ``proj`` -> (B, nh, T, hd)."""
        B, T, _ = x.shape
        return proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    def attend(self, q, k, v, mask=None, causal=False):
        """SDPA over (B, nh, T, hd) queries and (B, nh, S, hd) keys/values -> out_proj (B, T, d)."""
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.head_dim**-0.5)
        B, _, T, _ = y.shape
        return self.out_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))

    def forward(self, x):
        return self.attend(self.heads(self.q_proj, x), self.heads(self.k_proj, x), self.heads(self.v_proj, x))
