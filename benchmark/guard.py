"""The accuracy guard: a committed baseline of the main number of every row, and the check that a
row does not fall below it.

The main number is the mean per-query Pearson correlation against the ground truth. A row fails
the guard when

    pearson < expected − tolerance,   tolerance = max(half-width of the expected row's 95 %
                                                      bootstrap interval, TOLERANCE_FLOOR)

The interval is the one the metrics compute for every row (resampling removed examples), so the
tolerance is as wide as the uncertainty the benchmark itself reports for that number: a change
inside it is not a measurable change at that scale. The floor keeps rows whose interval is
degenerate (Pearson ≈ 1 on every resample) from failing on a change in the third decimal.

Baseline file (`leaderboard/baseline.json`, JSON, keys sorted for readable diffs):

    {"rule": "...", "floor": 0.01,
     "entries": {scale: {ground truth: {task: {estimator spec: {"pearson": .., "pearson_ci": [..],
                                                                "tolerance": .., provenance...}}}}}}

The estimator key is the canonical spec of the row (`lissa(depth=200)`, `path/to/file.py:Class`),
as it appears in the result JSON. Rows without an entry pass with a note.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

TOLERANCE_FLOOR = 0.01
MAIN = "pearson"
RULE = ("a row fails when its mean per-query Pearson falls below expected − tolerance, with tolerance = "
        f"max(half-width of the expected row's 95 % bootstrap interval, {TOLERANCE_FLOOR})")


def tolerance(result: dict) -> float:
    """Half the width of the row's 95 % bootstrap interval of the main number, at least the floor."""
    ci = result.get(f"{MAIN}_ci")
    half = 0.5 * (ci[1] - ci[0]) if ci else 0.0
    return max(float(half), TOLERANCE_FLOOR)


def empty() -> dict:
    return {"rule": RULE, "floor": TOLERANCE_FLOOR, "entries": {}}


def load(path: Path | str | None) -> dict:
    """The baseline at `path`; an empty one when the file does not exist."""
    if path is None or not Path(path).exists():
        return empty()
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"baseline {path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("entries", {}), dict):
        raise ValueError(f"baseline {path} has no 'entries' mapping")
    data.setdefault("entries", {})
    return data


def key(result: dict) -> tuple[str, str, str, str]:
    return result["scale"], result["ground_truth"], result["task"], result["estimator"]


def lookup(baseline: dict, result: dict) -> dict | None:
    node = baseline.get("entries", {})
    for part in key(result):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def verdict(result: dict, baseline: dict, source: str = "baseline") -> dict:
    """{"status": "pass" | "fail" | "no baseline" | "not applicable", "message": ..., numbers}."""
    entry = lookup(baseline, result)
    value = result.get(MAIN)
    if result.get("status") != "ok" or value is None:
        return {"status": "not applicable", "message": f"the row has no main number (status {result.get('status')})"}
    if entry is None or entry.get(MAIN) is None:
        scale, gt, task, est = key(result)
        return {"status": "no baseline",
                "message": f"no baseline entry for {task} / {est} ({scale} scale, against {gt}) in {source}"}
    expected, tol = float(entry[MAIN]), float(entry.get("tolerance", TOLERANCE_FLOOR))
    threshold = expected - tol
    out = {"expected": expected, "tolerance": tol, "threshold": threshold, "drop": expected - value}
    if value < threshold:
        out.update(status="fail", shortfall=threshold - value, message=(
            f"mean per-query Pearson {value:.4f} is {expected - value:.4f} below the baseline {expected:.4f}, "
            f"{threshold - value:.4f} beyond its tolerance {tol:.4f} (threshold {threshold:.4f}; {source})"))
    else:
        out.update(status="pass", message=f"{value:.4f} ≥ {threshold:.4f} = baseline {expected:.4f} − {tol:.4f}")
    return out


def entry_from(result: dict) -> dict:
    prov = result.get("provenance") or {}
    return {
        MAIN: result[MAIN], f"{MAIN}_ci": result.get(f"{MAIN}_ci"), "tolerance": tolerance(result),
        "spearman": result.get("spearman"), "commit": prov.get("commit"), "torch": prov.get("torch"),
        "device": prov.get("device"), "date": prov.get("date"),
        "ground_truth_key": prov.get("ground_truth_key"),
    }


@contextmanager
def _locked(path: Path):
    """An exclusive lock for `path`, held in a file in the temporary directory (not beside the
    committed baseline)."""
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"ifbench-baseline-{digest}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def update(path: Path | str, results: list[dict]) -> list[tuple[str, str, str, str]]:
    """Write the entries of the ok rows among `results` into the baseline at `path` (other entries
    are kept); returns the keys written. Locked and atomic, so concurrent updates do not mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    with _locked(path):
        baseline = load(path)
        baseline["rule"], baseline["floor"] = RULE, TOLERANCE_FLOOR
        for result in results:
            if result.get("status") != "ok" or result.get(MAIN) is None:
                continue
            scale, gt, task, est = key(result)
            baseline["entries"].setdefault(scale, {}).setdefault(gt, {}).setdefault(task, {})[est] = entry_from(result)
            written.append(key(result))
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(baseline, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    return written


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmark.guard --from leaderboard/results [--baseline leaderboard/baseline.json]`:
    write the baseline entries of every ok row among the committed result files (the rows the
    leaderboard shows), without rerunning them."""
    import argparse

    from .leaderboard import REPO, load_results

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--from", dest="results", type=Path, default=REPO / "leaderboard" / "results")
    parser.add_argument("--baseline", type=Path, default=REPO / "leaderboard" / "baseline.json")
    parser.add_argument("--scale", action="append", help="only rows of this scale (repeatable; default: all)")
    args = parser.parse_args(argv)
    rows = [r for r in load_results(args.results) if not args.scale or r.get("scale") in args.scale]
    written = update(args.baseline, rows)
    print(f"{len(written)} baseline entr{'y' if len(written) == 1 else 'ies'} written to {args.baseline} "
          f"from {len(rows)} result file(s) in {args.results}")
    return 0


__all__ = ["MAIN", "RULE", "TOLERANCE_FLOOR", "tolerance", "load", "lookup", "verdict", "update", "entry_from"]


if __name__ == "__main__":
    raise SystemExit(main())
