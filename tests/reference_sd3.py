"""The SD3 reference attention processor, shared by the tests (tests/test_sd3.py's float64 recipe) and bench/
(bench/baseline_sd3.py, the diffusers baseline). Like reference_sd.py it imports diffusers where it is used and
nothing of pytest, so bench/ can import it too."""

from __future__ import annotations

import torch


class JointProbs:
    """A diffusers attention processor for SD3's joint attention: the head-averaged softmax over [image | text]
    keys kept in `maps[name]` (B, N + T, N + T), computed explicitly from the processor's own q/k; the output is
    diffusers' JointAttnProcessor2_0's."""

    def __init__(self, name: str, maps: dict):
        import diffusers

        self.name, self.maps, self.inner = name, maps, diffusers.models.attention_processor.JointAttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        def heads(t):  # (B, N, D) -> (B, h, N, d)
            return t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

        q, k = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            tq, tk = heads(attn.add_q_proj(encoder_hidden_states)), heads(attn.add_k_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                tq, tk = attn.norm_added_q(tq), attn.norm_added_k(tk)
            q, k = torch.cat([q, tq], dim=2), torch.cat([k, tk], dim=2)
        self.maps[self.name] = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1).mean(1)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
