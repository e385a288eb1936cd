"""Tables of results (tabulate)."""
from __future__ import annotations

from tabulate import tabulate


def _fmt(value, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def _with_ci(row: dict, key: str) -> str:
    if row.get(key) is None:
        return "–"
    ci = row.get(f"{key}_ci")
    return f"{row[key]:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{row[key]:.3f}"


def _guard(verdict: dict | None) -> str:
    """The accuracy guard's verdict in a few characters (benchmark/guard.py)."""
    if not verdict:
        return "–"
    if verdict["status"] == "fail":
        return f"FAIL: {verdict['shortfall']:.3f} below {verdict['threshold']:.3f}"
    if verdict["status"] == "pass":
        return f"ok (≥ {verdict['threshold']:.3f})"
    return {"no baseline": "no baseline", "not applicable": "–"}.get(verdict["status"], verdict["status"])


def _status(row: dict) -> str:
    text = {"ok": "ok", "no_ground_truth": "no ground truth (see result)",
            "undefined": "correlation undefined (constant scores)"}.get(
        row["status"], f"FAILED: {str(row.get('error'))[:60]}")
    if row.get("pearson_undefined"):
        text += f"; {row['pearson_undefined']} quer{'y' if row['pearson_undefined'] == 1 else 'ies'} undefined"
    if row.get("global_state_changed"):
        text += f"; changed (and restored) {', '.join(row['global_state_changed'])}"
    return text


def summary_table(rows: list[dict]) -> str:
    """One line per row: correlations with bootstrap intervals, output distance, cost, and the
    ground truth's converged fraction and ceiling (the Pearson between its two solves)."""
    table = []
    for r in rows:
        gt = r.get("ground_truth_certificate") or {}
        table.append([
            r["task"], r["estimator"], r.get("ground_truth", "pbrf"), _with_ci(r, "pearson"), _with_ci(r, "spearman"),
            _fmt(r.get("pearson_pooled")), _fmt(r.get("output_distance_relative")),
            _fmt(r.get("seconds"), ".2f"), _fmt(r.get("evaluations"), ",d"),
            _fmt(gt.get("converged_fraction"), ".0%"), _fmt((gt.get("second_solve") or {}).get("ceiling")),
            _status(r),
            _guard(r.get("guard")),
        ])
    headers = ["task", "estimator", "against", "pearson [95% CI]", "spearman [95% CI]", "pooled P", "out dist (rel)",
               "seconds", "evaluations", "GT conv.", "GT ceiling", "status", "guard"]
    return tabulate(table, headers=headers, tablefmt="github")
