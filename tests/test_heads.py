"""The prior-art distance layers (rbf, mahalanobis, gmlvq, cosine), the engine's autograd path
for any layer, both paths against the reference trainer, and a layer registered by a user."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from distrep import heads
from distrep.engine import engine_path
from distrep.errors import DistrepError
from distrep.models import AFFINE_LAYERS, ALIASES, create_model, parse, register_layer
from distrep.sweep import SweepConfig
from tests.test_engine import EXTRA, assert_matches_reference, relative, small, sweep

torch.manual_seed(0)
X = torch.randn(7, 5, dtype=torch.float64)


def _loop(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Each head's formula, one example and one output at a time."""
    out = torch.empty(len(x), layer.out_features, dtype=torch.float64)
    for n, j in itertools.product(range(len(x)), range(layer.out_features)):
        if isinstance(layer, heads.RBF):
            out[n, j] = layer.rho[j].exp() * ((x[n] - layer.mu[j]) ** 2).sum()
        elif isinstance(layer, heads.Mahalanobis):
            out[n, j] = (layer.omega[j] @ (x[n] - layer.mu[j])).norm()
        elif isinstance(layer, heads.GMLVQ):
            out[n, j] = (layer.omega @ (x[n] - layer.mu[j])).norm() ** 2
        else:
            out[n, j] = layer.kappa * x[n] @ layer.weight[j] / (x[n].norm() * layer.weight[j].norm())
    return out


