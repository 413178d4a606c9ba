"""The batched engine: every run of every variant trained together with full-batch SGD.

Layout. Activations are kept feature-major, ``[runs, features, examples]``, so that each run's
block is contiguous: the first layer of all runs is ONE matrix product
``W1_all [runs*width, 784] @ X^T [784, n]`` and its weight gradient one more,
``dH_all [runs*width, n] @ X [n, 784]`` (over only the input features that vary over the
examples, with the bias inside: :mod:`distrep.constant_features`);
the later layers are batched products over runs. The gradients are written by hand into
buffers allocated once, so a step allocates almost nothing but the first layer's output, a
fresh tensor (oneDNN's inner product, the fast fp32 path on the CPU, writes no given buffer);
huge pages (``THP_MEM_ALLOC_ENABLE``, set by ``distrep/__init__``) keep that allocation's page
faults few.

Each run's update is exactly its own: the loss of run r is its mean cross-entropy, its gradient
touches only its parameters, and nothing in the step mixes runs. A run whose loss becomes
non-finite is marked diverged and frozen (its gradient is zeroed from then on).

Runs are trained in chunks sized to a memory budget. Every operation used computes each run's
slice independently of the others in the chunk (checked by the tests: chunked and unchunked
training give bit-identical results on the CPU), so the chunking never changes a result there.
On CUDA, cuBLAS chooses kernels by shape, so chunked results agree only to rounding.

Precision: ``fp32`` (default) keeps every operation in fp32; ``bf16`` runs the two first-layer
products (nearly all the arithmetic) on bf16 copies of their operands; ``tf32`` lets CUDA
matrix products use TF32; ``3xtf32`` (the fused step only) keeps fp32 data and runs each
product as three TF32 products of exact halves (:mod:`distrep.fused`). OffsetL2 layers compute
their squared distances directly, class by class in fp32, on the CPU (compiled; no
cancellation), and as products accumulated in float64 elsewhere (see :class:`StackedOffsetL2`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from distrep.constant_features import FirstLayerInput
from distrep.errors import DistrepError
from distrep.fused import FusedRuns, fused_layout, too_large, unavailable
from distrep.layers import CODED_CLAMP, alpha_gradient, metric_weight
from distrep.models import LayerSpec, Net, describe_layers, layer_specs_of

PRECISIONS = ("fp32", "bf16", "tf32", "3xtf32")
# precisions of CUDA's tensor cores, and of those the one only the fused step computes
CUDA_PRECISIONS = ("tf32", "3xtf32")
FUSED_PRECISIONS = ("3xtf32",)


def bmm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.bmm`` whose result for each batch entry does not depend on the batch size.

    PyTorch computes a batch of one with its plain matrix product, whose rounding differs from
    the batched kernel's; doubling a batch of one keeps every run on the batched kernel.
    """
    if a.shape[0] != 1:
        return torch.bmm(a, b, out=out)
    two = torch.bmm(a.expand(2, -1, -1).contiguous(), b.expand(2, -1, -1).contiguous())
    if out is None:
        return two[:1].clone()
    return out.copy_(two[:1])


def _onednn_nt() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_cpu(x: torch.Tensor) -> bool:
    """Whether fp32 products on ``x``'s device go through oneDNN (:func:`matmul_nt`)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and _onednn_nt()


def matmul_nt(a: torch.Tensor, b: torch.Tensor, post: str = "none") -> torch.Tensor:
    """a @ b^T for row-major ``a [M, K]`` and ``b [N, K]``, returns ``[M, N]``; with
    ``post="relu"``, max(a @ b^T, 0).

    On the CPU this goes through oneDNN's inner product, which uses AVX-512 on AMD processors
    too (measured on a Zen 4: ~200 GFLOP/s on 4096^3, steadily, where MKL's ``torch.mm`` gives
    100-175) and applies the ReLU as it writes the result; elsewhere through ``torch.mm``, whose
    BLAS reads the transposed operand in place.
    """
    if onednn_cpu(a):
        return torch.ops.mkldnn._linear_pointwise(a, b, None, post, [], "")
    product = torch.mm(a, b.t())
    return product.clamp_min_(0.0) if post == "relu" else product


# --------------------------------------------------------------------------- activations

def activation_forward(kind: str, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """a = f(h) elementwise into ``out`` (any shape)."""
    if kind == "relu":
        return torch.clamp_min(h, 0.0, out=out)
    if kind == "abs":
        return torch.abs(h, out=out)
    if kind == "neg":
        return torch.neg(h, out=out)
    if kind == "identity":
        return out.copy_(h)
    fn = {"tanh": torch.tanh, "sigmoid": torch.sigmoid,
          "gelu": torch.nn.functional.gelu, "softplus": torch.nn.functional.softplus,
          "elu": torch.nn.functional.elu}[kind]
    return out.copy_(fn(h))


def activation_backward(kind: str, h: torch.Tensor, a: torch.Tensor, g: torch.Tensor,
                        overwrite_input: bool = False) -> torch.Tensor:
    """dL/dh = dL/da * f'(h), written into ``g``. ``h`` is the input, ``a`` = f(h). With
    ``overwrite_input`` the derivative may be built in ``h`` itself, which spares a temporary as
    large as it; the caller allows it only when no later backward step reads ``h`` (it does when
    ``h`` is the output of an activation whose derivative needs its output: tanh, sigmoid, elu).

    relu: 1[h > 0] · abs: sign(h) · neg: -1 · tanh: 1 - a^2 · sigmoid: a (1 - a)
    softplus: sigmoid(h) · elu: 1 if h > 0 else a + 1 · gelu: Phi(h) + h phi(h)
    """
    if kind == "relu":  # PyTorch's own ReLU gradient kernel, in place
        return torch.ops.aten.threshold_backward.grad_input(g, h, 0.0, grad_input=g)
    if kind == "abs":
        return g.mul_(torch.sign(h, out=h) if overwrite_input else torch.sign(h))
    if kind == "neg":
        return g.neg_()
    if kind == "identity":
        return g
    if kind == "tanh":
        return g.mul_(1 - a * a)
    if kind == "sigmoid":
        return g.mul_(a * (1 - a))
    if kind == "softplus":  # PyTorch's softplus is linear above h = 20
        return g.mul_(torch.where(h > 20, torch.ones_like(h), torch.sigmoid(h)))
    if kind == "elu":
        return g.mul_(torch.where(h > 0, torch.ones_like(h), a + 1))
    if kind == "gelu":
        cdf = 0.5 * (1 + torch.erf(h / math.sqrt(2)))
        pdf = torch.exp(-0.5 * h * h) / math.sqrt(2 * math.pi)
        return g.mul_(cdf + h * pdf)
    raise DistrepError(f"the engine has no gradient for activation {kind!r}")


# --------------------------------------------------------------------------- cross-entropy

def cross_entropy_backward(z: torch.Tensor, y: torch.Tensor, grad: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-run mean cross-entropy of logits ``z [R, C, n]`` for labels ``y [n]``.

    loss_r = mean_n( logsumexp_c z_rcn - z_r,y_n,n ); writes dloss_r/dz = (softmax - onehot)/n
    into ``grad`` and returns ``(loss [R], correct [R])`` (correct = examples classified right).
    Written elementwise so each run's numbers do not depend on the other runs.
    """
    n = z.shape[2]
    zmax = z.amax(1, keepdim=True)
    torch.sub(z, zmax, out=grad)
    grad.exp_()
    total = grad.sum(1, keepdim=True)
    index = y.view(1, 1, n).expand(z.shape[0], 1, n)
    target = z.gather(1, index)
    loss = (zmax + total.log() - target).sum(2).squeeze(1) / n
    correct = (first_argmax(z, zmax) == y).sum(1)
    grad.div_(total)
    grad.scatter_add_(1, index, torch.full_like(target, -1.0))
    grad.div_(n)
    return loss, correct


