"""Invariants of the personalised Diffusion-DPO loss (SPEC section 5)."""

import math

import pytest
import torch

from psa_adapter.loss import LOSS_AT_INIT, dpo_loss


def _preds(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 4, 8, 8, generator=g) for _ in range(5)]


def test_loss_is_ln2_when_policy_equals_reference():
    pol_w, pol_l, _, _, eps = _preds()
    loss, metrics = dpo_loss(pol_w, pol_l, pol_w.clone(), pol_l.clone(), eps)
    # Exactly -log sigmoid(0) = ln 2, rounded once to fp32.
    assert loss.dtype == torch.float32 and loss.item() == torch.tensor(math.log(2)).item()
    assert LOSS_AT_INIT == math.log(2)
    assert torch.equal(metrics["inside"], torch.zeros(3))
    assert metrics["implicit_acc"].item() == 0.5


def test_swapping_chosen_and_rejected_flips_the_sign_of_inside():
    pol_w, pol_l, ref_w, ref_l, eps = _preds()
    _, m = dpo_loss(pol_w, pol_l, ref_w, ref_l, eps, beta=10.0)
    _, swapped = dpo_loss(pol_l, pol_w, ref_l, ref_w, eps, beta=10.0)
    assert torch.all(m["inside"] != 0)
    torch.testing.assert_close(swapped["inside"], -m["inside"])
    assert m["implicit_acc"].item() + swapped["implicit_acc"].item() == pytest.approx(1.0)


def test_inside_matches_the_spec_formula_and_beta_convention():
    pol_w, pol_l, ref_w, ref_l, eps = _preds(batch=2, seed=1)
    beta = 5000.0
    loss, m = dpo_loss(pol_w, pol_l, ref_w, ref_l, eps, beta=beta)

    def e(x):
        return ((x - eps) ** 2).mean(dim=(1, 2, 3))

    inside = -(beta / 2) * ((e(pol_w) - e(pol_l)) - (e(ref_w) - e(ref_l)))
    torch.testing.assert_close(m["inside"], inside)
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(inside).mean())
    torch.testing.assert_close(m["mse_policy_w"], e(pol_w).mean())


def test_loss_decreases_when_the_policy_moves_toward_the_chosen_image():
    _, _, ref_w, ref_l, eps = _preds(seed=2)
    pol_w = ref_w + 0.01 * (eps - ref_w)  # closer to the noise on w: preferred
    loss, m = dpo_loss(pol_w, ref_l, ref_w, ref_l, eps, beta=5000.0)
    assert loss.item() < math.log(2)
    assert m["implicit_acc"].item() == 1.0


def test_gradient_flows_only_through_the_policy_and_sft_term_is_named():
    pol_w, pol_l, ref_w, ref_l, eps = _preds(seed=3)
    pol_w.requires_grad_(True)
    ref_w.requires_grad_(True)
    loss, m = dpo_loss(pol_w, pol_l, ref_w, ref_l, eps, sft_weight=0.0)
    loss.backward()
    assert pol_w.grad is not None and ref_w.grad is None
    loss_sft, m_sft = dpo_loss(pol_w, pol_l, ref_w, ref_l, eps, sft_weight=1000.0)
    torch.testing.assert_close(loss_sft, m_sft["dpo_loss"] + 1000.0 * m_sft["sft_loss"])
    torch.testing.assert_close(m_sft["dpo_loss"], m["dpo_loss"])


def test_shape_mismatch_is_a_clear_error():
    pol_w, pol_l, ref_w, ref_l, eps = _preds()
    with pytest.raises(ValueError, match="one shape"):
        dpo_loss(pol_w, pol_l[:2], ref_w, ref_l, eps)
