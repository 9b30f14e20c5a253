"""The personalised Diffusion-DPO objective (SPEC section 5) as a pure function.

Beta convention: ``inside = -(beta / 2) * ((e_pol_w - e_pol_l) - (e_ref_w - e_ref_l))`` with beta = 5000, as in the
Diffusion-DPO paper and the PSA reference. diffusers' DPO example writes the same loss as
``-beta' * (model_diff - ref_diff)`` with ``beta' = beta / 2 = 2500``; our ``beta_dpo`` flag always means the
paper's beta.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Loss of a policy that equals its reference (a fresh, zero-initialised adapter): -log sigmoid(0).
LOSS_AT_INIT = math.log(2.0)


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) prediction and target -> (B,) mean squared error over every dimension but the batch, in fp32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def dpo_loss(
    policy_pred_w: torch.Tensor,
    policy_pred_l: torch.Tensor,
    ref_pred_w: torch.Tensor,
    ref_pred_l: torch.Tensor,
    target: torch.Tensor,
    beta: float = 5000.0,
    sft_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO loss for a batch of B preference pairs (w = chosen, l = rejected).

    Args:
        policy_pred_w, policy_pred_l: (B, C, H, W) predictions of the policy (adapter on) for the noised chosen
            and rejected latents. Gradients flow through these.
        ref_pred_w, ref_pred_l: (B, C, H, W) predictions of the reference (adapter off); treated as constants.
        target: (B, C, H, W) regression target shared by both images of a pair (the noise ``eps`` for
            epsilon-prediction models, the velocity for v-prediction), since both images get the same noise and
            timestep.
        beta: the paper's beta (5000 for PSA): ``inside = -(beta/2) * ((e_pol_w - e_pol_l) - (e_ref_w - e_ref_l))``.
            Pass ``2 * beta'`` when porting a diffusers DPO config that uses ``beta' = 2500``.
        sft_weight: weight of an optional supervised term ``sft_weight * mean((policy_pred_w - target)^2)`` on the
            chosen image. 0 (the default) is the paper's loss; a positive value is the "DPO + SFT" variant, a known
            stabiliser of Diffusion-DPO (see docs/TOYWORLD.md).

    Returns:
        ``(loss, metrics)``: ``loss`` a scalar (fp32) to minimise; ``metrics`` detached tensors: scalars
        ``loss``, ``dpo_loss``, ``sft_loss``, ``implicit_acc`` (share of pairs with inside > 0, ties count half),
        ``mse_policy_w``, ``mse_policy_l``, ``mse_ref_w``, ``mse_ref_l``, ``inside_mean``, and the per-pair
        ``inside`` of shape (B,). At initialisation (policy == reference) ``loss == ln 2`` exactly.
    """
    shapes = {tuple(t.shape) for t in (policy_pred_w, policy_pred_l, ref_pred_w, ref_pred_l, target)}
    if len(shapes) != 1:
        raise ValueError(
            "dpo_loss expects five tensors of one shape (B, C, H, W); got "
            f"{[tuple(t.shape) for t in (policy_pred_w, policy_pred_l, ref_pred_w, ref_pred_l, target)]}"
        )
    e_pol_w = per_sample_mse(policy_pred_w, target)
    e_pol_l = per_sample_mse(policy_pred_l, target)
    with torch.no_grad():
        e_ref_w = per_sample_mse(ref_pred_w, target)
        e_ref_l = per_sample_mse(ref_pred_l, target)
    inside = -0.5 * beta * ((e_pol_w - e_pol_l) - (e_ref_w - e_ref_l))
    dpo = -F.logsigmoid(inside).mean()
    sft = e_pol_w.mean()
    loss = dpo + sft_weight * sft if sft_weight else dpo
    acc = (inside > 0).float() + 0.5 * (inside == 0).float()
    metrics = {
        "loss": loss.detach(),
        "dpo_loss": dpo.detach(),
        "sft_loss": sft.detach(),
        "implicit_acc": acc.mean().detach(),
        "mse_policy_w": e_pol_w.mean().detach(),
        "mse_policy_l": e_pol_l.mean().detach(),
        "mse_ref_w": e_ref_w.mean(),
        "mse_ref_l": e_ref_l.mean(),
        "inside_mean": inside.mean().detach(),
        "inside": inside.detach(),
    }
    return loss, metrics
