"""The geometric analyses on hand-built networks whose answers are known."""

import numpy as np
import pytest
import torch

from distrep import analysis as A
from distrep.analysis import activation_rates, unit_census
from distrep.engine import StackedRuns
from distrep.models import ALIASES, create_model, parse
from tests.test_engine import EXTRA


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
    # "below t" is strictly below: a unit active on exactly 1 % of inputs is not rarely active
    at = unit_census(torch.tensor([[0.0, 0.01, 0.05, 0.2]], dtype=torch.float64))
    assert (at["never"].tolist(), at["below_1%"].tolist(), at["below_5%"].tolist()) == ([1], [1], [2])


def test_output_rectifiers_are_counted_and_abs_units_are_live():
    group, x = hand_built()
    relu2 = StackedRuns.from_state(parse("linear-abs-linear-relu", 4, 2, 3),
                                   {**group.state(), "2.weight": -torch.ones(2, 3, 4)})
    rates = activation_rates(relu2, x)
    assert sorted(rates) == [1, 3]
    assert (rates[3] == 0).all(), "negative weights on |h| >= 0 give a dead ReLU output"
    assert np.all(unit_census(rates[3])["never"] == 3)
    assert (rates[1][1] == 1).all()


@pytest.fixture(scope="module")
def test_data(mnist):
    return mnist.x_test[:600].t().contiguous(), mnist.y_test[:600]


def stacked(name, runs=2):
    return StackedRuns.from_models([create_model(name, seed=s) for s in range(runs)])


def test_clamping_extremes_and_the_untouched_ends(test_data):
    """Floor at p = 100 (ceiling at p = 0) makes every hidden unit constant at its own maximum
    (minimum): accuracy is that of the one class the constant predicts. Floor at 0 and ceiling
    at 100 change nothing."""
    x, y = test_data
    group = stacked("ReLU", runs=3)
    curves = A.clamping_curves(group, x, y)
    a = A.hidden_activations(group, x)
    np.testing.assert_array_equal(curves["floor"][:, 0], curves["unclamped"])
    np.testing.assert_array_equal(curves["ceiling"][:, -1], curves["unclamped"])
    for kind, column, constant in (("floor", -1, a.amax(2)), ("ceiling", 0, a.amin(2))):
        logits = torch.einsum("rch,rh->rc", group.layers[2].weight, constant)     # [R, C]
        predicted = logits.argmax(1)
        expected = (y.unsqueeze(0) == predicted.unsqueeze(1)).double().mean(1)
        np.testing.assert_allclose(curves[kind][:, column], expected.numpy())
    assert (np.diff(curves["percents"]) == 1).all() and curves["floor"].shape == (3, 101)
    # in between, each unit has its own level: p % of the way from ITS min to ITS max
    lo, hi = a.amin(2, keepdim=True), a.amax(2, keepdim=True)
    for kind, pct in (("floor", 40), ("ceiling", 60)):
        clamped = A.clamp(a, lo + pct / 100 * (hi - lo), kind)
        expected = A.accuracy(group.tail(2).forward(clamped)[-1], y).numpy()
        np.testing.assert_array_equal(curves[kind][:, pct], expected)


def test_half_drop_on_synthetic_curves():
    p = np.arange(0, 101, 10.0)
    falling = 0.9 - 0.8 * p / 100                       # floor: 0.9 at p = 0 down to 0.1
    rising = 0.1 + 0.8 * p / 100                        # ceiling: 0.9 at p = 100 down to 0.1
    assert A.half_drop(p, falling, 0.9, "floor") == pytest.approx(56.25)
    assert A.half_drop(p, rising, 0.9, "ceiling") == pytest.approx(43.75)
    flat = np.full_like(p, 0.9)
    assert np.isnan(A.half_drop(p, flat, 0.9, "floor"))
    step = np.where(p >= 30, 0.2, 0.9)                  # drops between 20 and 30: interpolated
    assert A.half_drop(p, step, 0.9, "floor") == pytest.approx(20 + 10 * (0.45 - 0.9) / (0.2 - 0.9))
    plateau = np.where(p < 10, 0.9, np.where(p < 30, 0.45, 0.1))   # exactly half from p = 10
    assert A.half_drop(p, plateau, 0.9, "floor") == pytest.approx(10)
    both = np.stack([falling, flat])                    # vectorised over runs
    out = A.half_drop(p, both, np.array([0.9, 0.9]), "floor")
    assert out[0] == pytest.approx(56.25) and np.isnan(out[1])


