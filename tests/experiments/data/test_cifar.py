"""CIFAR from tiny fake archives in the real format: both layouts, splits, label noise, subsets,
and every way the data can be missing or malformed (a DataError naming the files: exit 2)."""
import pickle
from dataclasses import replace

import numpy as np
import pytest

from tests.support.fake_cifar import members, write_fake_cifar
from gradalign.cli import main
from gradalign.errors import ConfigError
from gradalign.experiments.data import cifar
from gradalign.experiments.data.cifar import DataError, load, make_cifar
from gradalign.experiments.config import DataConfig
from gradalign.experiments.data import data_sizes


@pytest.fixture(autouse=True)
def fresh_cache():
    cifar.clear_cache()
    yield
    cifar.clear_cache()


@pytest.mark.parametrize("dataset, classes", [("cifar10", 10), ("cifar100", 100)])
def test_archive_and_folder_read_the_same(tmp_path, dataset, classes):
    write_fake_cifar(tmp_path / "a", dataset, n_train=203, n_test=51)
    folder = write_fake_cifar(tmp_path / "b", dataset, n_train=203, n_test=51, form="folder")
    from_tar, from_folder, from_inside = load(dataset, tmp_path / "a"), load(dataset, tmp_path / "b"), load(dataset, folder)
    for a, b, c in zip(from_tar, from_folder, from_inside):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    x, y, xt, yt = from_tar
    assert x.shape == (203, 3, 32, 32) and x.dtype == np.uint8 and xt.shape == (51, 3, 32, 32)
    assert y.dtype == np.int64 and set(y) == set(range(classes if 203 >= classes else 203)) and yt.max() < classes
    raw = pickle.loads(members(dataset, 203, 51)["test" if dataset == "cifar100" else "test_batch"])
    assert np.array_equal(xt.reshape(51, -1), raw["data"])          # row-major (3, 32, 32) as stored
    assert not x.flags.writeable                                     # the cached arrays are never modified


def test_splits_ids_noise_and_subsets(tmp_path):
    write_fake_cifar(tmp_path, "cifar100", n_train=400, n_test=200)
    data = DataConfig(dataset="cifar100", val_fraction=0.1, label_noise=0.25, noise_seed=3)
    s = make_cifar(data, tmp_path)
    assert (s.dataset, s.num_classes) == ("cifar100", 100)
    assert (len(s.train_full), len(s.train), len(s.val), len(s.test)) == (400, 360, 40, 200)
    assert data_sizes(data)[0] == 50_000 and data_sizes(replace(data, train_size=300)) == (300, 270, 30)
    assert s.train_full.ids.tolist() == list(range(400)) and s.test.ids.tolist() == list(range(400, 600))
    _, clean, _, _ = load("cifar100", tmp_path)
    flipped = s.flipped_ids.numpy()
    assert len(flipped) == 100 and (s.train_full.y.numpy()[flipped] != clean[flipped]).all()
    assert (np.bincount(clean[np.isin(np.arange(400), s.val.ids.numpy())], minlength=100) <= 1).all()  # stratified
    sub = make_cifar(replace(data, train_size=200, test_size=100, label_noise=0.0), tmp_path)
    assert (len(sub.train_full), len(sub.val), len(sub.test)) == (200, 20, 100)
    assert np.array_equal(sub.train_full.x.numpy(), load("cifar100", tmp_path)[0][sub.train_full.ids.numpy()])
    assert np.bincount(sub.train_full.y.numpy(), minlength=100).tolist() == [2] * 100       # stratified subset
    assert make_cifar(replace(data, train_size=200, test_size=100, label_noise=0.0), tmp_path).train.ids.tolist() \
        == sub.train.ids.tolist()                                                             # deterministic
    with pytest.raises(DataError, match="train_size = 500 but the files hold 400"):
        make_cifar(replace(data, train_size=500), tmp_path)


@pytest.mark.parametrize("setup, needle", [
    ("missing_dir", "does not exist"),
    ("empty_dir", "has neither"),
    ("missing_member", "lacks data_batch_3"),
    ("truncated_tar", "not a readable tar.gz archive"),
    ("wrong_shape", r"expected uint8 \(N, 3072\)"),
    ("bad_labels", "labels outside 0..9"),
    ("not_a_pickle", "is not a CIFAR python batch"),
])
def test_missing_or_malformed_data(tmp_path, setup, needle):
    root = tmp_path / "data"
    if setup == "empty_dir":
        root.mkdir()
    elif setup == "missing_member":
        folder = write_fake_cifar(root, form="folder")
        (folder / "data_batch_3").unlink()
    elif setup == "truncated_tar":
        path = write_fake_cifar(root)
        path.write_bytes(path.read_bytes()[:300])
    elif setup == "wrong_shape":
        write_fake_cifar(root, replace={"test_batch": pickle.dumps({"data": np.zeros((4, 100), np.uint8),
                                                                     "labels": [0] * 4}, protocol=2)})
    elif setup == "bad_labels":
        write_fake_cifar(root, replace={"test_batch": pickle.dumps({"data": np.zeros((2, 3072), np.uint8),
                                                                     "labels": [0, 10]}, protocol=2)})
    elif setup == "not_a_pickle":
        write_fake_cifar(root, replace={"data_batch_1": b"hello"})
    with pytest.raises(DataError, match=needle) as info:
        load("cifar10", root)
    assert isinstance(info.value, ConfigError)
    if setup in ("missing_dir", "empty_dir", "missing_member"):
        assert "cifar-10-python.tar.gz" in str(info.value) and "https://www.cs.toronto.edu/~kriz/cifar.html" in str(info.value)



def test_a_tampered_pickle_cannot_run_code(tmp_path):
    import os
    evil = pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1], "x": os.getcwd}, protocol=2)
    write_fake_cifar(tmp_path, replace={"data_batch_2": evil})
    with pytest.raises(DataError, match="refusing to load"):
        load("cifar10", tmp_path)


def test_cli_exits_2_and_writes_nothing_without_data(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["reproduce", "gvr-cifar100", "--quick", "--data-dir", str(tmp_path / "nowhere"), "--out", str(out),
                 "--no-progress", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert err.count("\n") == 1 and "cifar-100-python.tar.gz" in err and "kriz/cifar.html" in err
