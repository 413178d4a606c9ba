import math

import pytest
import torch
from torch import nn

from distrep.errors import DistrepError
from distrep.layers import OffsetL2
from distrep.models import (ALIASES, HEAD_ALIASES, TABLE1, TABLE2, TABLE3, canonical_spec,
                            create_model, describe, display_name, layer_generator, parameter_count,
                            parse, register_layer, resolve)

EXTRA_SPECS = ["linear-relu-linear-relu-linear", "linear+nobias-abs-linear+bias",
               "linear-tanh-offsetl2", "linear-gelu-linear-softplus-neg"]


def expected_parameters(name, width=128):
    """Counted by hand from the paper's layer list."""
    spec = canonical_spec(name)
    if "offsetl2" in spec:
        return 784 * width + width + 2 * width * 10
    return 784 * width + width + width * 10 + (10 if "+bias" in spec else 0)


@pytest.mark.parametrize("name", list(ALIASES) + EXTRA_SPECS)
def test_every_model_shape_finite_outputs_and_gradients(name, mnist_small):
    model = create_model(name, width=32, seed=0)
    x = mnist_small.x_train[:64]
    out = model(x)
    assert out.shape == (64, 10) and torch.isfinite(out).all()
    nn.functional.cross_entropy(out, mnist_small.y_train[:64]).backward()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert sum(p.numel() for p in model.parameters()) == parameter_count(name, 32)


@pytest.mark.parametrize("name", list(ALIASES))
def test_parameter_counts_match_the_paper_architectures(name):
    model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == parameter_count(name) == expected_parameters(name)


def test_paper_aliases_have_the_paper_layers():
    assert canonical_spec("ReLU2-Neg") == "linear-relu-linear-relu-neg"
    assert describe("ReLU2-Neg") == "Linear(784→128) → ReLU → Linear(128→10, no bias) → ReLU → Neg"
    assert describe("Abs2-Bias") == "Linear(784→128) → Abs → Linear(128→10) → Abs"
    assert describe("Abs-L2-Neg") == "Linear(784→128) → Abs → OffsetL2(128→10) → Neg"
    assert describe("Linear-L2") == "Linear(784→128) → OffsetL2(128→10)"
    for name in TABLE1:
        assert create_model(name)[2].bias is None, "Table 1 output layers have no bias"
    for name in TABLE2:
        assert create_model(name)[2].bias is not None
    for name in TABLE3:
        assert isinstance(create_model(name)[2], OffsetL2)


def test_names_are_case_and_separator_insensitive():
    assert canonical_spec("relu2_neg") == canonical_spec("ReLU2-Neg")
    assert canonical_spec("LINEAR-RELU-LINEAR+BIAS") == "linear-relu-linear+bias"
    assert display_name("linear-relu-linear-relu-neg") == "ReLU2-Neg"
    assert display_name("linear-relu-linear-relu-linear") == "linear-relu-linear-relu-linear"


def test_neg_models_output_non_positive_logits(mnist_small):
    for name in ("ReLU2-Neg", "Abs2-Neg", "ReLU-L2-Neg"):
        assert (create_model(name, seed=1)(mnist_small.x_train[:50]) <= 0).all()


def test_deeper_spec_uses_width_for_every_hidden_layer():
    layers = parse("linear-relu-linear-relu-linear", width=64)
    sizes = [(l.in_features, l.out_features, l.bias) for l in layers if l.affine]
    assert sizes == [(784, 64, True), (64, 64, True), (64, 10, False)]


@pytest.mark.parametrize("bad, message", [
    ("ReLU3", "unknown model 'ReLU3'; valid names: Abs, ReLU, Abs2, Abs2-Neg, ReLU2, ReLU2-Neg"),
    ("linear-swish-linear", "unknown layer 'swish'"),
    ("relu-abs-neg", "unknown model"),
    ("linear-relu-offsetl2+bias", r"bad modifier '\+bias' on 'offsetl2'"),
])
def test_bad_specs_are_refused(bad, message):
    with pytest.raises(DistrepError, match=message):
        create_model(bad)


