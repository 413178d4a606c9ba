import math

import pytest
import torch

from distrep import layers as L
from distrep.layers import OffsetL2, offset_l2


def loop_reference(x, mu, alpha, form):
    """The formula written out with explicit loops over examples and outputs (float64)."""
    n, out = x.shape[0], mu.shape[0]
    y = torch.empty(n, out, dtype=torch.float64)
    for a in range(n):
        for j in range(out):
            if form == "paper":
                y[a, j] = math.sqrt(sum(float(alpha[j, i]) ** 2 * (float(x[a, i]) - float(mu[j, i])) ** 2
                                        for i in range(x.shape[1])))
            else:
                s = sum(float(alpha[j, i]) * (float(x[a, i]) - float(mu[j, i])) ** 2
                        for i in range(x.shape[1]))
                y[a, j] = math.sqrt(max(s, 1e-12))
    return y


def random_problem(n=6, d=5, out=4, seed=0, negative_alpha=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    mu = torch.randn(out, d, generator=g, dtype=torch.float64)
    alpha = torch.rand(out, d, generator=g, dtype=torch.float64) + 0.5
    if negative_alpha:
        alpha[0] = -alpha[0]          # makes the coded form's sum negative for output 0
    return x, mu, alpha


@pytest.mark.parametrize("form", ["paper", "coded"])
@pytest.mark.parametrize("method", ["direct", "expanded"])
def test_matches_explicit_loop(form, method):
    x, mu, alpha = random_problem(negative_alpha=True)
    expected = loop_reference(x, mu, alpha, form)
    got = offset_l2(x, mu, alpha, form, method)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)
    if form == "coded":           # the clamp is active for the negative-alpha output
        assert torch.all(got[:, 0] == math.sqrt(1e-12))
    else:                         # the paper form squares alpha, so its sign does not matter
        assert torch.allclose(got, offset_l2(x, mu, alpha.abs(), form, method))


@pytest.mark.parametrize("form", ["paper", "coded"])
@pytest.mark.parametrize("method", ["direct", "expanded"])
def test_gradcheck(form, method):
    x, mu, alpha = random_problem(n=3, d=4, out=2, seed=1)
    inputs = tuple(t.clone().requires_grad_() for t in (x, mu, alpha))
    assert torch.autograd.gradcheck(lambda a, b, c: offset_l2(a, b, c, form, method), inputs)


@pytest.mark.parametrize("form", ["paper", "coded"])
@pytest.mark.parametrize("method", ["direct", "expanded"])
def test_finite_gradient_at_the_prototype(form, method):
    x, mu, alpha = random_problem(n=3, d=4, out=2, seed=2)
    x[1] = mu[0]                      # example 1 sits exactly on prototype 0
    x, mu, alpha = (t.float().requires_grad_() for t in (x, mu, alpha))
    y = offset_l2(x, mu, alpha, form, method)
    assert y[1, 0].item() == pytest.approx(0.0 if form == "paper" else 1e-6, abs=1e-7)
    y.sum().backward()
    for t in (x, mu, alpha):
        assert torch.isfinite(t.grad).all()
    # the norm's subgradient 0 at the prototype: only output 1 contributes to x[1]'s gradient
    x1 = x[1].detach()
    expected = (alpha[1] ** 2 if form == "paper" else alpha[1]) * (x1 - mu[1]) / y[1, 1]
    assert torch.allclose(x.grad[1], expected.detach(), rtol=1e-4, atol=1e-5)


def test_expanded_agrees_with_direct_in_fp32_at_raw_pixel_scale():
    # Hidden activations of a raw-pixel network are in the hundreds; near-prototype inputs make
    # the expanded form's terms cancel, which is why it accumulates in float64.
    g = torch.Generator().manual_seed(3)
    mu = torch.rand(10, 128, generator=g) * 300
    x = torch.cat([mu + torch.randn(10, 128, generator=g) * 0.5,          # close to a prototype
                   torch.rand(200, 128, generator=g) * 300])
    alpha = torch.rand(10, 128, generator=g) + 0.5
    for form in ("paper", "coded"):
        args = [t.clone().requires_grad_() for t in (x, mu, alpha)]
        direct = offset_l2(*args, form, "direct")
        direct.square().sum().backward()
        grads_direct = [t.grad.clone() for t in args]
        args2 = [t.clone().requires_grad_() for t in (x, mu, alpha)]
        expanded = offset_l2(*args2, form, "expanded")
        expanded.square().sum().backward()
        exact = offset_l2(*(t.double() for t in (x, mu, alpha)), form, "direct")
        # both fp32 paths within fp32 rounding of the float64 truth, near-prototype rows included
        assert torch.allclose(direct.double(), exact, rtol=1e-5, atol=1e-3)
        assert torch.allclose(expanded.double(), exact, rtol=1e-5, atol=1e-3)
        for a, b in zip(grads_direct, (t.grad for t in args2)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))


def test_squared_distances_at_their_prototypes_are_never_negative():
    """At x = mu_j the expanded forms' three terms cancel and rounding leaves either sign (59 of
    these 200 in OffsetL2's float64 sum, 50 in RBF's fp32 one); a squared distance below 0 would
    be a negative distance for RBF's logits and the root of a negative number for anyone calling
    these directly, so both floor it at 0."""
    from distrep.heads import squared_euclidean
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(10, 128, generator=g) * 3
    x = mu[torch.randint(0, 10, (200,), generator=g)]
    weight = torch.rand(10, 128, generator=g) * 2
    for dtype in (torch.float32, torch.float64):
        a, m, w = x.to(dtype), mu.to(dtype), weight.to(dtype)
        for s in (L.squared_distance(a, m, w, "expanded"), squared_euclidean(a, m)):
            assert (s >= 0).all()
            assert s.min() == 0 or float(s.min()) < 1e-9 * float(s.max())


