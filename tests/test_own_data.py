"""A dataset of your own: a directory of idx files under MNIST's names, any image size and
number of classes, trained, reported, compared and read back like MNIST, and recorded by its
contents so that changed files are not mistaken for the ones a run used."""

import gzip
import re
import shutil

import numpy as np
import pytest

from distrep import data as D
from distrep.errors import DistrepError
from distrep.experiment import trained_models
from distrep.storage import read_json
from tests.test_cli import assert_one_line_error, distrep

NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
         "t10k-labels-idx1-ubyte")


def write_own(directory, shape=(6, 10), classes=3, n_train=240, n_test=90, gzipped=(0, 3), seed=0,
              **replace):
    """Images ``[n, *shape]`` whose class c lights up row block c (learnable in a few epochs),
    labels 0..classes-1; the files at positions ``gzipped`` as .gz. ``replace`` puts other
    arrays in place of the four (by position, e.g. ``labels_train=...``)."""
    rng = np.random.default_rng(seed)
    arrays = []
    for n in (n_train, n_test):
        y = rng.integers(0, classes, n).astype(np.uint8)
        x = rng.integers(0, 60, (n, *shape)).astype(np.uint8)
        for c in range(classes):
            x[y == c, c * shape[0] // classes:(c + 1) * shape[0] // classes] += 150
        arrays += [x, y]
    for key, value in replace.items():
        arrays[["images_train", "labels_train", "images_test", "labels_test"].index(key)] = value
    directory.mkdir(parents=True, exist_ok=True)
    for i, (name, a) in enumerate(zip(NAMES, arrays)):
        raw = D.write_idx(a)
        if i in gzipped:
            (directory / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / name).write_bytes(raw)
    return arrays


def test_a_directory_is_a_dataset_named_by_its_contents(tmp_path):
    arrays = write_own(tmp_path / "own")
    spec = D.get_spec(str(tmp_path / "own"))
    path, fingerprint = spec.name.rsplit("#", 1)
    assert path == str(tmp_path / "own") and len(fingerprint) == 8
    assert (spec.num_features, spec.num_classes, spec.image_shape) == (60, 3, (6, 10))
    assert D.get_spec(spec.name) == spec                       # the recorded name reads it again
    data = D.load_dataset(spec.name, "standardized")
    assert data.x_train.shape == (240, 60) and data.image_shape == (6, 10)
    assert np.array_equal(data.y_test.numpy(), arrays[3])
    raw = D.load_dataset(f"{tmp_path}/own/", "raw")
    assert np.array_equal(raw.x_train.numpy(), arrays[0].reshape(240, 60))
    write_own(tmp_path / "other", seed=1)
    assert D.get_spec(str(tmp_path / "other")).name.rsplit("#", 1)[1] != fingerprint
    # a changed file is not the dataset a run recorded
    write_own(tmp_path / "own", seed=2)
    with pytest.raises(DistrepError, match=f"not those a run recorded .fingerprint {fingerprint}, now"):
        D.get_spec(spec.name)


@pytest.mark.parametrize("problem, arrays, message", [
    ("missing", None, "has no t10k-labels-idx1-ubyte[.gz]"),
    ("float images", {"images_train": np.zeros((240, 6, 10), np.float32)}, "expected uint8 images [n, h, w], got float32"),
    ("flat images", {"images_test": np.zeros((90, 60), np.uint8)}, "expected uint8 images [n, h, w], got uint8 [90, 60]"),
    ("labels short", {"labels_train": np.zeros(10, np.uint8)}, "240 train images but 10 labels"),
    ("sizes differ", {"images_test": np.zeros((90, 10, 6), np.uint8)}, "train images are [6, 10], test images [10, 6]"),
    ("one class", {"labels_train": np.zeros(240, np.uint8), "labels_test": np.zeros(90, np.uint8)}, "at least two classes"),
])
def test_a_directory_that_is_no_dataset_is_refused_by_name(tmp_path, problem, arrays, message):
    write_own(tmp_path / "own", **(arrays or {}))
    if problem == "missing":
        (tmp_path / "own" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DistrepError, match=re.escape(message)):
        D.get_spec(f"{tmp_path}/own")
    r = distrep("train", "--model", "ReLU", "--epochs", 1, "--dataset", f"{tmp_path}/own", "--out",
                tmp_path / "run")
    assert_one_line_error(r, message)
    assert not (tmp_path / "run").exists()


def test_own_data_through_sweep_report_compare_and_back(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_own(tmp_path / "own")
    exp = tmp_path / "exp"
    args = ["sweep", "--models", "ReLU,ReLU-L2-Neg", "--runs", 2, "--epochs", 200, "--width", 16,
            "--preprocess", "standardized", "--quiet", "--out", exp]
    r = distrep(*args[:-2], "--dataset", "./own", "--out", exp)
    assert r.returncode == 0, r.stderr
    config = read_json(exp / "config.json")
    recorded = config["config"]["dataset"]
    assert recorded == D.get_spec(str(tmp_path / "own")).name          # absolute, fingerprinted
    assert config["data"]["classes"] == ["0", "1", "2"] and config["data"]["image_shape"] == [6, 10]
    assert "nothing" not in distrep(*args[:-2], "--dataset", f"{tmp_path}/own/", "--out", exp).stderr
    r = distrep("analyze", exp)
    assert r.returncode == 0, r.stderr
    from PIL import Image
    assert Image.open(exp / "figures" / "first_layer_ReLU.png").size[0] > 100
    report = (exp / "report.md").read_text()
    assert "First-layer weights" in report and f"dataset: {recorded}, 240 training images" in report
    # what the runs learnt: the three row blocks tell the classes apart
    nets = trained_models(exp, "ReLU")
    data = D.load_dataset(recorded, "standardized")
    import torch
    with torch.no_grad():
        accuracy = [(net(data.x_test).argmax(1) == data.y_test).double().mean().item() for net in nets]
    assert min(accuracy) > 0.9 and nets[0][2].out_features == 3
    # the files changed: resuming, or a new run into the same directory, is another dataset
    shutil.move(tmp_path / "own", tmp_path / "moved")
    write_own(tmp_path / "own", seed=5)
    assert_one_line_error(distrep(*args[:-2], "--dataset", "./own", "--out", exp),
                          "different config (dataset: ")
    assert_one_line_error(distrep("analyze", exp), "are not those a run recorded")
    # ... but reading the results needs none of the data files
    shutil.rmtree(tmp_path / "own")
    assert distrep("report", exp).returncode == 0
    assert distrep("compare", exp).returncode == 0
    assert len(trained_models(exp, "ReLU-L2-Neg")) == 2


def test_fetch_and_verify_read_your_own_where_it_is(tmp_path):
    write_own(tmp_path / "own")
    r = distrep("data", "verify", f"{tmp_path}/own")
    assert r.returncode == 0 and f"all 4 files in {tmp_path / 'own'} verified" in r.stdout
    assert distrep("data", "fetch", f"{tmp_path}/own").returncode == 0
    assert_one_line_error(distrep("data", "fetch", f"{tmp_path}/own", "--from", tmp_path),
                          "is a dataset of your own; --from is for mnist")
    for command in ("train", "sweep"):
        assert_one_line_error(distrep(command, "--model" + "s" * (command == "sweep"), "ReLU",
                                      "--dataset", "kmnist", "--out", tmp_path / "r"),
                              "unknown dataset 'kmnist'", "a directory of your own")
        assert not (tmp_path / "r").exists()                    # refused before anything is written


def test_the_engine_is_chosen_for_the_datasets_classes(tmp_path):
    """The fused step takes up to 16 classes: a model of a 17-class dataset was checked, and its
    engine recorded, as if it had MNIST's 10."""
    write_own(tmp_path / "own", shape=(17, 4), classes=17, n_train=340)
    from distrep.sweep import SweepConfig
    config = SweepConfig(models=["ReLU"], dataset=f"{tmp_path}/own", width=16, epochs=1)
    assert config.layers("ReLU")[-1].out_features == 17 and config.layers("ReLU")[0].in_features == 68
    r = distrep("sweep", "--models", "ReLU", "--engine", "fused", "--dataset", f"{tmp_path}/own",
                "--width", 16, "--runs", 1, "--epochs", 1, "--out", tmp_path / "exp")
    assert_one_line_error(r, "up to 16 classes (this model: 16 and 17)")
    assert not (tmp_path / "exp").exists()


def test_first_layer_images_keep_their_shape():
    """A unit's weights [h*w] are drawn as an h x w image, not w x h."""
    from distrep.plots import plot_first_layer
    weight = np.arange(1.0, 61.0)[None]                          # one unit of 6 x 10 pixels
    fig = plot_first_layer(weight, "one unit", (6, 10), columns=1)
    drawn = np.asarray(fig.axes[0].images[0].get_array())
    np.testing.assert_allclose(drawn, weight.reshape(6, 10) / 60.0)


def test_the_python_api_records_a_directory_as_the_command_line_does(tmp_path, monkeypatch):
    """SweepConfig/TrainConfig.validate put a directory in its recorded form, so a sweep or run
    made from Python records the same name (absolute, fingerprinted) as one made by the CLI."""
    from distrep.sweep import SweepConfig
    from distrep.train import TrainConfig, train
    monkeypatch.chdir(tmp_path)
    write_own(tmp_path / "own")
    recorded = D.get_spec(str(tmp_path / "own")).name
    assert SweepConfig(models=["ReLU"], dataset="./own").validate().dataset == recorded
    assert SweepConfig(models=["ReLU"], dataset="mnist").validate().dataset == "mnist"
    with pytest.raises(DistrepError, match="unknown dataset 'kmnist'"):    # checked, not passed on
        TrainConfig(model="ReLU", dataset="kmnist").validate()
    result = train(TrainConfig(model="ReLU", dataset="own/", epochs=1, width=8), progress=False)
    assert result.config.dataset == recorded


def test_the_memory_check_counts_the_datasets_features_and_classes(tmp_path, monkeypatch):
    """The check before anything is allocated counted every model's parameters at MNIST's 784
    inputs and 10 classes: 40 runs of 100 x 100 images (20 MB of parameters and copies each) passed
    a 0.5 GiB machine as 40 x 1.6 MB."""
    from distrep import provenance
    from distrep.sweep import SweepConfig
    from distrep.train import TrainConfig
    write_own(tmp_path / "big", shape=(100, 100), classes=12, n_train=24, n_test=12)
    monkeypatch.setattr(provenance, "machine_memory", lambda: 2**29)
    SweepConfig(models=["ReLU"], runs=40).validate()                       # MNIST's sizes fit
    with pytest.raises(DistrepError, match="40 runs of 1 models .* need 0.7[0-9]* GiB"):
        SweepConfig(models=["ReLU"], runs=40, dataset=f"{tmp_path}/big").validate()
    with pytest.raises(DistrepError, match="ReLU at width 4096 .* need 0.61[0-9]* GiB"):
        TrainConfig(model="ReLU", width=4096, dataset=f"{tmp_path}/big").validate()
    TrainConfig(model="ReLU", width=4096).validate()


def test_results_written_before_the_data_was_recorded_read_its_sizes_from_the_spec():
    """(The report's protocol said 60,000 training images whatever the dataset held.)"""
    from distrep.experiment import recorded_data
    for subset, n in ((2000, 2000), (None, 60000), (10**6, 60000)):
        data = recorded_data({"config": {"dataset": "fashion-mnist", "train_subset": subset}})
        assert data["n_train"] == n and data["image_shape"] == [28, 28] and data["classes"][0] == "T-shirt/top"