@torch.no_grad()
def cross_entropy(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss [R], correct [R])`` of logits ``z [R, C, n]``, without a gradient."""
    n = z.shape[2]
    zmax = z.amax(1, keepdim=True)
    total = (z - zmax).exp().sum(1, keepdim=True)
    target = z.gather(1, y.view(1, 1, n).expand(z.shape[0], 1, n))
    return (zmax + total.log() - target).sum(2).squeeze(1) / n, (first_argmax(z, zmax) == y).sum(1)


def first_argmax(z: torch.Tensor, zmax: torch.Tensor | None = None) -> torch.Tensor:
    """``z.argmax(1)`` for ``z [R, C, n]``: the first class holding the maximum (ties are common:
    a ReLU output layer often gives several classes exactly 0), or the first NaN. ``zmax`` is
    ``z.amax(1, keepdim=True)`` where the caller has it.

    first = C - max_c( hit_c * (C - c) ), hit_c = [z_c == zmax] or [z_c is NaN]: a few passes over
    the whole tensor, where PyTorch's argmax across the strided class axis is ~20x slower and a
    loop over the classes ~2x."""
    C = z.shape[1]
    if C > 255:
        return _first_argmax_loop(z)
    if zmax is None:
        zmax = z.amax(1, keepdim=True)      # NaN wherever the column holds one
    hit = (z == zmax).logical_or_(z.isnan()).view(torch.uint8)
    countdown = torch.arange(C, 0, -1, dtype=torch.uint8, device=z.device).view(1, C, 1)
    return C - hit.mul_(countdown).amax(1).long()


def _first_argmax_loop(z: torch.Tensor) -> torch.Tensor:
    """:func:`first_argmax` by a pass per class (for more classes than a byte counts)."""
    best, index = z[:, 0].clone(), torch.zeros(z.shape[0], z.shape[2], dtype=torch.long, device=z.device)
    for c in range(1, z.shape[1]):
        better = (z[:, c] > best) | (z[:, c].isnan() & ~best.isnan())   # argmax treats NaN as max
        best = torch.where(better, z[:, c], best)
        index.masked_fill_(better, c)
    return index


# --------------------------------------------------------------------------- stacked layers

class StackedLinear:
    """R linear layers: y_r = W_r x_r + b_r. W ``[R, out, in]``, b ``[R, out]`` or None.

    With a shared input (the first layer) x is ``[in, n]`` for all runs and the product is one
    ``[R*out, in] @ [in, n]`` matrix product.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias
        self.params = {"weight": weight} | ({"bias": bias} if bias is not None else {})
        self.grads = {k: torch.zeros_like(v) for k, v in self.params.items()}

    def forward(self, x: torch.Tensor, shared: bool, out: torch.Tensor | None = None,
                keep: bool = True) -> torch.Tensor:
        R, o, i = self.weight.shape
        n = x.shape[-1]
        if out is None:
            out = torch.empty(R, o, n, dtype=x.dtype, device=x.device)
        if shared and self.bias is not None:   # the bias rides along in the product
            torch.addmm(self.bias.view(R * o, 1), self.weight.view(R * o, i), x, out=out.view(R * o, n))
            return out
        if shared:
            torch.mm(self.weight.view(R * o, i), x, out=out.view(R * o, n))
        else:
            bmm(self.weight, x, out=out)
        if self.bias is not None:
            out.add_(self.bias.unsqueeze(2))
        return out

    def backward(self, g: torch.Tensor, x: torch.Tensor, shared: bool, need_dx: bool,
                 dx_out: torch.Tensor | None = None) -> torch.Tensor | None:
        """dW = g x^T, db = sum_n g, dx = W^T g (into ``dx_out``)."""
        R, o, i = self.weight.shape
        if shared:
            self.grads["weight"].view(R * o, i).copy_(matmul_nt(g.view(R * o, -1), x))
        else:
            bmm(g, x.transpose(1, 2), out=self.grads["weight"])
        if self.bias is not None:
            torch.sum(g, 2, out=self.grads["bias"])
        if not need_dx:
            return None
        return bmm(self.weight.transpose(1, 2), g, out=dx_out)