def test_seeded_init_is_pytorchs_linear_default():
    model = create_model("ReLU-Bias", seed=7)
    for k, layer in enumerate([model[0], model[2]]):
        g = layer_generator(7, k)
        w = torch.empty_like(layer.weight)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)   # what nn.Linear does
        b = torch.empty_like(layer.bias).uniform_(-1 / math.sqrt(layer.in_features),
                                                  1 / math.sqrt(layer.in_features), generator=g)
        assert torch.equal(layer.weight, w) and torch.equal(layer.bias, b)


def test_paired_design_shares_first_layer_across_variants():
    models = [create_model(name, seed=3) for name in TABLE1 + TABLE3]
    for m in models[1:]:
        assert torch.equal(m[0].weight, models[0][0].weight)
        assert torch.equal(m[0].bias, models[0][0].bias)
    assert not torch.equal(create_model("ReLU", seed=4)[0].weight, models[0][0].weight)
    # the output layer is seeded independently of the first
    assert not torch.equal(models[0][2].weight[:, :10], models[0][0].weight[:10, :10].T)


def test_seed_gives_identical_models_regardless_of_global_rng():
    a = create_model("Abs-L2", seed=11)
    torch.manual_seed(12345)
    torch.rand(1000)
    b = create_model("Abs-L2", seed=11)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert torch.all(b[2].alpha == 1) and abs(float(b[2].mu.detach().std()) - 0.1) < 0.01


def test_a_seed_means_the_same_weights_in_every_version():
    """Seed s of a run is a promise: the same s gives the same starting weights in every version
    of distrep (so a published run can be redone from its config), and each affine layer draws
    from its own stream. These numbers were drawn once and are pinned."""
    relu = create_model("ReLU", seed=0)
    assert torch.equal(relu[0].weight[0, :3], torch.tensor([0.015763258561491966, 0.008383376523852348,
                                                             0.019594168290495872]))
    assert torch.equal(relu[0].bias[:2], torch.tensor([-0.0034525864757597446, -0.03492242842912674]))
    assert torch.equal(relu[2].weight[0, :3], torch.tensor([7.651760097360238e-05, -0.04599948227405548,
                                                             0.017158614471554756]))
    assert torch.equal(create_model("ReLU-L2", seed=5)[2].mu[0, :3],
                       torch.tensor([-0.08247494697570801, -0.14542777836322784, -0.12203476577997208]))
    first, second = (torch.empty(1000).uniform_(generator=layer_generator(0, k)) for k in (0, 1))
    assert not torch.isclose(first, second).any(), "layers of one run share no stream"
    with pytest.raises(DistrepError, match="non-negative, got -1"):
        create_model("ReLU", seed=-1)


def test_the_grammar_by_its_edges():
    """What the grammar's docstring promises at its edges: +nobias on a hidden layer, +bias on
    the output, a dash out of place named where it is, sizes that must be positive, and the
    heads' short names read back."""
    sizes = [(l.out_features, l.bias) for l in parse("linear+nobias-relu-linear+bias") if l.affine]
    assert sizes == [(128, False), (10, True)]
    assert canonical_spec("linear+nobias-relu-linear+bias") == "linear+nobias-relu-linear+bias"
    for spec, where in (("linear-relu-", "a trailing"), ("-linear", "a leading"), ("linear--relu", "a doubled")):
        with pytest.raises(DistrepError, match=f"empty layer .*{where} '-'"):
            parse(spec)
    for sizes in ((0, 784, 10), (128, 0, 10), (128, 784, 0)):
        with pytest.raises(DistrepError, match="must be positive"):
            parse("ReLU", *sizes)
    for alias, spec in HEAD_ALIASES.items():
        assert display_name(spec) == alias and resolve(alias.upper()) == (alias, spec)


def test_a_layer_name_the_grammar_cannot_read_or_already_has_is_refused():
    for bad in ("Cauchy", "my-layer", "my_layer", "cauchy+", "\u00e4"):
        with pytest.raises(DistrepError, match="lower-case letters and digits"):
            register_layer(bad, nn.Identity, affine=False)
    for taken in ("relu", "neg", "linear", "offsetl2", "rbf"):       # activations, affine, heads
        for affine in (False, True):
            with pytest.raises(DistrepError, match="exists already"):
                register_layer(taken, nn.Identity, affine=affine)