@pytest.mark.parametrize("name", ["Abs2-Neg", "ReLU-L2", "linear-relu-linear+bias-relu"])
def test_one_unit_clamping_matches_a_loop(test_data, name):
    """The per-unit update of the output layer against clamping each unit by hand and
    running the output layer again."""
    x, y = test_data
    group = stacked(name, runs=2)
    percents = [0, 40, 100]
    curves = A.unit_clamping_curves(group, x, y, percents=percents, memory=3 * 8 * 2 * 10 * 600 * 3)
    a = A.hidden_activations(group, x)
    head = group.tail(2)
    lo, hi = a.amin(2), a.amax(2)
    for unit in (0, 4, 127):
        for i, pct in enumerate(percents):
            level = lo[:, unit] + pct / 100 * (hi[:, unit] - lo[:, unit])             # [R]
            for kind in ("floor", "ceiling"):
                b = a.clone()
                b[:, unit] = A.clamp(a[:, unit], level[:, None], kind)
                expected = A.accuracy(head.forward(b)[-1], y).numpy()
                # the change is added to z rather than z recomputed: rounding may flip a near-tie
                np.testing.assert_allclose(curves[f"unit_{kind}"][:, unit, i], expected, atol=1.01 / len(y))


def test_clamp_levels_run_from_each_units_own_minimum_to_its_maximum():
    """L_p = min + p/100 (max - min) per run and unit, the minimum below zero here."""
    a = torch.tensor([[[-2.0, 0.0, 6.0], [1.0, 3.0, 2.0]]], dtype=torch.float64)     # [R=1, H=2, n=3]
    levels = A.clamp_levels(a, np.array([0, 50, 100]))
    assert levels.shape == (3, 1, 2, 1)
    assert levels[:, 0, :, 0].tolist() == [[-2.0, 1.0], [2.0, 2.0], [6.0, 3.0]]


def test_hyperplane_summary_by_hand():
    """One unit, two classes of two examples: class 0 at z = -1, +1 (mean 0, mean |z| 1), class 1
    at 2, 3. Histogram of 4 bins over [-1, 3], each 1 wide: -1 in bin 0, +1 in bin 2, 2 in bin 3,
    and the maximum 3 in the last bin."""
    z = torch.tensor([[[-1.0, 1.0, 2.0, 3.0]]])
    y = torch.tensor([0, 0, 1, 1])
    out = A.hyperplane_summary(z, y, 2, bins=4)
    np.testing.assert_allclose(out["class_mean"][0, 0], [0.0, 2.5])
    np.testing.assert_allclose(out["class_abs_mean"][0, 0], [1.0, 2.5])
    assert out["target_rank_abs"].tolist() == [[1]] and out["target_rank_signed"].tolist() == [[2]]
    assert out["hist"][0, 0].tolist() == [[1, 0, 1, 0], [0, 0, 0, 2]]
    np.testing.assert_allclose(out["edges"][0, 0], [-1.0, 0.0, 1.0, 2.0, 3.0])


