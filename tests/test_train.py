import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distrep.errors import DistrepError
from distrep.models import create_model
from distrep.storage import read_arrays, read_json, read_tensors
from distrep.train import TrainConfig, save_run, train


@pytest.mark.parametrize("model", ["ReLU", "Abs2-Neg", "ReLU-L2-Neg"])
def test_loss_falls_on_a_small_subset(model, mnist_small):
    r = train(TrainConfig(model, epochs=15, seed=0), mnist_small, progress=False)
    assert not r.diverged
    assert r.train_loss[-1] < 0.85 * r.train_loss[0]
    assert r.final["train_loss"] < r.train_loss[0]
    assert r.test_acc.shape == (15,) and np.isfinite(r.test_acc).all()


def test_same_seed_same_result_other_seed_other_result(mnist_small):
    cfg = TrainConfig("ReLU2", epochs=8, seed=5, eval_every=3)
    a = train(cfg, mnist_small, progress=False)
    b = train(cfg, mnist_small, progress=False)
    np.testing.assert_array_equal(a.train_loss, b.train_loss)
    np.testing.assert_array_equal(a.test_acc, b.test_acc)
    for k in a.state:
        assert torch.equal(a.state[k], b.state[k])
    c = train(TrainConfig("ReLU2", epochs=8, seed=6, eval_every=3), mnist_small, progress=False)
    assert not np.array_equal(a.train_loss, c.train_loss)
    assert a.test_epochs.tolist() == [3, 6, 8]


def test_one_epoch_is_one_plain_sgd_step_on_the_mean_cross_entropy(mnist_small):
    lr = 1e-3
    r = train(TrainConfig("Abs2", epochs=1, seed=2, lr=lr), mnist_small, progress=False)
    model = create_model("Abs2", seed=2)
    loss = F.cross_entropy(model(mnist_small.x_train), mnist_small.y_train)
    loss.backward()
    assert r.train_loss[0] == pytest.approx(loss.item(), rel=1e-6)
    x, y = mnist_small.x_train, mnist_small.y_train
    with torch.no_grad():
        # the epoch's loss and accuracy are those of its forward pass, before the update
        assert r.train_acc[0] == (model(x).argmax(1) == y).double().mean().item()
        for name, p in model.named_parameters():
            p.add_(p.grad, alpha=-lr)
            assert torch.equal(r.state[name], p), name
        # the final figures are the updated model's, on the training and on the test data
        assert r.final["train_acc"] == pytest.approx((model(x).argmax(1) == y).double().mean().item())
        assert r.final["train_loss"] == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-5)
        test_acc = (model(mnist_small.x_test).argmax(1) == mnist_small.y_test).double().mean().item()
        assert r.final["test_acc"] == pytest.approx(test_acc) and r.test_acc[0] == pytest.approx(test_acc)


def test_divergence_is_detected_and_run_frozen(mnist_small):
    r = train(TrainConfig("ReLU", epochs=30, seed=0, lr=1e4), mnist_small, progress=False)
    assert r.diverged and r.diverged_epoch is not None and r.diverged_epoch < 30
    e = r.diverged_epoch
    assert np.isnan(r.train_loss[e - 1:]).all() and np.isfinite(r.train_loss[:e - 1]).all()


def test_a_step_that_overflows_the_parameters_freezes_the_run_at_that_epoch(mnist_small):
    """lr 3e38 (the largest fp32 lr allowed): epoch 1's loss is finite, its update is not.
    The run diverges at epoch 1, its entry NaN, and no later epoch runs."""
    r = train(TrainConfig("ReLU", epochs=5, seed=0, lr=3e38), mnist_small, progress=False)
    assert r.diverged and r.diverged_epoch == 1
    assert np.isnan(r.train_loss).all() and np.isnan(r.train_acc).all()


def test_run_directory_holds_config_metrics_and_weights(tmp_path, mnist_small):
    r = train(TrainConfig("ReLU-L2", epochs=4, seed=1, eval_every=2, train_subset=300),
              mnist_small, progress=False)
    save_run(r, tmp_path)
    cfg = read_json(tmp_path / "config.json")
    assert cfg["config"]["model"] == "ReLU-L2" and cfg["config"]["train_subset"] == 300
    assert cfg["data"]["preprocess"] == "raw" and cfg["data"]["n_train"] == 300
    assert cfg["model"]["spec"] == "linear-relu-offsetl2"
    assert "torch" in cfg["versions"]
    m = read_arrays(tmp_path / "metrics.npz")
    assert m["train_loss"].shape == (4,) and m["test_epochs"].tolist() == [2, 4]
    weights = read_tensors(tmp_path / "model.safetensors")
    assert weights["2.mu"].shape == (10, 128)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = read_json(tmp_path / "result.json")
    assert result["test_acc"] == r.final["test_acc"] and result["diverged"] is False


@pytest.mark.parametrize("field, value, message", [
    ("epochs", 0, "epochs must be a positive integer"),
    ("lr", -0.1, "lr must be a positive finite number"),
    ("lr", float("nan"), "lr must be a positive finite number"),
    ("seed", -1, "seed must be an integer in 0.."),
    ("preprocess", "whiten", "unknown preprocessing"),
    ("model", "ReLU9", "unknown model 'ReLU9'"),
    ("device", "tpu", "device"),
])
def test_config_validation(field, value, message):
    cfg = TrainConfig("ReLU")
    setattr(cfg, field, value)
    with pytest.raises(DistrepError, match=message):
        cfg.validate()
