"""Cross-attention processor with the PSA user branch.

``out = attn(Q, K_text, V_text) + scale * attn(Q, to_k_user(u), to_v_user(u))``, before the layer's ``to_out``.
The user tokens ``u`` are the last ``num_tokens`` entries of ``encoder_hidden_states``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class PSAAttnProcessor:
    """Replaces a cross-attention layer's processor while an adapter is attached.

    Deliberately not an ``nn.Module``: the weights belong to the adapter, so the UNet's parameters and state dict
    never change when an adapter is attached.

    At scale 0 the original processor runs on the text tokens alone, so the output is bit-identical to the base
    model. With one user token the branch is ``scale * to_v_user(u)`` broadcast over positions (softmax over a
    single key is 1), so no attention is computed; ``force_general_path`` exists to test that equivalence.
    """

    def __init__(self, branch, num_tokens: int, base_processor, scale: float = 1.0):
        self.branch = branch
        self.num_tokens = num_tokens
        self.base_processor = base_processor
        self.scale = scale
        self.force_general_path = False

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        k = self.num_tokens
        if encoder_hidden_states is None or encoder_hidden_states.shape[1] <= k:
            raise ValueError(
                "a PSA adapter is attached but the cross-attention input carries no user tokens: append "
                "adapter.user_tokens(...) with adapter.extend_hidden_states(...) (or detach the adapter)"
            )
        text_states = encoder_hidden_states[:, :-k]
        user_tokens = encoder_hidden_states[:, -k:]
        if attention_mask is not None and attention_mask.shape[-1] == encoder_hidden_states.shape[1]:
            attention_mask = attention_mask[..., :-k]
        if self.scale == 0:
            return self.base_processor(attn, hidden_states, text_states, attention_mask, temb, **kwargs)
        return self._forward(attn, hidden_states, text_states, user_tokens, attention_mask, temb)

    def _user_branch(self, attn, query: torch.Tensor, user_tokens: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, head_dim) queries and (B, K, D) user tokens -> (B, N or 1, H) branch output."""
        weight = self.branch.to_v_user.weight
        user_tokens = user_tokens.to(weight.dtype)
        value = self.branch.to_v_user(user_tokens)
        if self.num_tokens == 1 and not self.force_general_path:
            return value  # (B, 1, H): broadcast over every query position
        batch_size, heads, _, head_dim = query.shape
        key = self.branch.to_k_user(user_tokens).view(batch_size, -1, heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query.to(weight.dtype), key, value, dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2).reshape(batch_size, -1, heads * head_dim)

    def _forward(self, attn, hidden_states, text_states, user_tokens, attention_mask, temb):
        # The same operations, in the same order, as diffusers' AttnProcessor2_0, so that a zero branch adds
        # exactly nothing; the user branch joins before the output projection.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = text_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            text_states = attn.norm_encoder_hidden_states(text_states)
        key = attn.to_k(text_states)
        value = attn.to_v(text_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        user_out = self._user_branch(attn, query, user_tokens)
        hidden_states = hidden_states + self.scale * user_out.to(hidden_states.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