def test_hyperplane_summary_tells_distance_from_intensity():
    """Unit j puts class j at 0 and class c at distance 1 + c (a distance code), or class j at
    +100 (an intensity code)."""
    C, n_per = 4, 5
    y = torch.arange(C).repeat_interleave(n_per)
    distance = torch.zeros(1, C, C * n_per)
    for j in range(C):
        distance[0, j] = torch.where(y == j, 0.0, 1.0 + y.double()).float()
    out = A.hyperplane_summary(distance, y, C, bins=8)
    assert (out["target_rank_abs"] == 1).all()
    assert out["hist"].sum(3)[0].tolist() == [[n_per] * C] * C          # every example counted once
    intensity = distance.clone()
    for j in range(C):
        intensity[0, j, y == j] = 100.0
    out = A.hyperplane_summary(intensity, y, C)
    assert (out["target_rank_abs"] == C).all() and (out["target_rank_signed"] == 1).all()


def test_offsetl2_prototypes_at_the_class_means_are_nearest_their_own_class(mnist):
    x, y = mnist.x_train[:2000].t().contiguous(), mnist.y_train[:2000]
    group = stacked("ReLU-L2-Neg", runs=2)
    h = A.hidden_activations(group, x)
    means = A.class_means(h, y, 10)                                    # [R, C, H]
    layer = group.layers[2]
    layer.mu.copy_(means)
    out = A.prototype_summary(group, x, y, 10, batch=700)              # batches must add up
    assert (out["own_rank"] == 1).all() and (out["own_rank_euclidean"] == 1).all()
    assert (out["own_prototype_rank"] == 1).all()
    np.testing.assert_allclose(out["class_means"], means.numpy(), rtol=1e-5)
    assert np.allclose(np.diagonal(out["distance"], axis1=1, axis2=2), 0, atol=1e-3)
    layer.mu.copy_(means.roll(1, dims=1))                              # mu_j at class j-1's mean
    out = A.prototype_summary(group, x, y, 10)
    assert (out["own_rank"] > 1).all() and (out["own_prototype_rank"] > 1).all()
    assert A.prototype_summary(stacked("ReLU2"), x, y, 10) is None


def test_the_reports_author_and_prototype_tables_by_hand():
    """The author table and the prototype table from arrays whose summaries are worked out here:
    two runs of a model with four hidden units and two classes."""
    from distrep.report import author_table, prototype_table
    author = {"ReLU": {
        "dead/layer1/units": np.array([4, 4]), "dead/layer1/never": np.array([1.0, 3.0]),
        "dead/layer1/below_1%": np.array([2.0, 2.0]),
        "clamping/floor": np.zeros((2, 3)), "clamping/range": np.array([[0.0, 4.0], [-2.0, 6.0]]),
        "clamping/unclamped": np.array([0.9, 0.8]), "clamping/floor_dropoff": np.array(40.0),
        "clamping/ceiling_dropoff": np.array(5.0),
        # equilibrium points 0, 50, 50, 100 and 0, 0, 100, 100 (%): mean 50, population std 43.3
        # pooled over units and runs, as the script pools them; median 50; 3 of 8 without one
        "equilibrium/percentage": np.array([[0.0, 50, 50, 100], [0.0, 0, 100, 100]]),
        "equilibrium/met": np.array([[False, True, True, True], [False, False, True, True]]),
        # classes with at least half their examples below each unit's point: 2, 1, 1, 0 and 0 x 4
        "boundaries": np.stack([np.array([[[1.0, 0.5], [1, 0], [0, 1], [0, 0.4]], [[0.0, 0.2]] * 4]),
                                np.zeros((2, 4, 2))], 3)}}
    head, body = author_table(author)
    row = dict(zip(head, body[0]))
    assert body[0][0] == "ReLU" and len(body[0]) == len(head) == 11
    assert row["unclamped train acc. (%)"] == "85.00 ± 7.07" and row["range [min, max]"] == "[-1, 5]"
    assert body[0][3:7] == ["40", "9", "5", "1"]                     # ours beside the notes' ReLU figures
    assert row["equilibrium point (%): mean ± std, median"] == "50.0 ± 43.3, 50.0"
    assert row["units without one (%)"] == "37.5"
    assert row["classes mostly below it, per unit"] == "0.5 ± 0.7 of 2"
    assert body[0][-1] == "L1: 2 ± 1 / 2 ± 0 of 4"
    prototypes = {"ReLU-L2-Neg": {
        "own_prototype_rank": np.array([[1, 1, 3], [1, 2, 3]]), "weighted_distance": np.zeros((2, 3, 3)),
        "own_rank": np.array([[1, 2, 3], [3, 3, 3]]), "own_rank_euclidean": np.array([[1, 1, 1], [1, 1, 1]])}}
    head, body = prototype_table(prototypes)
    # seen ranks: means 5/3 and 2; nearest in 2/3 and 1/3 of the classes, farthest (3) in 1/3 each
    assert body == [["ReLU-L2-Neg", "1.83 ± 0.24", "50.0 ± 23.6", "33.3 ± 0.0", "2.50 ± 0.71", "1.00 ± 0.00"]]


