"""Dense plain-PyTorch references of FastCLIP's objectives (materialized [n, n] similarities).

Ground truth for tests in fp64 at moderate scales; like fast_clip's own code, they exponentiate
s (P_ij - P_ii) directly and can overflow where the library cannot (s = 100, P_ij - P_ii = 2).
All take the global batch: x, y [n, D]; per-anchor scales s1, s2 (0-d or [n]).
"""

import torch


def _as_rows(s, n, like):
    s = torch.as_tensor(s, dtype=like.dtype, device=like.device)
    return s.expand(n) if s.dim() == 0 else s


def gcl_g_ref(x, y, s1, s2):
    """(g1 [n], g2 [n]): g1_i = 1/(n-1) sum_{j != i} exp(s1_i (x_i.y_j - x_i.y_i)), g2 with x, y swapped."""
    n = x.shape[0]
    sim = x @ y.T
    diag = sim.diagonal()
    off = ~torch.eye(n, dtype=torch.bool, device=x.device)
    s1, s2 = _as_rows(s1, n, sim), _as_rows(s2, n, sim)
    e1 = torch.exp(s1[:, None] * (sim - diag[:, None])) * off
    e2 = torch.exp(s2[:, None] * (sim.T - diag[:, None])) * off
    return e1.sum(1) / (n - 1), e2.sum(1) / (n - 1)


def gcl_objective_ref(x, y, tau1, tau2, eps, rho=0.0, per_sample=False):
    """1/n sum_i 1/2 [tau1_i (log(eps + g1_i) + rho) + tau2_i (log(eps + g2_i) + rho)].

    With a global tau (tau1 = tau2 = tau) and per_sample=False this is RGCL-g (GCL when rho = 0):
    tau/n sum_i 1/2 [log(eps + g1_i) + log(eps + g2_i)] + rho tau.
    """
    g1, g2 = gcl_g_ref(x, y, 1.0 / tau1, 1.0 / tau2)
    n = x.shape[0]
    tau1, tau2 = _as_rows(tau1, n, g1), _as_rows(tau2, n, g1)
    terms = tau1 * (torch.log(eps + g1) + rho) + tau2 * (torch.log(eps + g2) + rho)
    return 0.5 * terms.mean()


def fcco_surrogate_ref(x, y, tau1, tau2, u1, u2, eps, weight1, weight2):
    """1/n sum_i 1/2 [w1_i g1_i / (eps + u1_i) + w2_i g2_i / (eps + u2_i)], u and w constants.

    Its gradient in x, y is FastCLIP's FCCO model-gradient estimator (w = tau: ``exact``)."""
    g1, g2 = gcl_g_ref(x, y, 1.0 / tau1, 1.0 / tau2)
    return 0.5 * (weight1 * g1 / (eps + u1) + weight2 * g2 / (eps + u2)).mean()
