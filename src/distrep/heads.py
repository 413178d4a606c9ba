"""The prior-art distance layers the paper's related work names, as layers of the model family.

Each maps ``[*, in_features] -> [*, out_features]`` (any leading dimensions, as ``nn.Linear``)
and, like OffsetL2, gives a *distance*-style output (small = near the unit's prototype) except
``cosine``, a similarity (large = alike). A model reads them as logits directly, or through
``neg`` (logit_j = -d_j), exactly as the paper's OffsetL2 models do: ``linear-relu-rbf-neg`` is
a Gaussian RBF classifier on a learned hidden layer. All are trained by cross-entropy on the
model's outputs; none has a hand-written batched gradient, so the engine trains them on its
autograd path (:class:`distrep.engine.AutogradRuns`).

Initialisation (``reset_parameters(generator)``, seeded per layer by the model family):
prototypes mu ~ N(0, 0.1^2) as OffsetL2's; metrics start at the identity, widths at 1, the
cosine classifier's weights as ``nn.Linear``'s and its scale at 10.
"""

from __future__ import annotations

import torch
from torch import nn

from distrep.layers import CODED_CLAMP, linear_init_bound


def _prototypes(out_features: int, in_features: int, **kw) -> nn.Parameter:
    return nn.Parameter(torch.empty(out_features, in_features, **kw))


class RBF(nn.Module):
    """Gaussian RBF distances with learned centres and widths:

        d_j = gamma_j ||x - mu_j||^2,   gamma_j = exp(rho_j)   (gamma > 0 by construction)

    so ``rbf-neg`` gives logit_j = -gamma_j ||x - mu_j||^2, the log of a Gaussian kernel.
    Parameters ``mu [out, in]``, ``rho [out]``."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.mu = _prototypes(out_features, in_features, **kw)
        self.rho = nn.Parameter(torch.empty(out_features, **kw))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            self.mu.normal_(0.0, 0.1, generator=generator)
            self.rho.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rho.exp() * squared_euclidean(x, self.mu)


class _LearnedMetric(nn.Module):
    """Prototypes ``mu [out, in]`` and a learned linear map ``omega``: one per output
    ``[out, rank, in]`` (``per_class``) or one shared ``[rank, in]``, rank = in unless given;
    mu ~ N(0, 0.1^2), omega starting at the identity (rows of it for a lower rank)."""

    per_class: bool

    def __init__(self, in_features: int, out_features: int, rank: int | None = None,
                 device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.rank = rank or in_features
        self.mu = _prototypes(out_features, in_features, **kw)
        shape = (out_features,) * self.per_class + (self.rank, in_features)
        self.omega = nn.Parameter(torch.empty(shape, **kw))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            self.mu.normal_(0.0, 0.1, generator=generator)
            self.omega.copy_(torch.eye(self.rank, self.in_features).expand_as(self.omega))


class Mahalanobis(_LearnedMetric):
    """One learned metric per output (a full Mahalanobis distance each, low rank allowed):

        d_j = || Omega_j (x - mu_j) ||_2  = sqrt((x - mu_j)^T Omega_j^T Omega_j (x - mu_j))

    with the square root floored at 1e-12 under it, as OffsetL2's coded form, so that its
    gradient stays finite at a prototype. Parameters ``mu [out, in]``, ``omega [out, rank, in]``
    (rank = in unless given); Omega_j starts at the identity (rows of it for a lower rank)."""

    per_class = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Omega_j (x - mu_j) = Omega_j x - Omega_j mu_j: one product for every j at once
        projected = (torch.einsum("jri,...i->...jr", self.omega, x)
                     - torch.einsum("jri,ji->jr", self.omega, self.mu))
        return projected.square().sum(-1).clamp_min(CODED_CLAMP).sqrt()


class GMLVQ(_LearnedMetric):
    """Generalized matrix LVQ's distance: one learned metric shared by every prototype,

        d_j = || Omega (x - mu_j) ||_2^2

    (GMLVQ proper trains it with its own cost; here it is trained by cross-entropy on the
    model's outputs, e.g. -d through ``neg``). Parameters ``mu [out, in]``, ``omega [rank, in]``
    (rank = in unless given), Omega starting at the identity."""

    per_class = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return squared_euclidean(x @ self.omega.t(), self.mu @ self.omega.t())


class Cosine(nn.Module):
    """Cosine-similarity classifier with a learned scale (the usual normalised intensity-style
    baseline):

        s_j = kappa (x . w_j) / (max(||x||, eps) max(||w_j||, eps)),   eps = 1e-8

    Parameters ``weight [out, in]`` (drawn as ``nn.Linear``'s) and ``kappa`` (a scalar, 10 at
    the start: cosines alone lie in [-1, 1], too flat for a softmax over 10 classes)."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.kappa = nn.Parameter(torch.empty((), **kw))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        bound = linear_init_bound(self.in_features)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound, generator=generator)
            self.kappa.fill_(10.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = 1e-8
        xn = x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
        wn = self.weight / self.weight.norm(dim=-1, keepdim=True).clamp_min(eps)
        return self.kappa * (xn @ wn.t())


def squared_euclidean(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """||x_n - mu_j||^2 for ``x [*, in]``, ``mu [out, in]`` -> ``[*, out]``, by the expansion
    ||x||^2 - 2 x.mu + ||mu||^2 (one product, no ``[n, out, in]`` tensor), floored at 0 where
    rounding makes it negative."""
    return (x.square().sum(-1, keepdim=True) - 2 * x @ mu.t() + mu.square().sum(-1)).clamp_min(0.0)


# Spec name -> layer class, for the model family's grammar.
HEADS: dict[str, type[nn.Module]] = {"rbf": RBF, "mahalanobis": Mahalanobis, "gmlvq": GMLVQ,
                                     "cosine": Cosine}