class StackedOffsetL2:
    """R OffsetL2 layers: y_rjn = sqrt(sum_i w_rji (x_rin - mu_rji)^2), w = alpha^2 (paper) or
    alpha (coded, with the square root's argument clamped at 1e-12). mu, alpha ``[R, out, in]``.

    On the CPU, for per-run inputs, the squared distance and its gradients are computed in the
    direct form, class by class in fp32 (:func:`direct_squared_distance`, with the root in the
    same pass, and its backward, compiled by ``torch.compile``, one run at a time): no
    cancellation, so no float64 needed.
    Elsewhere (CUDA, a shared input, or where compiling fails) they are expanded into products,
    accumulated in float64 over the stacked inputs ``[x ; x^2]`` (one ``[R, 2 in, n]`` float64
    buffer, reused every step):
        s = [-2 w*mu | w] @ [x ; x^2] + sum_i w mu^2
    and its gradients (g_s = dL/ds = g_y / (2 y) where the root is differentiable, else 0):
        [g_s x^T | g_s (x^2)^T] = g_s @ [x ; x^2]^T
        dL/dx  = 2 x * (w^T g_s) - 2 (w*mu)^T g_s      (built in the buffer's spent x^2 half)
        dL/dw  = g_s (x^2)^T - 2 mu * (g_s x^T) + mu^2 * sum_n g_s
        dL/dmu = -2 w * (g_s x^T - mu * sum_n g_s)
        dL/dalpha = 2 alpha * dL/dw (paper) or dL/dw (coded)
    Every operation stays in float64 until dL/dx is copied to its fp32 destination (mixed-dtype
    elementwise operations take PyTorch's slow casting path, ~10x slower here).
    """

    def __init__(self, mu: torch.Tensor, alpha: torch.Tensor, form: str):
        self.mu, self.alpha, self.form = mu, alpha, form
        self.params = {"mu": mu, "alpha": alpha}
        self.grads = {k: torch.zeros_like(v) for k, v in self.params.items()}
        self._work = None         # [R, 2 in, n] float64 when training, reused every step
        self._cache = None

    def stacked_inputs(self, x: torch.Tensor, keep: bool = False) -> torch.Tensor:
        """``[x ; x^2]`` in float64: ``[2 in, n]`` for a shared x ``[in, n]``, else ``[R, 2 in, n]``
        (in the reused buffer with ``keep``)."""
        shape = (*x.shape[:-2], 2 * x.shape[-2], x.shape[-1])
        if not keep:
            work = torch.empty(shape, dtype=torch.float64, device=x.device)
        else:
            if self._work is None or self._work.shape != shape:
                self._work = None                  # free the old one before allocating
                self._work = torch.empty(shape, dtype=torch.float64, device=x.device)
            work = self._work
        i = x.shape[-2]
        head = work[..., :i, :].copy_(x)
        torch.mul(head, head, out=work[..., i:, :])
        return work

    @staticmethod
    def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a ``[R, p, q]`` times b: shared ``[q, n]`` (one product) or per-run ``[R, q, n]``."""
        if b.dim() == 2:
            R, p, q = a.shape
            return (a.reshape(R * p, q) @ b).view(R, p, -1)
        return bmm(a, b)

    def metric_weight(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """w: alpha^2 (paper) or alpha (coded), in ``dtype``."""
        return metric_weight(self.alpha, self.form).to(dtype)

    direct = True     # False: the float64 expanded form on the CPU too (set if compiling fails)

    def _direct(self, x: torch.Tensor, shared: bool) -> bool:
        return StackedOffsetL2.direct and not shared and x.device.type == "cpu" and x.dtype == torch.float32

    def root(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, where the root is differentiable) from squared distances s: :func:`offsetl2_root`."""
        return offsetl2_root(s, self.form == "paper")

    def root_(self, s: torch.Tensor) -> torch.Tensor:
        """y from squared distances s, in place (:func:`offsetl2_root_`)."""
        return offsetl2_root_(s, self.form == "paper")

    def squared_distance(self, work: torch.Tensor) -> torch.Tensor:
        """s ``[R, out, n]`` in float64 from the stacked inputs ``work`` (:meth:`stacked_inputs`)."""
        w, mu = self.metric_weight(), self.mu.double()
        s = self._mm(torch.cat([-2 * w * mu, w], 2), work)
        return s.add_((w * mu * mu).sum(2, keepdim=True))

    def forward(self, x: torch.Tensor, shared: bool, out: torch.Tensor | None = None,
                keep: bool = True) -> torch.Tensor:
        work = None
        if self._direct(x, shared):          # distance and root in one compiled pass per run
            y = out if out is not None else x.new_empty(_out_shape(self, x, x.shape[0]))
            rest = per_run(DIRECT_FORWARD[self.form], x, self.mu, self.metric_weight(x.dtype), out=y)
            if rest is not None:
                if keep:
                    self._cache = (None, y, rest[0])
                return y
        work = self.stacked_inputs(x, keep)
        y, active = self.root(self.squared_distance(work))
        if keep:
            self._cache = (work, y, active)
        if out is None:
            return y.to(x.dtype)
        return out.copy_(y)

    def backward(self, g: torch.Tensor, x: torch.Tensor, shared: bool, need_dx: bool,
                 dx_out: torch.Tensor | None = None) -> torch.Tensor | None:
        """Gradients of mu and alpha into ``grads``; dL/dx into ``dx_out`` (which may be x)."""
        work, y, active = self._cache
        self._cache = None
        if work is None:                   # the forward pass took the direct form
            w = self.metric_weight(x.dtype)
            if dx_out is None:
                dx_out = torch.empty_like(x)
            # g_s in a compiled pass of its own (inside the class loop's graph, measured, it made
            # that graph 7x slower)
            gs = per_run(root_backward, g, y, active)
            result = None if gs is None else per_run(direct_squared_distance_backward, x, self.mu,
                                                     w, gs, out=dx_out)
            if result is not None:
                A, B = result
                self._parameter_grads(-2 * w * A, B)
                return dx_out if need_dx else None
            work = self.stacked_inputs(x, keep=True)      # compiling failed: float64 from here
        w, mu = self.metric_weight(), self.mu.double()
        R, o, i = w.shape
        gs = root_backward(g.double(), y, active)
        if shared:
            gxx = (gs.reshape(R * o, -1) @ work.t()).view(R, o, 2 * i)
        else:
            gxx = bmm(gs, work.transpose(1, 2))
        gx, gx2 = gxx[..., :i], gxx[..., i:]
        q = gs.sum(2, keepdim=True)
        self._parameter_grads(-2 * w * (gx - mu * q), gx2 - 2 * mu * gx + mu * mu * q)
        if not need_dx:
            return None
        # in the spent x^2 half: 2 x * (w^T g_s), then += -2 (w*mu)^T g_s inside the product
        x64, t = work[:, :i], work[:, i:]
        bmm((2 * w).transpose(1, 2), gs, out=t).mul_(x64)
        t.baddbmm_((-2 * w * mu).transpose(1, 2), gs)
        return t.to(g.dtype) if dx_out is None else dx_out.copy_(t)

    def _parameter_grads(self, grad_mu: torch.Tensor, grad_w: torch.Tensor) -> None:
        """dL/dmu and dL/dalpha = 2 alpha dL/dw (paper) or dL/dw (coded) into ``grads``."""
        self.grads["mu"].copy_(grad_mu)
        self.grads["alpha"].copy_(alpha_gradient(self.alpha.to(grad_w.dtype), grad_w, self.form))


