"""Attention processors that add the PSA user branch to whatever processor a layer already has.

A cross-attention layer's output becomes ``base(...) + scale * to_out(attn(Q, to_k_user(u), to_v_user(u)))``: the
installed processor (diffusers' default, xformers, IP-Adapter, a custom one) computes the layer as before, and the
user branch joins through the layer's own output projection without its bias. Because that projection is linear
this equals adding the branch before ``to_out``, as the paper writes it, without reimplementing attention.

The user tokens ``u`` (B, K, D) arrive explicitly, as ``cross_attention_kwargs={"psa_user_tokens": u}`` on the UNet
call (the pipeline mixin in ``psa_adapter.loaders`` builds them, batched for classifier-free guidance). diffusers
hands ``cross_attention_kwargs`` to self-attention too, and warns about names a processor does not take; the
self-attention processors are therefore wrapped in ``PSAPassThroughProcessor``, which drops the tokens.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

USER_TOKENS_KWARG = "psa_user_tokens"


class MissingUserTokensError(ValueError):
    """The UNet was called without user tokens while a PSA adapter is attached."""


def _takes_ip_adapter_masks(processor) -> bool:
    """Whether ``processor`` accepts ``ip_adapter_masks`` (diffusers passes a processor only the names it takes)."""
    parameters = inspect.signature(processor.__call__).parameters
    return "ip_adapter_masks" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


class _WrappingProcessor(nn.Module):
    """A processor that wraps the one installed before it and calls it with what diffusers passed, less the user
    tokens (and less ``ip_adapter_masks`` where the wrapped processor does not take them)."""

    def __init__(self, base_processor):
        super().__init__()
        self.base_processor = base_processor
        self.forward_masks = _takes_ip_adapter_masks(base_processor)

    def _call_base(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, ip_adapter_masks, kwargs):
        if ip_adapter_masks is not None and self.forward_masks:
            kwargs["ip_adapter_masks"] = ip_adapter_masks
        return self.base_processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


class PSAPassThroughProcessor(_WrappingProcessor):
    """Wraps a self-attention layer's processor while an adapter is attached: it accepts (and ignores) the user
    tokens so that diffusers does not warn about them, and calls the wrapped processor unchanged."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 psa_user_tokens=None, ip_adapter_masks=None, **kwargs):
        return self._call_base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, ip_adapter_masks,
                               kwargs)


class PSAAttnProcessor(_WrappingProcessor):
    """Wraps a cross-attention layer's processor and adds the PSA user branch (``branch``: a ``UserBranch``).

    At scale 0 only the wrapped processor runs, so the output is bit-identical to the layer without an adapter. With
    one user token the branch is ``to_v_user(u)`` broadcast over positions (softmax over a single key is 1), so no
    attention is computed; ``force_general_path`` exists to test that equivalence. The branch's weights belong to the
    adapter; as submodules of the processor they also follow ``unet.to(...)`` and appear in ``unet.state_dict()``
    while the adapter is attached.
    """

    def __init__(self, base_processor, branch: nn.Module, num_tokens: int, scale: float = 1.0):
        super().__init__(base_processor)
        self.branch = branch
        self.num_tokens = num_tokens
        self.scale = scale
        self.force_general_path = False

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 psa_user_tokens=None, ip_adapter_masks=None, **kwargs):
        user_tokens = self._check_tokens(psa_user_tokens, hidden_states.shape[0])
        out = self._call_base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, ip_adapter_masks,
                              kwargs)
        if self.scale == 0:
            return out
        branch = self._output_projection(attn, self._user_branch(attn, hidden_states, temb, user_tokens))
        branch = branch.to(out.dtype)
        if out.ndim == 4:  # (B, C, h, w) layers: the branch is (B, N or 1, C)
            b, c, h, w = out.shape
            branch = branch.transpose(1, 2)
            branch = branch.reshape(b, c, h, w) if branch.shape[-1] != 1 else branch.unsqueeze(-1)
        return out + self.scale * branch / attn.rescale_output_factor

    def _check_tokens(self, user_tokens, batch_size: int) -> torch.Tensor:
        if user_tokens is None:
            raise MissingUserTokensError(
                "a PSA adapter is attached to this UNet but the call carries no user tokens: generate with "
                "pipe(prompt, user_embeds=...) after load_psa_adapter(pipe, path), or call the UNet with "
                "cross_attention_kwargs={'psa_user_tokens': adapter.user_tokens(user_embeds)}; "
                "pipe.unload_psa_adapter() (or adapter.detach()) gives the base model back"
            )
        if user_tokens.ndim != 3 or user_tokens.shape[1] != self.num_tokens or user_tokens.shape[0] != batch_size:
            raise MissingUserTokensError(
                f"psa_user_tokens must have shape ({batch_size}, {self.num_tokens}, D) for this attention call, got "
                f"{tuple(user_tokens.shape)}; with classifier-free guidance pass the unconditional tokens and then "
                "the conditional ones, one row per image of the doubled batch"
            )
        return user_tokens

    def _user_branch(self, attn, hidden_states, temb, user_tokens: torch.Tensor) -> torch.Tensor:
        """(B, K, D) user tokens -> (B, N or 1, H) branch output before the output projection."""
        weight = self.branch.to_v_user.weight
        user_tokens = user_tokens.to(device=weight.device, dtype=weight.dtype)
        value = self.branch.to_v_user(user_tokens)
        if self.num_tokens == 1 and not self.force_general_path:
            return value  # (B, 1, H): broadcast over every query position
        query = self._query(attn, hidden_states, temb)
        batch_size, heads, _, head_dim = query.shape
        key = self.branch.to_k_user(user_tokens).view(batch_size, -1, heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query.to(weight.dtype), key, value, dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2).reshape(batch_size, -1, heads * head_dim)

    @staticmethod
    def _query(attn, hidden_states, temb) -> torch.Tensor:
        """The layer's (B, heads, N, head_dim) queries, prepared as diffusers' processors prepare them."""
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        if hidden_states.ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        batch_size = query.shape[0]
        query = query.view(batch_size, -1, attn.heads, query.shape[-1] // attn.heads).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        return query

    @staticmethod
    def _output_projection(attn, x: torch.Tensor) -> torch.Tensor:
        """``to_out[0]`` without its bias: the part of the output projection that is linear in ``x``."""
        layer = attn.to_out[0]
        if type(layer) is nn.Linear:
            return F.linear(x.to(layer.weight.dtype), layer.weight)
        # A wrapped projection (e.g. a LoRA layer): any affine map f gives f(x) - f(0) = its linear part.
        x = x.to(next(layer.parameters()).dtype)
        return layer(x) - layer(torch.zeros_like(x[:, :1]))
