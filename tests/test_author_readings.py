"""The author's analysis procedures (distrep.analysis.author_*) on a network built by hand, whose
answers are worked out in the comments."""

import numpy as np
import pytest
import torch

from distrep import analysis as A
from distrep.engine import StackedRuns
from distrep.models import create_model

# Four examples, two classes, two input features; hidden units: a0 = x0, a1 = x1, a2 = relu(-x0 - x1) = 0,
# a3 = 0 (its weights are zero); logits z = (a0, a1).
X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0]])
Y = torch.tensor([0, 1, 0, 1])


def hand_built(spec="linear-relu-linear", scale=1.0, tiny=0.0) -> StackedRuns:
    """``tiny``: a3 = tiny * x0 instead of 0 (its output weights stay 0)."""
    model = create_model(spec, 4, in_features=2, num_classes=2, seed=0)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0], [tiny, 0.0]]))
        model[0].bias.zero_()
        model[2].weight.copy_(scale * torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    return StackedRuns.from_models([model])


def test_layer_clamping_one_level_from_the_global_range():
    """ReLU: the range is the hidden ReLU's, [0, 2], so L_p = 2p/100. Floor max(a, L): all right
    below L = 1; from L = 1 example 1 ties (0 wins), so 3/4; at L = 2 example 3 ties too, 1/2.
    Ceiling min(a, L): right for every L > 0; at L = 0 examples 1 and 3 tie, 1/2."""
    c = A.author_layer_clamping(hand_built(), X.t().contiguous(), Y)
    np.testing.assert_array_equal(c["range"], [[0.0, 2.0]])
    p = c["percents"]
    np.testing.assert_allclose(c["floor"][0], np.where(p < 50, 1.0, np.where(p < 100, 0.75, 0.5)))
    np.testing.assert_allclose(c["ceiling"][0], np.where(p > 0, 1.0, 0.5))
    assert A.author_dropoff(p, c["floor"], c["unclamped"], "floor") == 100
    assert A.author_dropoff(p, c["ceiling"], c["unclamped"], "ceiling") == 0


def test_abs_models_range_includes_the_final_output():
    """The author's hook matches 'Abs' in the type name, which the root Model_Abs* has: with
    output weights 3, the final output reaches 6, so an Abs model's range is [0, 6] where the
    ReLU model's is [0, 2]."""
    relu, absm = hand_built("linear-relu-linear", 3.0), hand_built("linear-abs-linear", 3.0)
    assert A.author_hooked_layers(relu) == [1] and A.author_hooked_layers(absm) == [1, 2]
    assert A.author_hooked_layers(hand_built("linear-abs-linear-abs-neg")) == [1, 3, 4]
    np.testing.assert_array_equal(A.author_layer_clamping(relu, X.t().contiguous(), Y)["range"], [[0, 6 / 3]])
    np.testing.assert_array_equal(A.author_layer_clamping(absm, X.t().contiguous(), Y)["range"], [[0, 6]])
    # output weights -3: the final output reaches -6 (examples 2 and 3); the range is taken over
    # every batch, the minimum here in the first of two
    order = [2, 3, 0, 1]
    c = A.author_layer_clamping(hand_built("linear-abs-linear", -3.0), X[order].t().contiguous(), Y[order], batch=2)
    np.testing.assert_array_equal(c["range"], [[-6, 2]])


def test_dead_units_as_the_author_counts_them():
    """|a| > 1e-6 on Linear, ReLU and Neg/Abs outputs: the first Linear has one all-zero unit
    (a3), the ReLU two (a2 < 0 always, a3), the output layer none."""
    d = A.author_dead_units(hand_built(), X.t().contiguous())
    assert d["layer0/never"].tolist() == [1] and d["layer1/never"].tolist() == [2]
    assert d["layer2/never"].tolist() == [0] and d["layer1/units"].tolist() == [4]
    assert d["layer1/below_1%"].tolist() == [2]
    # active means |a| > 1e-6: a3 = 1e-7 x0 (at most 2e-7) still counts as dead
    d = A.author_dead_units(hand_built(tiny=1e-7), X.t().contiguous())
    assert d["layer0/never"].tolist() == [1] and d["layer1/never"].tolist() == [2]


def test_equilibrium_points_by_the_authors_bisection():
    """Unit 0 (values 1, 0, 2, 0): floor accuracy is 1 below t = 1 and 3/4 from there, ceiling
    accuracy 1 everywhere: mid 1 (3/4 vs 1, search below), mid 0.5 meets: t = 0.5, 25 %, two
    evaluations. Unit 1 (0, 1, 0, 2): floor and ceiling both 1 at mid 1: t = 1, 50 %, one.
    Units 2 and 3 never vary (min = max): the script falls back to t = min, 0 %."""
    eq = A.author_equilibrium(hand_built(), X.t().contiguous(), Y)
    np.testing.assert_allclose(eq["threshold"][0], [0.5, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(eq["percentage"][0], [25.0, 50.0, 0.0, 0.0])
    assert eq["evaluations"][0].tolist() == [2, 1, 1, 1]
    assert eq["met"][0].tolist() == [True, True, False, False]
    shares = A.author_boundaries(hand_built(), X.t().contiguous(), Y, eq["threshold"], 2)
    # unit 0 at 0.5: class 0 (1, 2) all above, class 1 (0, 0) all below
    np.testing.assert_allclose(shares[0, 0], [[0, 1], [1, 0]])
    # unit 1 at 1: class 0 (0, 0) below; class 1 (1, 2): half below (1 <= 1), half above
    np.testing.assert_allclose(shares[0, 1], [[1, 0], [0.5, 0.5]])


def test_the_bisections_limits_and_fallback():
    """Unit 0 meets at its second evaluation (above): allowed two, it still does; allowed one, it
    gives up there and falls back to its minimum, 0 %, not to where it stopped (0.5). With no
    tolerance unit 1 still meets at mid 1, where floor and ceiling agree exactly. Shifted by a
    hidden bias of 1 and an output bias of -1 (the same logits), unit 0 runs over [1, 3]: its
    point moves to 1.5, still 25 % of its own range."""
    x = X.t().contiguous()
    eq = A.author_equilibrium(hand_built(), x, Y, max_evaluations=2)
    assert eq["threshold"][0, 0] == 0.5 and eq["met"][0, 0] and eq["evaluations"][0, 0] == 2
    eq = A.author_equilibrium(hand_built(), x, Y, max_evaluations=1)
    assert eq["threshold"][0, 0] == 0.0 and eq["percentage"][0, 0] == 0 and not eq["met"][0, 0]
    assert eq["evaluations"][0, 0] == 2 and eq["threshold"][0, 1] == 1.0
    eq = A.author_equilibrium(hand_built(), x, Y, tolerance=0.0)
    assert eq["threshold"][0, 1] == 1.0 and eq["met"][0, 1]
    shifted = hand_built("linear-relu-linear+bias")
    shifted.layers[0].bias[0, 0] = 1.0
    shifted.layers[2].bias[0] = torch.tensor([-1.0, 0.0])
    eq = A.author_equilibrium(shifted, x, Y)
    assert eq["threshold"][0, 0] == 1.5 and eq["percentage"][0, 0] == 25.0


def test_author_readings_bundle():
    out = A.author_readings(hand_built(), X.t().contiguous(), Y, 2)
    assert float(out["clamping/floor_dropoff"]) == 100 and float(out["clamping/ceiling_dropoff"]) == 0
    assert out["boundaries"].shape == (1, 4, 2, 2) and out["equilibrium/percentage"].shape == (1, 4)
    with pytest.raises(KeyError):
        out["prototypes"]