def test_prototype_summary_by_hand():
    """One example per class (so the class means are the examples): m_0 = (0, 0), m_1 = (2, 0),
    m_2 = (0, 4); prototypes mu_0 = (0, 0), mu_1 = (0, 3), mu_2 = (0, 5), unit weights. Distances
    d[j, c] = |m_c - mu_j|: rows [0, 2, 4], [3, sqrt 13, 1], [5, sqrt 29, 1]. mu_1 is farther from
    its own class than from classes 0 and 2 (own rank 3); from m_1, mu_0 is nearer than mu_1
    (own prototype rank 2). A negative weight (the coded form's alpha) counts as 0 in the
    weighted distance: with w_1 = (1, -1), row 1 becomes [0, 2, 0]."""
    model = create_model("offsetl2", in_features=2, num_classes=3, offsetl2_form="coded", seed=0)
    with torch.no_grad():
        model[0].mu.copy_(torch.tensor([[0.0, 0.0], [0.0, 3.0], [0.0, 5.0]]))
        model[0].alpha.fill_(1.0)
    x, y = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 4.0]]), torch.tensor([0, 1, 2])
    group = StackedRuns.from_models([model])
    out = A.prototype_summary(group, x, y, 3)
    expected = np.array([[0, 2, 4], [3, 13 ** 0.5, 1], [5, 29 ** 0.5, 1]])
    np.testing.assert_allclose(out["distance"][0], expected, rtol=1e-6)
    np.testing.assert_allclose(out["weighted_distance"][0], expected, rtol=1e-6)
    assert out["own_rank"].tolist() == out["own_rank_euclidean"].tolist() == [[1, 3, 1]]
    assert out["own_prototype_rank"].tolist() == [[1, 2, 1]]
    group.layers[0].alpha[0, 1, 1] = -1.0
    out = A.prototype_summary(group, x, y, 3)
    np.testing.assert_allclose(out["weighted_distance"][0, 1], [0, 2, 0], atol=1e-6)
    np.testing.assert_allclose(out["distance"][0], expected, rtol=1e-6)
    assert out["weight"][0, 1].tolist() == [1.0, -1.0]


def test_one_unit_clamping_of_some_units_is_theirs_in_the_order_asked(test_data):
    x, y = test_data
    clamper = A.UnitClamp(stacked("ReLU", runs=2), x, y)
    levels = A.clamp_levels(clamper.a, np.array([30]))[0]
    every = clamper.accuracy(levels, "ceiling")
    which = torch.tensor([5, 2, 90])
    np.testing.assert_array_equal(clamper.accuracy(levels, "ceiling", which), every[:, which.numpy()])


@pytest.mark.parametrize("name", list(ALIASES) + EXTRA + ["linear-offsetl2", "offsetl2-relu-linear"])
def test_every_analysis_runs_on_every_model_type(name, mnist):
    group = stacked(name)
    train = (mnist.x_train[:300].t().contiguous(), mnist.y_train[:300])
    test = (mnist.x_test[:200].t().contiguous(), mnist.y_test[:200])
    found = A.analyze_runs(group, train, test, 10, unit_examples=50)
    assert "clamping" in found
    assert ("prototypes" in found) == (group.specs[A.output_layer(group)].kind == "offsetl2")
    for analysis, arrays in found.items():
        for key, value in arrays.items():
            if not key.endswith(("_half", "_dropoff")):                 # NaN there means "never"
                assert np.isfinite(value).all(), (name, analysis, key)