@pytest.mark.parametrize("name", list(heads.HEADS))
def test_each_head_computes_its_formula_and_its_gradient(name):
    layer = heads.HEADS[name](5, 3).double()
    with torch.no_grad():                        # away from the start, where metrics are I
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    torch.testing.assert_close(layer(X), _loop(layer, X), rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(layer, (X.clone().requires_grad_(),))


def test_heads_start_where_their_docstrings_say():
    g = torch.Generator().manual_seed(1)
    rbf, maha, gm, cos = (heads.HEADS[n](4, 3) for n in ("rbf", "mahalanobis", "gmlvq", "cosine"))
    for layer in (rbf, maha, gm, cos):
        layer.reset_parameters(generator=g)
    assert torch.equal(rbf.rho, torch.zeros(3)) and torch.equal(gm.omega, torch.eye(4))
    assert torch.equal(maha.omega, torch.eye(4).expand(3, 4, 4)) and float(cos.kappa.detach()) == 10.0
    assert heads.Mahalanobis(4, 3, rank=2).omega.shape == (3, 2, 4)
    # with Omega = I and gamma = 1 they are the plain Euclidean distance (squared or not)
    with torch.no_grad():
        gm.mu.copy_(maha.mu)
        rbf.mu.copy_(maha.mu)
    x = torch.randn(6, 4)
    torch.testing.assert_close(maha(x) ** 2, gm(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rbf(x), gm(x), rtol=1e-4, atol=1e-4)


# every head with and without neg, after relu and abs, like OffsetL2
HEAD_MODELS = [f"linear-{act}-{head}{neg}" for head in heads.HEADS for act in ("relu", "abs")
               for neg in ("", "-neg")]


def test_the_path_is_chosen_in_one_place_and_recorded():
    assert all(engine_path(parse(m)) == "hand-written" for m in list(ALIASES) + EXTRA)
    assert all(engine_path(parse(m)) == "autograd" for m in HEAD_MODELS)
    with pytest.raises(DistrepError, match="bf16 is a precision of the engine's hand-written and compiled"):
        SweepConfig(models=["ReLU", "linear-relu-rbf-neg"], precision="bf16").validate()
    SweepConfig(models=["ReLU", "linear-relu-rbf-neg"], precision="bf16", engine="compiled").validate()
    assert engine_path(parse("ReLU"), "compiled") == "compiled"
    with pytest.raises(DistrepError, match="hand-written engine has no gradient for rbf"):
        engine_path(parse("linear-relu-rbf-neg"), "hand-written")


@pytest.fixture(scope="module")
def standardized():
    from distrep.data import load_dataset
    return small(load_dataset("mnist", "standardized"))


def test_every_head_matches_the_reference_trainer(standardized):
    """The autograd path, 2 runs of each of the 16 head models trained together, against each
    run trained alone by the reference trainer (plain nn.Module + torch.optim-style SGD)."""
    results = sweep(standardized, HEAD_MODELS, preprocess="standardized")
    # vmapped products round differently from one run's; after 60 epochs Abs before a cosine
    # head has amplified that to 1e-4 (a wrong gradient term is off by far more than 1e-3)
    assert_matches_reference(results, standardized, "standardized", 60, tol=2e-4)


@pytest.mark.parametrize("names", [list(ALIASES), EXTRA])
def test_the_autograd_path_matches_the_reference_for_the_paper_models_too(names, standardized):
    """Both paths exist for these: put on the autograd path they still match."""
    results = sweep(standardized, names, preprocess="standardized", engine="autograd")
    assert_matches_reference(results, standardized, "standardized", 60, tol=2e-5)


# the layer kinds of the paper and a head: linear with and without an output bias, relu, abs,
# neg, offsetl2 and a distance head (compiling costs 5-10 s per model on the CPU)
COMPILED_MODELS = ["Abs2-Bias", "Abs-L2-Neg", "linear-relu-rbf-neg"]


def test_the_compiled_step_matches_the_reference_trainer(standardized):
    """torch.compile's fused step (Inductor on the CPU here): the same arithmetic as the
    autograd path, so the reference trainer's results to rounding, diverged runs and all."""
    from distrep.engine import CompiledRuns
    from distrep.sweep import Sweep
    config = SweepConfig(models=COMPILED_MODELS, runs=2, epochs=60, eval_every=20,
                         preprocess="standardized", engine="compiled")
    s = Sweep(config, standardized, progress=False)
    _, groups = s.chunk_trainer(s.chunks()[0])
    assert all(isinstance(g, CompiledRuns) for g in groups)
    results = s.run()
    assert_matches_reference(results, standardized, "standardized", 60, tol=2e-4)


def test_compiled_bf16_stays_near_fp32(standardized):
    """bf16 under autocast: products and activations in bf16, loss and update in fp32 — close to
    fp32 after 60 epochs, and not identical (it did run in bf16)."""
    kw = {"runs": 2, "epochs": 60, "eval_every": 20, "preprocess": "standardized", "engine": "compiled"}
    fp32, bf16 = (sweep(standardized, ["linear-relu-rbf-neg"], precision=p, **kw)
                  for p in ("fp32", "bf16"))
    for a, b in zip(fp32, bf16):
        gap = relative(b.arrays["train_loss"], a.arrays["train_loss"])
        assert 1e-6 < gap < 2e-2, (a.name, gap)


class Cauchy(nn.Module):
    """A user's distance head, written outside the package: d_j = log(1 + ||x - mu_j||^2)."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.mu = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self, generator=None):
        with torch.no_grad():
            self.mu.normal_(0.0, 0.1, generator=generator)

    def forward(self, x):
        return torch.log1p(heads.squared_euclidean(x, self.mu))


def test_a_layer_registered_by_a_user_trains_in_a_sweep_and_is_reported(tmp_path, mnist):
    from distrep.cli import main
    register_layer("cauchy", Cauchy, affine=True)
    try:
        with pytest.raises(DistrepError, match="exists already"):
            register_layer("cauchy", Cauchy, affine=True)
        a, b = create_model("linear-relu-cauchy-neg", seed=3), create_model("linear-relu-cauchy-neg", seed=3)
        assert torch.equal(a[2].mu, b[2].mu), "seeded through reset_parameters(generator)"
        out = tmp_path / "user"
        assert main(["sweep", "--models", "linear-relu-cauchy-neg,ReLU", "--runs", "2", "--epochs", "20",
                     "--eval-every", "10", "--train-subset", "300", "--quiet", "--out", str(out)]) == 0
        assert main(["report", str(out)]) == 0
        report = (out / "report.md").read_text()
        assert any(line.startswith("| linear-relu-cauchy-neg |") for line in report.splitlines())
        from distrep.storage import read_arrays
        from distrep.train import TrainConfig, train
        m = read_arrays(out / "models" / "linear-relu-cauchy-neg" / "metrics.npz")
        ref = train(TrainConfig("linear-relu-cauchy-neg", epochs=20, seed=1, eval_every=10,
                                train_subset=300), mnist, progress=False)
        assert relative(m["train_loss"][1], ref.train_loss) < 1e-4     # run 1 is seed 1
        assert np.isfinite(m["train_loss"]).all() and m["train_loss"][1, -1] < m["train_loss"][1, 0]
        assert main(["analyze", str(out)]) == 0            # skips it, analyses ReLU
        assert (out / "analysis" / "ReLU").is_dir() and not (out / "analysis" / "linear-relu-cauchy-neg").exists()
    finally:
        AFFINE_LAYERS.pop("cauchy", None)
    with pytest.raises(DistrepError, match="reset_parameters"):
        register_layer("plain", nn.Identity, affine=True)
    with pytest.raises(DistrepError, match="reset_parameters"):     # no generator to seed from
        register_layer("mylinear", type("MyLinear", (nn.Linear,), {}), affine=True)
    # a subclass inheriting reset_parameters(generator) is seeded like its parent
    register_layer("cauchytwo", type("CauchyTwo", (Cauchy,), {}), affine=True)
    AFFINE_LAYERS.pop("cauchytwo")


def test_chunk_memory_counts_a_heads_intermediates():
    """Mahalanobis builds Omega_j (x - mu_j) for every example and class, ``[n, out, rank]``;
    the chunk planner must count it (peak RSS measured: ~0.5 GB a run at n = 20,000)."""
    from distrep.sweep import bytes_per_run
    n = 20000
    assert bytes_per_run("linear-relu-mahalanobis-neg", 128, n, 784, 10) >= 4 * 4 * n * 10 * 128
    assert bytes_per_run("linear-relu-rbf-neg", 128, n, 784, 10) > bytes_per_run("ReLU", 128, n, 784, 10)


@pytest.mark.parametrize("name", list(heads.HEADS))
def test_each_head_takes_any_leading_dimensions(name):
    layer = heads.HEADS[name](5, 3).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    rows = torch.randn(12, 5, dtype=torch.float64)
    expected = _loop(layer, rows)
    torch.testing.assert_close(layer(rows.reshape(2, 2, 3, 5)), expected.reshape(2, 2, 3, 3))
    torch.testing.assert_close(layer(rows[4]), expected[4])
