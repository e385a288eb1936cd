"""A content-addressed on-disk cache for trained models and ground truth.

An entry is `<root>/<kind>/<name>-<key>.pt`, key = sha256 of the canonical JSON of everything
the value depends on (its fingerprint, stored inside the entry and checked on load).
Writes are atomic (temporary file + os.replace); an exclusive lock on `<entry>.lock` makes
parallel workers compute each entry once. A damaged entry is recomputed with a warning.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch

CACHE_DIR_ENV = "IFBENCH_CACHE_DIR"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV, Path.home() / ".cache" / "influence-benchmark" / "cache"))


def content_key(fingerprint: dict) -> str:
    """16 hex digits of sha256 over the canonical JSON of `fingerprint`."""
    text = json.dumps(fingerprint, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class CacheWarning(UserWarning):
    pass


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename over `path`."""
    _atomic_write(Path(path), lambda handle: torch.save(obj, handle))


def atomic_write_text(text: str, path: Path) -> Path:
    """Write `text` (UTF-8) to a temporary file in the same folder, then rename over `path`."""
    _atomic_write(Path(path), lambda handle: handle.write(text.encode()))
    return Path(path)


def _umask() -> int:
    """The process's file-mode creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    """The file gets the mode an ordinary open() would give it (0o666 less the umask), not
    mkstemp's 0o600: a cache directory shared by a group stays readable by the group."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Cache:
    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    def path(self, kind: str, name: str, fingerprint: dict) -> Path:
        return self.root / kind / f"{name}-{content_key(fingerprint)}.pt"

    def _load(self, path: Path, fingerprint: dict) -> Any | None:
        """The stored value, or None (with a warning) if the file is damaged or foreign."""
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(entry, dict) or entry.get("fingerprint") != json.loads(
                    json.dumps(fingerprint, default=str)):
                raise ValueError("its stored fingerprint does not match")
            return entry["value"]
        except Exception as exc:  # any damage: never trust the entry
            warnings.warn(f"cache entry {path} is damaged or stale ({type(exc).__name__}: {exc}); "
                          "recomputing it", CacheWarning, stacklevel=3)
            return None

    def get_or_compute(self, kind: str, name: str, fingerprint: dict, compute: Callable[[], Any]) -> tuple[Any, bool]:
        """(value, was_cached). Computes and stores the value unless a valid entry exists."""
        path = self.path(kind, name, fingerprint)
        with _locked(path):
            if path.exists():
                value = self._load(path, fingerprint)
                if value is not None:
                    return value, True
            value = compute()
            atomic_save({"fingerprint": json.loads(json.dumps(fingerprint, default=str)), "value": value}, path)
            return value, False


class TaskResultFiles:
    """JSON results of one kind, one file per (scale, task): <results>/<scale>/<kind>/<task>.json."""

    def __init__(self, kind: str, required: tuple[str, ...]):
        self.kind, self.required = kind, required

    def path(self, results_dir: Path, scale: str, task: str) -> Path:
        return Path(results_dir) / scale / self.kind / f"{task}.json"

    def write(self, result: dict, results_dir: Path) -> Path:
        text = json.dumps(result, indent=1) + "\n"
        return atomic_write_text(text, self.path(results_dir, result["scale"], result["task"]))

    def load(self, results_dir: Path) -> list[dict]:
        """Every readable result (a file that is not valid JSON or lacks a required key is skipped
        with a warning naming it)."""
        out = []
        for path in sorted(Path(results_dir).glob(f"*/{self.kind}/*.json")):
            try:
                result = json.loads(path.read_text())
                if not isinstance(result, dict) or not set(self.required) <= set(result):
                    raise ValueError(f"not a {self.kind} result (needs {', '.join(self.required)})")
            except (OSError, ValueError) as exc:
                warnings.warn(f"skipping {path}: {exc}")
                continue
            out.append(result)
        return out