def test_the_reports_analysis_tables_by_hand():
    """The report's tables of the analyses from arrays whose summaries are worked out here:
    percentages of a layer's units as mean ± sample std over runs (train before test), the
    own class's ranks and |z| ratio with the reading they imply, and the clamping summaries."""
    from distrep.report import clamping_table, dead_unit_table, hyperplane_table, reading
    runs = lambda *v: np.array(v, dtype=float)                                       # noqa: E731
    census = {"ReLU2": {f"{split}/layer1/{key}": value for split in ("test", "train") for key, value in (
        ("units", np.array([64, 64])), ("never", runs(16, 32)), ("below_1%", runs(32, 32)), ("below_5%", runs(64, 48)))}}
    head, body = dead_unit_table(census)
    assert [row[:4] for row in body] == [["ReLU2", "train", "layer 1", "64"], ["ReLU2", "test", "layer 1", "64"]]
    assert body[0][4:] == ["37.5 ± 17.7", "50.0 ± 0.0", "87.5 ± 17.7"]       # 25 and 50 %, ...
    # one run, four classes: unit j's own class j at mean |z| 1, the others at 2, 3, 4 (distance),
    # or the own class farthest (intensity)
    near = np.array([[[1.0, 2, 3, 4], [2, 1, 3, 4], [3, 4, 1, 2], [2, 3, 4, 1]]])
    far = np.array([[[4.0, 1, 2, 3], [1, 4, 2, 3], [1, 2, 4, 3], [1, 2, 3, 4]]])
    found = {name: {"class_abs_mean": z, "target_rank_abs": rank, "target_rank_signed": rank}
             for name, z, rank in (("Dist", near, np.ones((1, 4))), ("Int", far, np.full((1, 4), 4.0)))}
    head, body = hyperplane_table(found)
    assert body[0][1:] == ["1.00 ± 0.00", "1.00 ± 0.00", "0.33 ± 0.00", "distance (own class nearest 0)"]
    assert body[1][1:] == ["4.00 ± 0.00", "4.00 ± 0.00", "2.00 ± 0.00", "intensity (own class farthest from 0)"]
    assert [reading(r, 10) for r in (2.0, 2.1, 8.9, 9.0)] == [
        "distance (own class nearest 0)", "neither", "neither", "intensity (own class farthest from 0)"]
    # two runs, two units, three clamp levels
    unit_floor = np.array([[[0.9, 0.8, 0.5], [0.9, 0.9, 0.7]], [[0.8, 0.8, 0.8], [0.8, 0.6, 0.2]]])
    c = {"unclamped": runs(0.9, 0.8), "floor_half": runs(30, 40), "ceiling_half": runs(5, np.nan),
         "unit_unclamped": runs(0.9, 0.8), "unit_floor": unit_floor, "unit_ceiling": unit_floor[:, :, ::-1]}
    head, body = clamping_table({"ReLU": c})
    # largest drops at the end level: 90 - 50 = 40 and 80 - 20 = 60 points
    assert body[0][1:] == ["85.00 ± 7.07", "35.0 ± 7.1", "5.0 ± 0.0", "50.0 ± 14.1", "50.0 ± 14.1"]