def test_auto_method_avoids_the_big_tensor(monkeypatch):
    calls = []
    monkeypatch.setattr(L, "squared_distance_direct", lambda *a: calls.append(a) or 1 / 0)
    n = L.DIRECT_MAX_ELEMENTS // (10 * 128) + 1
    x, mu, alpha = torch.randn(n, 128), torch.randn(10, 128), torch.ones(10, 128)
    y = offset_l2(x, mu, alpha)                      # would raise if the direct path ran
    assert y.shape == (n, 10) and not calls
    with pytest.raises(ZeroDivisionError):            # small inputs do take the direct path
        offset_l2(x[:10], mu, alpha)


def test_module_parameters_init_and_repr():
    torch.manual_seed(0)
    layer = OffsetL2(128, 10)
    assert layer.mu.shape == layer.alpha.shape == (10, 128)
    assert torch.all(layer.alpha == 1)
    mu = layer.mu.detach()
    assert abs(float(mu.std()) - 0.1) < 0.01 and abs(float(mu.mean())) < 0.01
    assert "in_features=128, out_features=10, form=paper" in repr(layer)
    x = torch.randn(5, 128)
    assert torch.equal(layer(x), offset_l2(x, layer.mu, layer.alpha))
    with pytest.raises(ValueError, match="unknown OffsetL2 form"):
        OffsetL2(3, 2, form="squared")
    with pytest.raises(ValueError, match="unknown method 'exact'"):    # at once, not at the first call
        OffsetL2(3, 2, method="exact")
    with pytest.raises(ValueError, match="unknown method 'exact'"):
        offset_l2(x, layer.mu, layer.alpha, method="exact")


def test_abs_and_neg():
    x = torch.tensor([-2.0, 0.0, 3.0])
    assert torch.equal(L.Abs()(x), torch.tensor([2.0, 0.0, 3.0]))
    assert torch.equal(L.Neg()(x), torch.tensor([2.0, -0.0, -3.0]))


def test_the_benchmarks_author_arithmetic_is_the_coded_form():
    """bench's Table 3 baseline computes the coded OffsetL2 (in its input's precision)."""
    from distrep.bench import AuthorOffsetL2
    torch.manual_seed(0)
    layer = AuthorOffsetL2(6, 3).double()
    with torch.no_grad():
        layer.alpha.uniform_(-0.5, 2.0)        # negative alphas: the clamp matters
    x = torch.randn(40, 6, dtype=torch.float64)
    expected = offset_l2(x, layer.mu.detach(), layer.alpha.detach(), form="coded", method="direct")
    assert torch.allclose(layer(x), expected, rtol=1e-10, atol=1e-12)
    assert (expected == L.CODED_CLAMP ** 0.5).any()    # some distances were clamped


@pytest.mark.parametrize("paper", [True, False])
def test_the_in_place_root_gives_the_roots_values_bit_for_bit(paper):
    """engine.offsetl2_root_ (the analyses' clamp loop, no gradient) against offsetl2_root's y:
    negative, zero, tiny (below and above the coded clamp), ordinary and NaN squared distances."""
    from distrep.engine import offsetl2_root, offsetl2_root_
    for dtype in (torch.float32, torch.float64):
        s = torch.tensor([-3.0, -1e-20, 0.0, 1e-14, 1e-12, 2e-12, 0.25, 7.0, 1e6, float("nan")], dtype=dtype)
        expected, _ = offsetl2_root(s, paper)
        got = offsetl2_root_(s.clone(), paper)
        assert torch.equal(got.isnan(), expected.isnan())
        assert torch.equal(got.nan_to_num(-1.0), expected.nan_to_num(-1.0)), (got, expected)


@pytest.mark.parametrize("form", ["paper", "coded"])
@pytest.mark.parametrize("method", ["direct", "expanded"])
def test_any_leading_dimensions_as_nn_linear_takes(form, method):
    # [batch, tokens, features] with as many tokens as outputs: broadcasting the leading
    # dimensions against the prototypes gave a [3, 1, 4] result of the wrong distances
    x, mu, alpha = random_problem(n=12, out=4, negative_alpha=True)
    expected = loop_reference(x, mu, alpha, form)
    y = offset_l2(x.reshape(3, 4, 5), mu, alpha, form, method)
    assert y.shape == (3, 4, 4)
    torch.testing.assert_close(y.reshape(12, 4), expected, rtol=1e-7, atol=1e-9)
    one = offset_l2(x[7], mu, alpha, form, method)                  # one example, [in] -> [out]
    assert one.shape == (4,)
    torch.testing.assert_close(one, expected[7], rtol=1e-7, atol=1e-9)
    layer = OffsetL2(5, 4, form=form, method=method).double()
    assert layer(x.reshape(2, 2, 3, 5)).shape == (2, 2, 3, 4)


def test_inputs_of_another_width_are_refused_by_name():
    layer = OffsetL2(5, 4)
    for shape in [(3, 6), (5, 3), ()]:
        with pytest.raises(ValueError, match=rf"OffsetL2 takes inputs of 5 features .*got shape \[{', '.join(map(str, shape))}\]"):
            layer(torch.randn(shape))
