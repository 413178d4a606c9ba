"""OffsetL2 and the small activations the model family needs.

OffsetL2 computes, for each output j, a weighted Euclidean distance to a learned prototype:

    y_j = || alpha_j * (x - mu_j) ||_2 = sqrt( sum_i alpha_ji^2 (x_i - mu_ji)^2 )      (paper)

After a Linear layer this is a diagonal Mahalanobis distance: the Linear layer learns directions,
``alpha`` inverse scales and ``mu`` the mean. The author's published code computes instead

    y_j = sqrt( max( sum_i alpha_ji (x_i - mu_ji)^2 , 1e-12 ) )                      (coded)

with ``alpha`` unconstrained (a negative alpha can make the sum negative; the clamp hides it).
Both are offered; ``form="paper"`` is the default.
"""

from __future__ import annotations

import math

import torch
from torch import nn

OFFSETL2_FORMS = ("paper", "coded")
DISTANCE_METHODS = ("auto", "direct", "expanded")
CODED_CLAMP = 1e-12               # the author's floor under the squared distance
DIRECT_MAX_ELEMENTS = 1 << 22     # above this many n*out*in elements, use the expanded form


def squared_distance_direct(x: torch.Tensor, mu: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """s_nj = sum_i w_ji (x_ni - mu_ji)^2 by broadcasting; builds an ``[n, out, in]`` tensor.

    x: ``[n, in]``; mu, weight: ``[out, in]``; returns ``[n, out]``.
    """
    return ((x[:, None, :] - mu) ** 2 * weight).sum(-1)


def squared_distance_expanded(x: torch.Tensor, mu: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The same s_nj through three matrix products, never materialising ``[n, out, in]``:

        s_nj = (x^2 @ w^T)_nj - 2 (x @ (w * mu)^T)_nj + sum_i w_ji mu_ji^2

    The terms can be much larger than their sum when x is near mu_j, so they are accumulated in
    float64 (cheap: these products are small next to the first layer's) and the result is
    clamped at 0, which cancellation could otherwise undercut.
    """
    dtype = x.dtype
    acc = torch.float32 if x.device.type == "mps" else torch.float64   # MPS has no float64
    x, mu, weight = x.to(acc), mu.to(acc), weight.to(acc)
    s = (x * x) @ weight.T - 2.0 * (x @ (weight * mu).T) + (weight * mu * mu).sum(-1)
    return s.clamp_min(0.0).to(dtype)


def squared_distance(x: torch.Tensor, mu: torch.Tensor, weight: torch.Tensor,
                     method: str = "auto") -> torch.Tensor:
    """s_nj = sum_i w_ji (x_ni - mu_ji)^2, ``[n, in] x [out, in] -> [n, out]``.

    ``method``: ``"direct"`` (broadcast), ``"expanded"`` (matrix products, O(n*out) memory) or
    ``"auto"`` (direct while ``n*out*in`` <= DIRECT_MAX_ELEMENTS). Both agree to fp32 rounding.
    """
    if method == "auto":
        method = "direct" if x.shape[0] * mu.numel() <= DIRECT_MAX_ELEMENTS else "expanded"
    if method == "direct":
        return squared_distance_direct(x, mu, weight)
    if method == "expanded":
        return squared_distance_expanded(x, mu, weight)
    raise ValueError(f"unknown method {method!r}; use one of {DISTANCE_METHODS}")


def safe_sqrt(s: torch.Tensor) -> torch.Tensor:
    """sqrt(s) for s >= 0, with gradient 0 (not inf, not NaN) at s = 0.

    A Euclidean norm has no derivative at the origin; 0 is the minimum-norm subgradient and what
    ``torch.linalg.vector_norm`` uses. The inner ``where`` keeps the unused branch finite so that
    its zero weight does not turn into ``0 * inf = NaN`` in the backward pass. A NaN input gives
    NaN, so a diverged run is seen as one.
    """
    positive = s > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, s, torch.ones_like(s))),
                       torch.where(s.isnan(), s, torch.zeros_like(s)))   # NaN stays NaN


def metric_weight(alpha: torch.Tensor, form: str) -> torch.Tensor:
    """OffsetL2's weight w in s_j = sum_i w_ji (x_i - mu_ji)^2: alpha^2 (paper) or alpha (coded)."""
    return alpha * alpha if form == "paper" else alpha


def alpha_gradient(alpha: torch.Tensor, grad_w: torch.Tensor, form: str) -> torch.Tensor:
    """dL/dalpha from dL/dw (:func:`metric_weight`): 2 alpha dL/dw (paper) or dL/dw (coded)."""
    return 2 * alpha * grad_w if form == "paper" else grad_w


def offset_l2(x: torch.Tensor, mu: torch.Tensor, alpha: torch.Tensor, form: str = "paper",
              method: str = "auto") -> torch.Tensor:
    """Weighted L2 distance of each input to each prototype.

    paper: y_nj = ||alpha_j * (x_n - mu_j)||_2 = sqrt(sum_i alpha_ji^2 (x_ni - mu_ji)^2)
    coded: y_nj = sqrt(max(sum_i alpha_ji (x_ni - mu_ji)^2, 1e-12))   (the author's code)

    x: ``[*, in]`` (any leading dimensions, as ``nn.Linear`` takes); mu, alpha: ``[out, in]``;
    returns ``[*, out]``. The gradient is finite everywhere: at x = mu_j the paper form returns
    the subgradient 0 (:func:`safe_sqrt`), the coded form the zero gradient of its clamp.
    """
    if form not in OFFSETL2_FORMS:
        raise ValueError(f"unknown OffsetL2 form {form!r}; use one of {OFFSETL2_FORMS}")
    if x.dim() == 0 or x.shape[-1] != mu.shape[-1]:
        raise ValueError(f"OffsetL2 takes inputs of {mu.shape[-1]} features (the last dimension), "
                         f"got shape {list(x.shape)}")
    rows = x.reshape(-1, x.shape[-1])      # the distances are per row: [*, in] -> [rows, in]
    if form == "paper":
        y = safe_sqrt(squared_distance(rows, mu, alpha * alpha, method))
    else:
        y = torch.sqrt(squared_distance(rows, mu, alpha, method).clamp_min(CODED_CLAMP))
    return y.reshape(*x.shape[:-1], mu.shape[0])


class OffsetL2(nn.Module):
    """Learned prototypes ``mu`` and scales ``alpha``, both ``[out_features, in_features]``.

    Maps ``[*, in_features] -> [*, out_features]`` with :func:`offset_l2`. Initialised as in the
    author's code: mu ~ N(0, 0.1^2), alpha = 1.
    """

    def __init__(self, in_features: int, out_features: int, form: str = "paper",
                 method: str = "auto", device=None, dtype=None):
        super().__init__()
        if form not in OFFSETL2_FORMS:
            raise ValueError(f"unknown OffsetL2 form {form!r}; use one of {OFFSETL2_FORMS}")
        if method not in DISTANCE_METHODS:
            raise ValueError(f"unknown method {method!r}; use one of {DISTANCE_METHODS}")
        self.in_features, self.out_features, self.form, self.method = (
            in_features, out_features, form, method)
        kw = {"device": device, "dtype": dtype}
        self.mu = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.alpha = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            self.mu.normal_(0.0, 0.1, generator=generator)
            self.alpha.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return offset_l2(x, self.mu, self.alpha, self.form, self.method)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, form={self.form}"


class Abs(nn.Module):
    """y = |x| (gradient sign(x), 0 at x = 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs()


class Neg(nn.Module):
    """y = -x: turns a distance (small = close) into a logit (large = likely)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -x


# Activations by spec name (timm-style lookup); each is a parameter-free elementwise map.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "abs": Abs, "neg": Neg, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU, "softplus": nn.Softplus, "elu": nn.ELU, "identity": nn.Identity,
}


def linear_init_bound(fan_in: int) -> float:
    """PyTorch's nn.Linear default draws weight and bias from U(-b, b) with b = 1/sqrt(fan_in).

    (For the weight this is kaiming_uniform with a = sqrt(5): gain sqrt(2/(1+5)) times
    sqrt(3/fan_in) is 1/sqrt(fan_in).)
    """
    return 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
