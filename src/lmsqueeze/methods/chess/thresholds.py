"""Activation thresholds: the scalar magnitude quantile (CATS, TEAL, CHESS attention) and CHESS's
channel-wise FFN thresholds.

CHESS (He et al., 2024) scores FFN channel i of one token by importance_i = a_g,i^2 * E[a_u,i^2], where
a_g = act(W_gate x) and a_u = W_up x, and drops the channels whose importance is below one per-layer
value tau (the `sparsity` quantile of all importances). Dropping iff importance <= tau is the same as
keeping channel i iff |a_g,i| > t_i with t_i = sqrt(tau / E[a_u,i^2]).
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


def importance_threshold(gate_act: torch.Tensor, up_sq_mean: torch.Tensor, sparsity: float) -> torch.Tensor:
    """CHESS's per-layer tau: the `sparsity` quantile of a_g^2 * E[a_u^2].

    gate_act: [N, I] act(W_gate x) for N tokens; up_sq_mean: [I] E[(W_up x)^2] per channel.
    """
    return kth_smallest(gate_act.float().square() * up_sq_mean.float(), sparsity)


def channel_thresholds(tau: torch.Tensor, up_sq_mean: torch.Tensor) -> torch.Tensor:
    """t_i = sqrt(tau / E[a_u,i^2]): keep channel i iff |a_g,i| > t_i. Returns [I] float32.

    A channel whose up activation is always zero gets an infinite threshold (it never matters).
    """
    up = up_sq_mean.float()
    t = torch.sqrt(tau.float() / up)
    t = torch.where(up > 0, t, torch.full_like(t, float("inf")))
    return torch.where(tau > 0, t, torch.zeros_like(t))


def keep_fraction(gate_act: torch.Tensor, thresholds: torch.Tensor) -> float:
    """Fraction of entries of gate_act: [N, I] kept by per-channel (or scalar) thresholds: [I] or []."""
    return float((gate_act.float().abs() > thresholds.float()).float().mean())
