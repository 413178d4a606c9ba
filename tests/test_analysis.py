import numpy as np
import torch

from distrep.analysis import activation_rates, unit_census
from distrep.engine import StackedRuns
from distrep.models import parse


def hand_built():
    """Two runs of linear(2->4)-relu-linear(4->3). Input i (0..199) is (i, 1). Run 0's hidden
    units: 0 never active (bias -1), 1 always active (bias +1), 2 active only for i = 199
    (0.5 % of inputs), 3 active for i >= 194 (3 %). Run 1's units are all always active."""
    w = torch.zeros(2, 4, 2)
    b = torch.tensor([[-1.0, 1.0, -198.5, -193.5], [1.0, 1.0, 1.0, 1.0]])
    w[0, 2, 0] = w[0, 3, 0] = 1.0
    state = {"0.weight": w, "0.bias": b, "2.weight": torch.ones(2, 3, 4)}
    x = torch.stack([torch.arange(200.0), torch.ones(200)])       # [in, n]
    return StackedRuns.from_state(parse("linear-relu-linear", 4, 2, 3), state), x


def test_known_dead_always_and_rarely_active_units():
    group, x = hand_built()
    rates = activation_rates(group, x, batch=64)                   # slices must add up too
    assert list(rates) == [1]
    assert torch.allclose(rates[1][0], torch.tensor([0.0, 1.0, 0.005, 0.03], dtype=torch.float64))
    census = unit_census(rates[1])
    assert census["never"].tolist() == [1, 0]
    assert census["below_1%"].tolist() == [2, 0]
    assert census["below_5%"].tolist() == [3, 0]
    assert census["units"].tolist() == [4, 4]


def test_output_rectifiers_are_counted_and_abs_units_are_live():
    group, x = hand_built()
    relu2 = StackedRuns.from_state(parse("linear-abs-linear-relu", 4, 2, 3),
                                   {**group.state(), "2.weight": -torch.ones(2, 3, 4)})
    rates = activation_rates(relu2, x)
    assert sorted(rates) == [1, 3]
    assert (rates[3] == 0).all(), "negative weights on |h| >= 0 give a dead ReLU output"
    assert np.all(unit_census(rates[3])["never"] == 3)
    assert (rates[1][1] == 1).all()
