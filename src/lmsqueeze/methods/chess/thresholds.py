"""Activation thresholds: the scalar magnitude quantile (CATS, TEAL, CHESS attention) and CHESS's
channel-wise FFN thresholds.

CHESS (He et al., 2024) scores FFN channel i of one token by importance_i = a_g,i^2 * E[a_u,i^2], where
a_g = act(W_gate x) and a_u = W_up x, and drops the channels whose importance is below one per-layer
value tau (the `sparsity` quantile of all importances). Dropping iff importance <= tau is the same as
keeping channel i iff |a_g,i| > t_i with t_i = sqrt(tau / E[a_u,i^2]).

Rules (`CHANNEL_RULES`), i.e. the per-channel weight c_i in importance_i = a_g,i^2 * c_i:
  paper  c_i = E[a_u,i^2]                       (CHESS's code; the error of h = a_g * a_u)
  wdown  c_i = E[a_u,i^2] * ||W_down[:, i]||^2  (the expected squared change of the MLP *output*, which is
                                                 what the next layer sees; the paper drops the W_down factor)
"""

from __future__ import annotations

import math

import torch

from lmsqueeze.errors import LmsqueezeError


def check_sparsity(sparsity: float, what: str = "sparsity") -> float:
    """Return `sparsity` as a float in [0, 1); raise LmsqueezeError otherwise."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise LmsqueezeError(f"{what} must be a number in [0, 1), got {sparsity!r}; use e.g. 0.5")
    s = float(sparsity)
    if not (0.0 <= s < 1.0) or math.isnan(s):
        raise LmsqueezeError(f"{what} must be in [0, 1), got {sparsity!r}; use e.g. 0.5 (half the activations)")
    return s


def check_finite(x: torch.Tensor, where: str) -> None:
    """Raise LmsqueezeError if `x` holds NaN or inf (calibration would silently give garbage)."""
    if not bool(torch.isfinite(x).all()):
        raise LmsqueezeError(
            f"non-finite activations (NaN/inf) at {where} during calibration; check the batches and run the "
            "model in float32 or bfloat16 (float16 overflows in many models)"
        )


def kth_smallest(values: torch.Tensor, fraction: float) -> torch.Tensor:
    """The value below which `fraction` of `values` lie (no interpolation), as a 0-d float32 tensor.

    values: any shape (flattened). fraction 0 gives 0, so that thresholding with `> t` drops nothing
    but exact zeros (which contribute nothing anyway).
    """
    flat = values.detach().reshape(-1).float()
    k = int(fraction * flat.numel())
    if k <= 0:
        return torch.zeros((), dtype=torch.float32, device=flat.device)
    return flat.kthvalue(k).values


def magnitude_threshold(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Scalar t such that a fraction `sparsity` of the entries of x satisfies |x| <= t. x: [..., C]."""
    return kth_smallest(x.abs(), sparsity)


CHANNEL_RULES = ("paper", "wdown")


def check_rule(rule: str) -> str:
    """Return `rule` if it is one of CHANNEL_RULES; raise LmsqueezeError otherwise."""
    if rule not in CHANNEL_RULES:
        raise LmsqueezeError(f"rule must be one of {', '.join(CHANNEL_RULES)}, got {rule!r}")
    return rule


def channel_weight(up_sq_mean: torch.Tensor, w_down: torch.Tensor | None, rule: str) -> torch.Tensor:
    """c_i of `rule`: up_sq_mean: [I] E[a_u,i^2]; w_down: [H, I] down_proj weight (rule 'wdown'). Returns [I]."""
    c = up_sq_mean.float()
    if check_rule(rule) == "wdown":
        if w_down is None or w_down.shape[-1] != c.numel():
            raise LmsqueezeError("rule 'wdown' needs the down_proj weight [H, I] of the layer")
        c = c * w_down.detach().float().square().sum(0).to(c.device)
    return c


def importance_threshold(gate_act: torch.Tensor, weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """CHESS's per-layer tau: the `sparsity` quantile of a_g^2 * c.

    gate_act: [N, I] act(W_gate x) for N tokens; weight: [I] the rule's c_i (paper: E[(W_up x)^2]).
    """
    return kth_smallest(gate_act.float().square() * weight.float(), sparsity)


def channel_thresholds(tau: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """t_i = sqrt(tau / c_i): keep channel i iff |a_g,i| > t_i. Returns [I] float32.

    A channel whose weight is zero (its up activation is always zero) gets an infinite threshold.
    """
    up = weight.float()
    t = torch.sqrt(tau.float() / up)
    t = torch.where(up > 0, t, torch.full_like(t, float("inf")))
    return torch.where(tau > 0, t, torch.zeros_like(t))


def keep_fraction(gate_act: torch.Tensor, thresholds: torch.Tensor) -> float:
    """Fraction of entries of gate_act: [N, I] kept by per-channel (or scalar) thresholds: [I] or []."""
    return float((gate_act.float().abs() > thresholds.float()).float().mean())