def direct_squared_distance(x: torch.Tensor, mu: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """s_jn = sum_i w_ji (x_in - mu_ji)^2 for one run: x ``[in, n]``, mu, w ``[out, in]`` ->
    ``[out, n]``, class by class (compiled: one fused pass over x per class, never an
    ``[out, in, n]`` tensor). Each term is a square, so fp32 loses nothing to cancellation."""
    return torch.stack([(w[j, :, None] * (x - mu[j, :, None]).square()).sum(0) for j in range(mu.shape[0])])


def offsetl2_root(s: torch.Tensor, paper: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, where the root is differentiable) from squared distances s (any shape and dtype):
    y = sqrt(max(s, 0)) (``paper``) or sqrt(max(s, 1e-12)) (coded). NaN stays NaN (a diverged
    run must show it)."""
    s = s.clamp_min(0.0)
    if paper:
        active = s > 0
        return torch.where(s == 0, 1.0, s).sqrt_().mul_(active), active
    return s.clamp_min(CODED_CLAMP).sqrt_(), s > CODED_CLAMP


def offsetl2_root_(s: torch.Tensor, paper: bool) -> torch.Tensor:
    """:func:`offsetl2_root`'s y alone, computed in ``s`` (overwritten): sqrt(max(s, 0)) or
    sqrt(max(s, 1e-12)), NaN staying NaN; two passes, for where no gradient follows."""
    return s.clamp_min_(0.0 if paper else CODED_CLAMP).sqrt_()


def root_backward(g: torch.Tensor, y: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """g_s = dL/ds = g_y / (2 y) where the root is differentiable (``active``), else 0."""
    return torch.where(active, g / (2 * torch.where(active, y, 1.0)), 0.0)


def _direct_forward_paper(x, mu, w):
    """(y, active) of one run in the direct form, the paper's root: one compiled pass."""
    return offsetl2_root(direct_squared_distance(x, mu, w), True)


def _direct_forward_coded(x, mu, w):
    """(y, active) of one run in the direct form, the code's clamped root: one compiled pass."""
    return offsetl2_root(direct_squared_distance(x, mu, w), False)


DIRECT_FORWARD = {"paper": _direct_forward_paper, "coded": _direct_forward_coded}


def direct_squared_distance_backward(x: torch.Tensor, mu: torch.Tensor, w: torch.Tensor,
                                     gs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """For g_s = dL/ds ``[out, n]`` of one run: (dL/dx ``[in, n]``, A, B ``[out, in]``) with

        dL/dx_in = 2 sum_j g_jn w_ji (x_in - mu_ji)
        A_ji = sum_n g_jn (x_in - mu_ji),   B_ji = sum_n g_jn (x_in - mu_ji)^2

    so that dL/dmu = -2 w * A and dL/dw = B."""
    dx, A, B = 0, [], []
    for j in range(mu.shape[0]):
        d = x - mu[j, :, None]
        gd = gs[j] * d
        dx = dx + w[j, :, None] * gd
        A.append(gd.sum(1))
        B.append((gd * d).sum(1))
    return 2 * dx, torch.stack(A), torch.stack(B)


_COMPILED: dict = {}


def allow_recompiles(limit: int = 256) -> None:
    """Let Dynamo keep up to ``limit`` compiled versions of one function (its default, 8, would
    run the 9th shape or model eagerly, with other rounding)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))


def per_run(fn, x: torch.Tensor, *per_run_args: torch.Tensor, out: torch.Tensor | None = None):
    """``fn`` compiled (static shapes) and called on each run's slices ``x[r], arg[r], ...``,
    its results stacked over the runs; with ``out``, the first result of run r is written into
    ``out[r]`` as soon as it is computed (``out`` may be x: run r's slice is read only by run
    r's call) and only the others are returned. One run at a time, so a run's numbers never
    depend on how many runs share the chunk. None (and the direct form switched off, with a
    warning) if compiling fails, e.g. with no C++ compiler: that happens at the first call,
    before anything is written."""
    compiled = _COMPILED.get(fn)
    if compiled is None:
        allow_recompiles()                       # one entry per shape met
        compiled = _COMPILED[fn] = torch.compile(fn, dynamic=False)
    results = []
    try:
        for r in range(x.shape[0]):
            result = compiled(x[r], *(a[r] for a in per_run_args))
            if out is not None:
                out[r].copy_(result[0])
                result = result[1:]
            results.append(result)
    except Exception as error:      # noqa: BLE001 - any compiler failure: fall back, correctly
        warnings.warn(f"OffsetL2's direct form did not compile ({type(error).__name__}); using the "
                      f"float64 expanded form instead")
        StackedOffsetL2.direct = False
        return None
    if isinstance(results[0], torch.Tensor):
        return torch.stack(results)
    return tuple(torch.stack(parts) for parts in zip(*results))


class StackedActivation:
    def __init__(self, kind: str):
        self.kind, self.params, self.grads = kind, {}, {}

    def forward(self, x, shared, out=None, keep=True):
        if out is None:
            out = torch.empty_like(x)
        return activation_forward(self.kind, x, out)


# --------------------------------------------------------------------------- a variant's runs

@dataclass
class StackedRuns:
    """R runs of one variant, parameters stacked along a leading run dimension.

    ``layers`` mirror the variant's layer specs; ``names`` are the ``nn.Sequential`` parameter
    names (``"0.weight"`` ...), so stacked tensors map one to one onto a single run's state dict.
    """

    layers: list
    specs: tuple[LayerSpec, ...]

    @classmethod
    def from_state(cls, specs: tuple[LayerSpec, ...], state: dict[str, torch.Tensor],
                   offsetl2_form: str = "paper") -> "StackedRuns":
        """Layers over stacked parameters ``{"0.weight": [R, out, in], ...}`` (used in place)."""
        layers = []
        for k, spec in enumerate(specs):
            if spec.kind == "linear":
                layers.append(StackedLinear(state[f"{k}.weight"], state.get(f"{k}.bias")))
            elif spec.kind == "offsetl2":
                layers.append(StackedOffsetL2(state[f"{k}.mu"], state[f"{k}.alpha"], offsetl2_form))
            else:
                layers.append(StackedActivation(spec.kind))
        return cls(layers, specs)

    @classmethod
    def from_models(cls, models: list[nn.Module], device: torch.device | str = "cpu") -> "StackedRuns":
        """Stack the parameters of R models of one architecture (each initialised on its own):
        the family's :class:`~distrep.models.Net` models or ``nn.Sequential`` ones of its layers
        built by hand (:func:`~distrep.models.layer_specs_of`). Raises :class:`DistrepError` for
        no models, models that differ, or layers with no hand-written batched form."""
        if not models:
            raise DistrepError("no models to stack")
        specs, form = layer_specs_of(models[0])
        for r, model in enumerate(models[1:], 1):
            other_specs, other_form = layer_specs_of(model)
            if other_specs != specs:
                raise DistrepError(f"model {r} is {describe_layers(other_specs)} but model 0 is "
                                   f"{describe_layers(specs)}: stacked runs share one architecture")
            if other_form != form:
                raise DistrepError(f"model {r}'s OffsetL2 computes the {other_form} form, model 0's "
                                   f"the {form} form: stacked runs share one architecture")
        if missing := sorted({s.kind for s in specs} - HAND_WRITTEN):
            raise DistrepError(f"stacked runs (and the analyses) have no batched form of "
                               f"{', '.join(missing)}; such models train on the autograd path")
        return cls.from_state(specs, stack_parameters(models, device), form)

    def state(self) -> dict[str, torch.Tensor]:
        """``{"0.weight": [R, out, in], ...}``: the stacked parameters by their model names."""
        return {f"{k}.{name}": p for k, layer in enumerate(self.layers)
                for name, p in layer.params.items()}

    @property
    def runs(self) -> int:
        return next(iter(self.state().values())).shape[0]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> list[torch.Tensor]:
        """The outputs of layers ``start`` up to (not including) ``stop`` (default: the last),
        each ``[R, features, n]``, for ``x``, the input of layer ``start``: shared by every run
        ``[in, n]``, or per run ``[R, in, n]``. No gradient; nothing is kept for a backward pass."""
        if start == 0:
            self.check_input(x)
        outputs = []
        for layer in self.layers[start:stop]:
            x = layer.forward(x, shared=x.dim() == 2, keep=False)
            outputs.append(x)
        return outputs

    def check_input(self, x: torch.Tensor) -> None:
        """Refuse (one line) an input that is not feature-major ``[in, n]`` or ``[R, in, n]``:
        the analyses take the transpose of the usual ``[n, in]``, which is easy to forget."""
        features = next((s.in_features for s in self.specs if s.affine), None)
        if features is None:              # activations only (a tail): any width goes through
            return
        if x.dim() not in (2, 3) or x.shape[-2] != features:
            hint = ("; pass x.t(): the inputs are feature-major"
                    if x.dim() == 2 and x.shape[1] == features else "")
            raise DistrepError(f"inputs must be [{features}, n] or [runs, {features}, n], "
                               f"got {list(x.shape)}{hint}")

    def tail(self, start: int) -> "StackedRuns":
        """Layers ``start`` onwards as their own stack (sharing their parameters)."""
        return StackedRuns(self.layers[start:], self.specs[start:])


# Activations whose derivative needs only their input: the buffer holding their output can
# receive the gradient flowing back into them.
INPUT_ONLY_DERIVATIVE = {"relu", "abs", "neg", "identity", "softplus", "gelu"}


def _needs_own_output(layer) -> bool:
    """Whether ``layer``'s backward step reads its own output (tanh, sigmoid, elu; OffsetL2,
    whose root's gradient is g / 2y, and whose direct form keeps y in the output buffer itself),
    so that the buffer holding it must survive the backward steps of the layers after it."""
    if isinstance(layer, StackedOffsetL2):
        return True
    return isinstance(layer, StackedActivation) and layer.kind not in INPUT_ONLY_DERIVATIVE


def finite_runs(group: StackedRuns) -> torch.Tensor:
    """bool ``[R]``: which runs have only finite parameters."""
    return finite_rows(group.state().values())


def finite_rows(stacked) -> torch.Tensor:
    """bool ``[R]``: which rows (runs) of the stacked tensors ``[R, ...]`` are finite in all:
    those whose largest |value| is finite (max propagates NaN), two passes over each tensor
    where ``isfinite(p).all()`` makes five (isfinite is abs, two compares and an and)."""
    ok = None
    for p in stacked:
        f = torch.isfinite(p.reshape(p.shape[0], -1).abs().amax(1))
        ok = f if ok is None else ok & f
    return ok


# --------------------------------------------------------------------------- any layer: autograd

# The layer kinds whose batched gradient is written by hand above; a model made only of these
# takes the fast path, any other (the heads, a user's layer) the autograd path.
HAND_WRITTEN = frozenset({"linear", "offsetl2", "relu", "abs", "neg", "tanh", "sigmoid", "gelu",
                          "softplus", "elu", "identity"})
PATHS = ("hand-written", "autograd", "compiled", "fused")
ENGINES = ("auto",) + PATHS


def engine_path(specs: tuple[LayerSpec, ...], engine: str = "auto",
                device: torch.device | str = "cpu") -> str:
    """Which of the engine's paths trains a model with these layers on ``device`` (the one place
    that decides). ``auto``: on CUDA "fused" (:mod:`distrep.fused`, a Triton kernel) where it
    covers the model (its grammar, its widths and classes, the GPU's shared memory) and Triton
    is installed; else "hand-written" when every layer has a hand-written batched gradient,
    else "autograd". "compiled" (the autograd step fused by ``torch.compile``) and "autograd"
    take any model when asked for; "hand-written" and "fused" (the paper's two-layer family)
    only the models they cover. ``specs`` carry the model's sizes (:func:`~distrep.models.parse`
    with its width), which the fused step's cover depends on."""
    covered = all(s.kind in HAND_WRITTEN for s in specs)
    if engine == "auto":
        device = torch.device(device)
        if (device.type == "cuda" and unavailable(device) is None and fused_layout(specs)
                and too_large(specs, device) is None):
            return "fused"
        return "hand-written" if covered else "autograd"
    if engine not in PATHS:
        raise DistrepError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    if engine == "hand-written" and not covered:
        missing = sorted({s.kind for s in specs if s.kind not in HAND_WRITTEN})
        raise DistrepError(f"the hand-written engine has no gradient for {', '.join(missing)}; "
                           f"use --engine auto, autograd or compiled")
    if engine == "fused" and fused_layout(specs) is None:
        raise DistrepError("the fused engine covers linear-[relu|abs]-linear|offsetl2 followed by at "
                           "most two of relu/abs/neg; use --engine auto, autograd or compiled")
    if engine == "fused" and (reason := too_large(specs, device)):
        raise DistrepError(reason)
    return engine


def computes(path: str, precision: str) -> bool:
    """Whether the engine path ``path`` computes ``precision``: every path every precision but
    those of :data:`FUSED_PRECISIONS`, which only the fused step computes (for path names; the
    Trainer checks its groups' types)."""
    return precision not in FUSED_PRECISIONS or path == "fused"


def reads_varying_features(path: str) -> bool:
    """Whether a path's first-layer products read only the input features that vary over the
    training examples (:mod:`distrep.constant_features`): the hand-written and fused steps."""
    return path in ("hand-written", "fused")


def stack_parameters(models: list[nn.Sequential],
                     device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """``{"0.weight": [R, ...], ...}``: the parameters of R identically built models, stacked,
    named by each layer's position (a slice ``model[1:]`` keeps its modules' old names)."""
    def named(model: nn.Sequential) -> dict[str, torch.Tensor]:
        return {f"{k}.{name}": p.detach() for k, layer in enumerate(model)
                for name, p in layer.named_parameters()}
    per_model = [named(m) for m in models]
    return {name: torch.stack([p[name] for p in per_model]).to(device) for name in per_model[0]}


class AutogradRuns:
    """R runs of any model, trained together with PyTorch's autograd over stacked parameters:
    ``torch.func.functional_call`` of one template model, vectorised over the runs with
    ``vmap``. Each run's loss, gradient and update are its own, as on the hand-written path,
    and the same as the reference trainer's to rounding (tested). Inputs are example-major
    ``[n, in]``; the interface the :class:`Trainer` needs mirrors :class:`StackedRuns`."""

    def __init__(self, template: nn.Module, specs: tuple[LayerSpec, ...], params: dict[str, torch.Tensor]):
        self.template, self.specs, self.params = template, specs, params

    @classmethod
    def from_state(cls, specs: tuple[LayerSpec, ...], state: dict[str, torch.Tensor],
                   offsetl2_form: str = "paper") -> "AutogradRuns":
        """Runs over stacked parameters ``{"0.weight": [R, ...], ...}`` (used in place)."""
        device = next(iter(state.values())).device
        with torch.device("meta"):             # the template's own parameters are never used
            template = Net(specs, "-".join(s.kind for s in specs), offsetl2_form)
        return cls(template.to_empty(device=device), specs, state)

    def state(self) -> dict[str, torch.Tensor]:
        return self.params

    @property
    def runs(self) -> int:
        return next(iter(self.params.values())).shape[0]

    autocast = False          # bf16 under autocast: the compiled path's (set by the Trainer)

    def _logits(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.template, params, (x,))

    def _context(self, device: torch.device):
        if self.autocast:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return torch.autocast(device.type, enabled=False)

    def _step_graph(self, params, x, y, lr: float, frozen):
        """(new parameters, loss [R], correct [R], frozen [R]) of one SGD step of every run,
        written functionally so that :class:`CompiledRuns` can compile it whole. Runs whose
        loss or new parameters are non-finite join ``frozen`` and keep their parameters."""
        def loss(p):
            with self._context(x.device):
                z = self._logits(p, x)
            z = z.float()
            return nn.functional.cross_entropy(z, y), z.argmax(1).eq(y).sum()   # argmax: first maximum

        grads, (value, correct) = torch.func.vmap(torch.func.grad_and_value(loss, has_aux=True))(params)
        frozen = frozen | ~torch.isfinite(value)
        new = {name: torch.add(p, grads[name].masked_fill(frozen.view(-1, *(1,) * (p.dim() - 1)), 0.0),
                               alpha=-lr)                 # the update torch.optim.SGD makes
               for name, p in params.items()}
        return new, value, correct, frozen | ~finite_rows(new.values())

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float, frozen: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step of every run on ``x [n, in]``; ``(loss [R], correct [R])`` before it.
        Runs whose loss or parameters become non-finite join ``frozen``."""
        new, value, correct, now = self._run_step(self.params, x, y, lr, frozen)
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(new[name])
        frozen.copy_(now)
        return value.detach().clone(), correct.clone()

    def _run_step(self, *args):
        return self._step_graph(*args)

    def _logits_graph(self, params, x_t):
        with self._context(x_t.device):
            z = torch.func.vmap(self._logits, in_dims=(0, None))(params, x_t.t())
        return z.float().transpose(1, 2)

    @torch.no_grad()
    def forward(self, x_t: torch.Tensor) -> list[torch.Tensor]:
        """``[logits [R, C, n]]`` for feature-major ``x_t [in, n]`` (as :meth:`StackedRuns.forward`
        ends)."""
        return [self._logits_graph(self.params, x_t)]


class CompiledRuns(AutogradRuns):
    """:class:`AutogradRuns` whose step and test pass are compiled by ``torch.compile``: one
    graph per step (forward, backward, loss, the divergence test and the SGD update), the
    elementwise work fused around the matrix products by Inductor, and on CUDA replayed as a
    CUDA graph (one launch a step). The same arithmetic as the autograd path, so the same
    results to rounding (tested against the reference trainer on the CPU).

    Precision: with ``bf16`` the model runs under autocast, so its matrix products and the
    activations between them are bf16 while the loss, the gradients of the fp32 master
    parameters and the update stay fp32; ``tf32`` and ``fp32`` as elsewhere in the engine.
    Compiling costs seconds to a minute per model, once per chunk."""

    def __init__(self, template: nn.Module, specs: tuple[LayerSpec, ...], params: dict[str, torch.Tensor]):
        super().__init__(template, specs, params)
        # Every group compiles the same method for its own model: one entry per group.
        allow_recompiles()
        cuda = next(iter(params.values())).device.type == "cuda"
        options = {"fullgraph": True, "dynamic": False}
        # CUDA graphs replay a whole step; their outputs are overwritten by the next replay,
        # so what the caller keeps is copied or cloned in step() and forward().
        self._run_step = torch.compile(self._step_graph, mode="reduce-overhead" if cuda else None, **options)
        self._logits_all = torch.compile(self._logits_graph, **options)

    @torch.no_grad()
    def forward(self, x_t: torch.Tensor) -> list[torch.Tensor]:
        return [self._logits_all(self.params, x_t).clone()]


# Examples a test pass computes at once: its buffers hold at most this many (the memory plan's).
EVAL_BATCH = 10000


class Trainer:
    """Trains a chunk of runs (several variants' :class:`StackedRuns`) on one full batch.

    The training input is ``x_t [in, n]`` (feature-major). Buffers are allocated on the first
    step and reused.
    """

    def __init__(self, groups: list[StackedRuns], precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise DistrepError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
        for group in groups:
            if not group.specs[0].affine:
                raise DistrepError("the engine needs an affine first layer (linear or offsetl2)")
        if precision in FUSED_PRECISIONS and not all(isinstance(g, FusedRuns) for g in groups):
            raise DistrepError(f"{precision} is a precision of the fused step only")
        self.groups, self.precision = groups, precision
        self._buffers: dict = {}
        self._first_input: FirstLayerInput | None = None
        shared_inputs: dict = {}         # the fused groups' first-layer operands: one copy
        for group in groups:
            if isinstance(group, CompiledRuns):
                group.autocast = precision == "bf16"
            if isinstance(group, FusedRuns):
                group.precision, group.inputs = precision, shared_inputs

    def _buffer(self, key, shape, like: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != torch.Size(shape):
            buf = self._buffers[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf

    def _forward_group(self, gi: int, group: StackedRuns, x_t: torch.Tensor,
                       x_bf16: torch.Tensor | None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(the input of every layer, the logits ``[R, C, n]``) of one group, written into the
        step's reused buffers, keeping what the backward pass needs."""
        h, inputs, relu_done = x_t, [], False
        for k, layer in enumerate(group.layers):
            inputs.append(h)
            if relu_done:       # the product applied this ReLU: its output is its input
                relu_done = False
                continue
            if k == 0 and isinstance(layer, StackedLinear):
                relu_done = _is_relu(group.layers[1]) if len(group.layers) > 1 else False
                h = first_linear(layer, self.first_input(x_t, x_bf16), relu=relu_done)   # fresh
                continue
            out = self._buffer((gi, k), _out_shape(layer, h, group.runs), x_t)
            h = layer.forward(h, shared=k == 0, out=out)
        return inputs, h

    def first_input(self, x_t: torch.Tensor, x_bf16: torch.Tensor | None = None) -> FirstLayerInput:
        """The training input as the first layer's products read it: ``x_bf16`` where given (bf16
        products), else ``x_t``, example-major too on oneDNN's path; kept while that is the same
        tensor."""
        x = x_t if x_bf16 is None else x_bf16
        if self._first_input is None or self._first_input.source is not x:
            self._first_input = FirstLayerInput.of(x, example_major=onednn_cpu(x))
        return self._first_input

    def step(self, x_t, y, lr: float, frozen: list[torch.Tensor],
             x_bf16: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One SGD step for every run; returns per group ``(loss [R], correct [R])`` of the
        parameters before the step. ``frozen[g]`` (bool ``[R]``) marks runs not to update; runs
        whose loss is non-finite now are added to it. ``x_bf16`` (``x_t`` in bf16) selects bf16
        for the first layer's two products."""
        return [self.step_group(gi, x_t, y, lr, frozen, x_bf16) for gi in range(len(self.groups))]

    def step_group(self, gi: int, x_t, y, lr: float, frozen: list[torch.Tensor],
                   x_bf16: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`step` for group ``gi`` alone: it reads and writes only that group's parameters,
        buffers and ``frozen[gi]`` (what lets :class:`~distrep.graphs.GraphedStep` run groups concurrently)."""
        group = self.groups[gi]
        if isinstance(group, AutogradRuns):
            return group.step(x_t.t(), y, lr, frozen[gi])
        if isinstance(group, FusedRuns):
            loss, correct = group.gradients(x_t, y, x_bf16)
        else:
            loss, correct = self._backward(gi, group, x_t, y, x_bf16)
        return self._apply(group, loss, correct, lr, frozen[gi])

    def fused_phases(self, gi: int, x_t, y, lr: float, frozen: list[torch.Tensor],
                     x_bf16: torch.Tensor | None = None):
        """:meth:`step_group` of the fused group ``gi`` as three calls to make in this order
        (:meth:`~distrep.fused.FusedRuns.phases`): the first layer's product, the head kernel,
        then the rest of the gradients and the update, which returns ``(loss, correct)``."""
        group = self.groups[gi]
        product, kernel, finish = group.phases(x_t, y, x_bf16)
        return product, kernel, lambda: self._apply(group, *finish(), lr, frozen[gi])

    def _apply(self, group, loss: torch.Tensor, correct: torch.Tensor, lr: float,
               frozen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The SGD update of a hand-written or fused group from its gradients, freezing (in
        place) the runs whose loss or parameters are no longer finite."""
        frozen |= ~torch.isfinite(loss)
        self._update(self._parameters_and_gradients(group), lr, frozen)
        frozen |= ~finite_runs(group)     # a step can overflow the parameters themselves
        return loss, correct

    def _backward(self, gi: int, group: StackedRuns, x_t, y, x_bf16) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward pass of one hand-written group: its gradients into the layers'
        ``grads``; ``(loss [R], correct [R])``."""
        inputs, z = self._forward_group(gi, group, x_t, x_bf16)
        g = self._buffer((gi, "logits"), z.shape, z)
        loss, correct = cross_entropy_backward(z, y, g)
        outputs = inputs[1:] + [z]
        for k in range(len(group.layers) - 1, -1, -1):
            layer = group.layers[k]
            if isinstance(layer, StackedActivation):
                g = activation_backward(layer.kind, inputs[k], outputs[k], g,
                                        overwrite_input=not _needs_own_output(group.layers[k - 1]))
            elif k == 0 and isinstance(layer, StackedLinear):
                first_linear_backward(layer, g, self.first_input(x_t, x_bf16))
            else:
                g = layer.backward(g, inputs[k], shared=k == 0, need_dx=k > 0,
                                   dx_out=self._dx_buffer(gi, group, k, inputs))
        return loss, correct

    def _dx_buffer(self, gi, group, k, inputs) -> torch.Tensor | None:
        """Where layer k writes the gradient of its input: over that input itself when the
        activation before it does not need its own output back (saves one big buffer)."""
        if k == 0:
            return None
        before = group.layers[k - 1]
        # (a ReLU applied inside the first product keeps one tensor as its input and output,
        # which its own backward step reads after this one)
        if isinstance(before, StackedActivation) and not _needs_own_output(before) \
                and inputs[k] is not inputs[k - 1]:
            return inputs[k]
        return self._buffer((gi, k, "dx"), inputs[k].shape, inputs[k])

    @staticmethod
    def _parameters_and_gradients(group):
        """(stacked parameter, its gradient) pairs of a hand-written or fused group."""
        if isinstance(group, FusedRuns):
            return ((p, group.grads[name]) for name, p in group.params.items())
        return ((p, layer.grads[name]) for layer in group.layers for name, p in layer.params.items())

    @staticmethod
    def _update(pairs, lr: float, frozen: torch.Tensor) -> None:
        """p <- p - lr * grad for every run not frozen (the operation torch.optim.SGD uses).

        The frozen runs' gradients are zeroed by a masked fill (exact, NaN-proof) rather than
        behind a test of ``frozen.any()``, which would stall a GPU's queue once per step."""
        for p, grad in pairs:
            grad.masked_fill_(frozen.view(-1, *(1,) * (grad.dim() - 1)), 0.0)
            p.add_(grad, alpha=-lr)

    @torch.no_grad()
    def evaluate(self, x_t: torch.Tensor, y: torch.Tensor, batch: int = EVAL_BATCH
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per group ``(mean loss [R], correct [R])`` on ``x_t [in, n]``, in fp32, ``batch``
        examples at a time."""
        n = x_t.shape[1]
        totals = [(0.0, 0) for _ in self.groups]
        for start in range(0, n, batch):
            # x_t itself where one batch holds it all: a step keeps what it derives from its input
            # (the fused step's operand, its split) while the input is the same tensor
            xs = (x_t if n <= batch else x_t[:, start:start + batch]).contiguous()
            ys = y[start:start + batch]
            for gi, group in enumerate(self.groups):
                loss, correct = cross_entropy(group.forward(xs)[-1], ys)
                totals[gi] = (totals[gi][0] + loss * len(ys), totals[gi][1] + correct)
        return [(loss / n, correct) for loss, correct in totals]


def _out_shape(layer, h: torch.Tensor, runs: int) -> tuple[int, ...]:
    n = h.shape[-1]
    if isinstance(layer, StackedLinear):
        return (runs, layer.weight.shape[1], n)
    if isinstance(layer, StackedOffsetL2):
        return (runs, layer.mu.shape[1], n)
    return tuple(h.shape)


def first_linear(layer: StackedLinear, x: FirstLayerInput, relu: bool = False) -> torch.Tensor:
    """h = W x + b for every run as ONE product ``[W_v | b + W_c c] [X_v; 1]`` over the varying
    features (:class:`FirstLayerInput`) in their dtype: ``W [R, o, in]`` -> a fresh ``[R, o, n]``
    in W's dtype. The bias rides in the product as the weight of the row of ones, so no pass adds
    it; with ``relu``, max(h, 0). On the CPU in fp32 the product is oneDNN's, which applies the
    ReLU as it writes (no pass) and writes no given buffer; a row of the result does not depend
    on how many runs are stacked (tested). oneDNN's ReLU turns a NaN into 0 where ``clamp_min``
    keeps it; finite parameters and data give no NaN here, and a step that makes a parameter
    non-finite freezes its run at once (:func:`finite_runs`)."""
    R, o, i = layer.weight.shape
    bias = layer.bias.view(R * o) if layer.bias is not None else None
    weight = x.split.weight(layer.weight.view(R * o, i), bias, layer.weight.new_empty(R * o, x.split.columns))
    if x.rows is not None:
        h = matmul_nt(weight, x.rows, "relu" if relu else "none")
    else:           # the master weights to the operand's dtype (bf16), the result back to theirs
        h = torch.mm(weight.to(x.columns.dtype), x.columns).to(weight.dtype)
        if relu:
            h.clamp_min_(0.0)
    return h.view(R, o, -1)


def first_linear_backward(layer: StackedLinear, g: torch.Tensor, x: FirstLayerInput) -> None:
    """The first layer's gradients from ``g = dL/dh [R, o, n]`` as ONE product ``G [X_v; 1]^T``
    (:class:`FirstLayerInput`; G in the operand's dtype), whose last column is db."""
    R, o, i = layer.weight.shape
    bias = layer.grads["bias"].view(R * o) if layer.bias is not None else None
    G = g.reshape(R * o, -1).to(x.columns.dtype)
    x.split.gradients(matmul_nt(G, x.columns), layer.grads["weight"].view(R * o, i), bias)


def _is_relu(layer) -> bool:
    return isinstance(layer, StackedActivation) and layer.kind == "relu"