def test_the_analyses_take_a_model_built_by_hand(test_data):
    """An nn.Sequential of the family's layers, written without create_model (and sliced past
    its Flatten, which keeps its modules' old names), stacks as the Net it equals and gives the
    same analyses; models that differ, or layers the engine has no batched form of, are
    refused by name instead of being read with the first model's layers."""
    from torch import nn

    from distrep.errors import DistrepError
    from distrep.layers import Neg, OffsetL2
    x, y = test_data
    nets = [create_model("ReLU-L2-Neg", width=16, seed=s) for s in range(2)]
    mine = []
    for net in nets:
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(inplace=True),
                              OffsetL2(16, 10), Neg())
        for layer, theirs in zip(model[1:], net):
            layer.load_state_dict(theirs.state_dict())
        mine.append(model[1:])
    ours, theirs = StackedRuns.from_models(mine), StackedRuns.from_models(nets)
    assert ours.specs == theirs.specs
    for name, tensor in theirs.state().items():
        assert torch.equal(ours.state()[name], tensor)
    np.testing.assert_array_equal(A.clamping_curves(ours, x, y)["floor"],
                                  A.clamping_curves(theirs, x, y)["floor"])
    refusals = {
        "no models to stack": [],
        r"model 1 is Linear\(784→16\) → Abs .* but model 0 is Linear\(784→16\) → ReLU":
            [create_model("ReLU", 16, seed=0), create_model("Abs", 16, seed=1)],
        "model 1's OffsetL2 computes the coded form, model 0's the paper form":
            [nets[0], create_model("ReLU-L2-Neg", 16, seed=1, offsetl2_form="coded")],
        "no batched form of rbf": [create_model("ReLU-RBF-Neg", 16, seed=0)],
        r"layer 0 of the model, Flatten.*pass model\[1:\]": [nn.Sequential(nn.Flatten(), *mine[0])],
        r"layer 1 of the model, ELU\(alpha=0.5\), is not a layer of the family":
            [nn.Sequential(nn.Linear(784, 16), nn.ELU(alpha=0.5), nn.Linear(16, 10))],
        "layer 2 of the model takes 8 features but the layer before it gives 16":
            [nn.Sequential(nn.Linear(784, 16), nn.ReLU(), nn.Linear(8, 10))],
        "got a Linear": [nn.Linear(784, 10)],
        "no layer with parameters": [nn.Sequential(nn.ReLU(), Neg())],
    }
    for message, models in refusals.items():
        with pytest.raises(DistrepError, match=message):
            StackedRuns.from_models(models)
    relu = nn.Sequential(nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10, bias=False))
    assert StackedRuns.from_models([relu]).specs == parse("ReLU", 16)
    # a hand-built OffsetL2's form is read off the layer: coded runs are stacked as coded
    coded = nn.Sequential(nn.Linear(784, 16), nn.ReLU(), OffsetL2(16, 10, form="coded"), Neg())
    assert StackedRuns.from_models([coded]).layers[2].form == "coded"
    with pytest.raises(DistrepError, match="different forms"):
        StackedRuns.from_models([nn.Sequential(OffsetL2(784, 16), OffsetL2(16, 10, form="coded"))])


def test_per_run_inputs_are_batched_by_example(test_data):
    """Inputs of each run's own [R, in, n] give what the shared [in, n] gives when they agree."""
    x, _ = test_data
    group = stacked("ReLU", runs=2)
    shared = A.activation_rates(group, x, batch=256)
    own = A.activation_rates(group, x.expand(2, *x.shape).contiguous(), batch=256)
    torch.testing.assert_close(own[1], shared[1])


def test_example_major_inputs_are_refused_with_the_fix(test_data):
    """The analyses take feature-major inputs [in, n]; the usual [n, in] (500 x 784 here) gave
    'mat1 and mat2 shapes cannot be multiplied' from deep inside the first layer."""
    from distrep.errors import DistrepError
    x, y = test_data
    group = stacked("ReLU")
    with pytest.raises(DistrepError, match=r"must be \[784, n\] or \[runs, 784, n\], got \[600, 784\]; pass x.t\(\)"):
        A.clamping_curves(group, x.t(), y)
    with pytest.raises(DistrepError, match=r"got \[784\]$"):
        A.activation_rates(group, x[:, 0])
    assert A.activation_rates(group, x)[1].shape == (2, 128)
    activations = stacked("ReLU2-Neg").tail(3)                   # relu, neg: no width to check
    assert activations.forward(torch.ones(2, 10, 5))[-1].shape == (2, 10, 5)
