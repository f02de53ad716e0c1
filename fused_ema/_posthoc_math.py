"""The math of post-hoc EMA (EDM2, Karras et al. 2024, section 3), in float64.

A power-function EMA with exponent ``gamma`` updated with
``beta_t = (1 - 1/t) ** (gamma + 1)`` (t = 1, 2, ... counts the updates) weighs the
weights of step ``tau`` after ``t`` steps by
``(tau**(gamma+1) - (tau-1)**(gamma+1)) / t**(gamma+1)``: exactly the integral over ``[tau - 1, tau]`` of the continuous profile

    p_{t,gamma}(x) = (gamma + 1) * x**gamma / t**(gamma + 1)   on [0, t], 0 after.

So an EMA is ``integral(p * theta)`` with ``theta`` the piecewise-constant weight trajectory,
and a combination ``sum_i c_i * snapshot_i`` has the profile ``sum_i c_i * p_i``: the
synthesized EMA differs from the target EMA by ``integral((sum c_i p_i - p_target) * theta)``,
at most ``||sum c_i p_i - p_target||_2 * ||theta||_2`` (Cauchy-Schwarz). Minimizing the L2
distance of the profiles (a least-squares problem in the closed-form inner products below)
is therefore the right criterion in discrete steps too, not only in the continuous limit.
"""
import math
from dataclasses import dataclass
from typing import List, Sequence

import torch

__all__ = ["GAMMA_MIN", "SIGMA_REL_MAX", "sigma_rel_to_gamma", "gamma_to_sigma_rel", "beta",
           "profile_dot", "Fit", "fit"]

# sigma_rel(gamma) rises from 0 at gamma = -1 to its maximum at the root of
# gamma**2 + 3*gamma + 1 = 0 and falls towards 0 as gamma grows; post-hoc EMA uses the
# falling branch (the larger root of the cubic), where longer averages have larger gamma.
GAMMA_MIN = (math.sqrt(5.0) - 3.0) / 2.0  # -0.38197: the peak of sigma_rel(gamma)


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of the power-function profile with exponent ``gamma``:
    ``sqrt((gamma + 1) / ((gamma + 2)**2 * (gamma + 3)))``."""
    g = float(gamma)
    if not (math.isfinite(g) and g > -1.0):
        raise ValueError(f"fused_ema: gamma must be a finite number > -1, got {gamma!r}")
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


SIGMA_REL_MAX = gamma_to_sigma_rel(GAMMA_MIN)  # 0.30028


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent whose profile has this relative standard deviation: the largest real
    root of ``gamma**3 + 7 gamma**2 + (16 - s) gamma + (12 - s) = 0`` with ``s = sigma_rel**-2``
    (the equation above solved for gamma), found by bisection to full float64 precision.
    ``sigma_rel`` must be in ``(0, 0.30028]``."""
    s = float(sigma_rel)
    if not (math.isfinite(s) and 0.0 < s <= SIGMA_REL_MAX):
        raise ValueError(f"fused_ema: sigma_rel must be in (0, {SIGMA_REL_MAX:.5f}] (the largest "
                         f"relative width a power-function profile has), got {sigma_rel!r}")
    inv = s ** -2

    def cubic(g: float) -> float:  # (g+2)^2 (g+3) - inv (g+1): < 0 left of the root, > 0 right
        return ((g + 7.0) * g + (16.0 - inv)) * g + (12.0 - inv)

    # On [GAMMA_MIN, 1/s] the cubic goes from <= 0 (sigma_rel <= SIGMA_REL_MAX) to > 0
    # (sigma_rel(gamma) < 1/(gamma + 2) puts the root below 1/s - 2) and has one root there.
    lo, hi = GAMMA_MIN, max(1.0 / s, GAMMA_MIN + 1.0)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if cubic(mid) > 0.0:
            hi = mid
        else:
            lo = mid
    return lo if abs(cubic(lo)) <= abs(cubic(hi)) else hi


def beta(t: int, gamma: float) -> float:
    """The decay of update ``t`` (1, 2, ...) of the power-function EMA: ``(1 - 1/t)**(gamma+1)``
    (0 at t = 1: the first update copies)."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def profile_dot(t_a, gamma_a, t_b, gamma_b) -> torch.Tensor:
    """``integral(p_{t_a,gamma_a} * p_{t_b,gamma_b})`` in closed form, broadcasting, float64:
    ``(ga+1)(gb+1) m**(ga+gb+1) / ((ga+gb+1) t_a**(ga+1) t_b**(gb+1))`` with ``m = min(t_a, t_b)``,
    computed in logs (the powers overflow for long runs)."""
    t_a, g_a, t_b, g_b = (torch.as_tensor(x, dtype=torch.float64)
                          for x in (t_a, gamma_a, t_b, gamma_b))
    m = torch.minimum(t_a, t_b)
    log = (torch.log1p(g_a) + torch.log1p(g_b) - torch.log(g_a + g_b + 1.0)
           + (g_a + g_b + 1.0) * torch.log(m) - (g_a + 1.0) * torch.log(t_a)
           - (g_b + 1.0) * torch.log(t_b))
    return torch.exp(log)


@dataclass
class Fit:
    """The least-squares combination of snapshot profiles closest to a target profile."""
    coefficients: List[float]
    relative_error: float  # ||sum c_i p_i - p_target||_2 / ||p_target||_2
    target_norm: float  # ||p_target||_2 (bounds the EMA error with ||theta||_2, see above)
    rank: int  # eigenvalues of the Gram matrix kept by the solve

    @property
    def gain(self) -> float:
        """``sum |c_i|``: how much the combination can amplify an error of the snapshots
        (16-bit rounding, for instance)."""
        return float(sum(abs(c) for c in self.coefficients))


def fit(steps: Sequence[float], gammas: Sequence[float], target_step: float,
        target_gamma: float, rcond: float = 1e-13) -> Fit:
    """Coefficients ``c`` minimizing ``||sum_i c_i p_{steps_i,gammas_i} - p_target||_2``.

    The normal equations ``A c = b`` (A: Gram matrix of the snapshot profiles) are solved
    through the eigendecomposition of A, dropping eigenvalues below ``rcond * max``:
    snapshots close in time are nearly collinear, and the minimum-norm solution keeps the
    coefficients (and with them the amplification of snapshot rounding) small.
    """
    if len(steps) == 0:
        raise ValueError("fused_ema: no snapshot to combine")
    t = torch.tensor(steps, dtype=torch.float64)
    g = torch.tensor(gammas, dtype=torch.float64)
    a = profile_dot(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_dot(t, g, float(target_step), float(target_gamma))
    c_tt = float(profile_dot(float(target_step), float(target_gamma), float(target_step),
                             float(target_gamma)))
    # Scale to unit diagonal first: the profiles' norms differ by orders of magnitude.
    d = a.diagonal().rsqrt()
    a_n, b_n = a * d[:, None] * d[None, :], b * d
    evals, evecs = torch.linalg.eigh(a_n)
    keep = evals > rcond * evals.max()
    proj = evecs[:, keep].T @ b_n
    c = (evecs[:, keep] @ (proj / evals[keep])) * d
    # ||fit - target||^2 = c^T A c - 2 c^T b + <p_t, p_t>, all in closed form.
    resid2 = max(float(c @ a @ c - 2.0 * (c @ b)) + c_tt, 0.0)
    return Fit(coefficients=c.tolist(), relative_error=math.sqrt(resid2 / c_tt),
               target_norm=math.sqrt(c_tt), rank=int(keep.sum()))
