"""The leaderboard page from the result JSONs: `python -m benchmark.leaderboard`.

Reads <results-dir>/<scale>/*.json (one per row, written by the benchmark) and writes

    <out>/LEADERBOARD.md   one section per scale (never mixing scales) and ground truth:
                           tasks × estimators, ground-truth certificates, provenance
    <out>/results.csv      every row of every scale, flat
    <out>/figures/*.png    per task a scatter of predicted against true scores, and per scale a
                           bar chart of the main number and the accuracy against cost per task
                           (skipped, with a note, without matplotlib)
    and, per scale, the measured ground-truth cost of the tasks without rows there
                           (<results-dir>/<scale>/cost/*.json, benchmark/cost.py)
    <out>/DECOMPOSITION.md the five-gap decomposition and Table 2, from
                           <results-dir>/<scale>/decomposition/*.json (benchmark/decomposition.py),
                           when there are any
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import re
import sys
import warnings
from collections import defaultdict
from pathlib import Path

from . import cost, decomposition
from .second_solve import error_bar_text, tie_margin

REPO = Path(__file__).resolve().parent.parent
SCALE_ORDER = ("smoke", "cpu", "paper")

CSV_COLUMNS = [
    "scale", "ground_truth", "task", "estimator", "status", "pearson", "pearson_ci_low", "pearson_ci_high",
    "spearman", "spearman_ci_low", "spearman_ci_high", "pearson_pooled", "spearman_pooled",
    "pearson_undefined", "output_distance_relative", "seconds", "seconds_fit", "seconds_scores", "peak_memory_mb",
    "evaluations", "contended", "loadavg_max", "n_train", "n_params", "n_removed", "n_query",
    "gt_converged_fraction", "gt_median_relative_gradient_norm", "gt_max_relative_gradient_norm",
    "gt_second_solve_median_relative_error", "gt_second_solve_max_relative_error", "gt_ceiling",
    "gt_ceiling_ci_low", "gt_ceiling_ci_high", "tied_with_best", "gt_key", "commit", "torch", "device",
    "device_name", "threads", "seed", "date", "estimator_params", "error", "file",
]


# ---- loading -------------------------------------------------------------------------------------

def load_results(results_dir: Path) -> list[dict]:
    """Every readable result under results_dir/<scale>/*.json (unreadable ones are skipped with a warning)."""
    rows = []
    for path in sorted(Path(results_dir).glob("*/*.json")):
        try:
            row = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            warnings.warn(f"skipping {path}: {exc}")
            continue
        if not isinstance(row, dict) or not {"task", "estimator", "scale", "status"} <= set(row):
            warnings.warn(f"skipping {path}: not a benchmark result")
            continue
        if row["scale"] != path.parent.name:
            warnings.warn(f"{path} says scale {row['scale']!r} but lies under {path.parent.name}/; using "
                          f"{row['scale']!r}")
        row["_file"] = str(path)
        rows.append(row)
    return rows


def _task_order(tasks) -> list[str]:
    try:
        from tasks import TASKS
        known = list(TASKS)
    except Exception:  # the page can be built without the task registry
        known = []
    return sorted(set(tasks), key=lambda t: (known.index(t) if t in known else len(known), t))


def _estimator_order(specs) -> list[str]:
    try:
        from estimators import REGISTRY
        known = list(REGISTRY)
    except Exception:
        known = []
    return sorted(set(specs), key=lambda e: (known.index(e) if e in known else len(known), e))


def _group(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    groups = defaultdict(list)
    for row in rows:
        groups[(row["scale"], row.get("ground_truth", "pbrf"))].append(row)
    order = lambda k: (SCALE_ORDER.index(k[0]) if k[0] in SCALE_ORDER else len(SCALE_ORDER), k[0],
                       k[1] != "pbrf", k[1])
    return {k: groups[k] for k in sorted(groups, key=order)}


# ---- formatting ------------------------------------------------------------------------------------

def _num(value, spec=".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def _ci(row: dict, key: str) -> str:
    ci = row.get(f"{key}_ci")
    return f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def _error_bar(rows: list[dict]) -> dict | None:
    """The ground truth's error bar (its second solve, runner.second_solve_summary) from the
    first of `rows` that carries one."""
    return next(((r.get("ground_truth_certificate") or {}).get("second_solve") for r in rows
                 if (r.get("ground_truth_certificate") or {}).get("second_solve")), None)


def _best(rows: list[dict]) -> tuple[set[int], set[int]]:
    """(ids of the ok rows with the highest main number as shown (3 decimals; ties: all), ids of
    the other ok rows tied with them: best − row ≤ 1 − ceiling_lo, the lower end of the 95 %
    interval of the task's ceiling (second_solve.tie_margin; 0 without one)."""
    ok = [r for r in rows if r["status"] == "ok" and r.get("pearson") is not None]
    if not ok:
        return set(), set()
    top = max(round(r["pearson"], 3) for r in ok)
    margin = tie_margin(_error_bar(rows))
    best = {id(r) for r in ok if round(r["pearson"], 3) >= top}
    return best, {id(r) for r in ok if id(r) not in best and top - round(r["pearson"], 3) <= margin + 1e-12}


def _main(row: dict, best: tuple[set[int], set[int]]) -> str:
    """The main number as shown: bold if best, '≈' and bold if tied with the best."""
    text = f"{row['pearson']:.3f}"
    if id(row) in best[0]:
        return f"**{text}**"
    return f"≈ **{text}**" if id(row) in best[1] else text


#: how a row without a main number is shown
_STATUS = {"failed": "failed", "no_ground_truth": "no ground truth", "undefined": "undefined"}


def _seconds(row: dict) -> str:
    """Wall seconds, marked * when the row ran on a contended machine (benchmark.measure.machine_load)."""
    text = _num(row.get("seconds"), ".2f")
    return text + "*" if (row.get("load") or {}).get("contended") and text != "–" else text


def _row_notes(row: dict) -> str:
    notes = ["ok"]
    if row.get("pearson_undefined"):
        notes.append(f"{row['pearson_undefined']} of {row.get('n_query_scored')} queries undefined (constant)")
    if row.get("global_state_changed"):
        notes.append(f"changed torch state ({', '.join(row['global_state_changed'])}; restored)")
    return "; ".join(notes)


def _certificate_rows(rows: list[dict], tasks: list[str]) -> tuple[list[list], list[str]]:
    table, warnings_ = [], []
    for task in tasks:
        certs = [r.get("ground_truth_certificate") for r in rows if r["task"] == task and r.get("ground_truth_certificate")]
        if not certs:
            table.append([task, "–", "–", "–", "–", "–", "–", "–", "(no row got as far as the ground truth)"])
            continue
        keys = sorted({str(c.get("key")) for c in certs})
        if len(keys) > 1:
            warnings_.append(f"rows of {task} were scored against different ground truths ({'; '.join(keys)}): "
                             "rerun them with one cache")
        c = certs[0]
        any_row = next(r for r in rows if r["task"] == task and r.get("ground_truth_certificate"))
        size = f"{any_row.get('n_removed', '?')} × {any_row.get('n_query', '?')}"
        counts = ", ".join(f"{k} {v}" for k, v in (c.get("status_counts") or {}).items())
        second = c.get("second_solve")
        check = ("–", "–") if not second else (
            error_bar_text(second),
            f"{second['n_trusted']}/{second['n']}: " + ", ".join(f"{k} {v}" for k, v in second["status_counts"].items()))
        if "converged_fraction" in c:
            table.append([task, size, _num(c.get("converged_fraction"), ".0%"),
                          _num(c.get("median_relative_gradient_norm"), ".1e"),
                          _num(c.get("max_relative_gradient_norm"), ".1e"), counts or "–", *check, f"`{keys[0]}`"])
        else:  # an exactly solved response (the linearized PBRF): its residual instead
            table.append([task, size, "exact", "–", _num(c.get("max_relative_residual"), ".1e") + " (residual)",
                          c.get("method", "–"), *check, f"`{keys[0]}`"])
    return table, warnings_


def _provenance(rows: list[dict]) -> str:
    prov = [r.get("provenance") or {} for r in rows]
    pick = lambda key: sorted({str(p.get(key)) for p in prov if p.get(key) is not None})
    dates = pick("date")
    devices = sorted({f"{p.get('device')} ({p.get('device_name')})" if p.get("device_name") else str(p.get("device"))
                      for p in prov if p.get("device")})
    parts = [f"commit {', '.join(pick('commit')) or '–'}", f"torch {', '.join(pick('torch')) or '–'}",
             f"device {', '.join(devices) or '–'}", f"threads {', '.join(pick('threads')) or '–'}",
             f"seed {', '.join(pick('seed')) or '–'}",
             f"date {dates[0]} … {dates[-1]}" if len(dates) > 1 else f"date {dates[0] if dates else '–'}"]
    mixed = [k for k in ("commit", "torch", "device") if len(pick(k)) > 1]
    line = "Provenance: " + "; ".join(parts) + "."
    if mixed:
        line += f" ⚠ rows come from more than one {' / '.join(mixed)}: compare them with care."
    return line


# ---- figures ---------------------------------------------------------------------------------------

def _matplotlib():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except Exception as exc:  # ImportError, or a broken backend
        return exc


def scatter_figure(plt, task: str, rows: list[dict], path: Path) -> bool:
    """Predicted against true scores, one panel per estimator, colour = query."""
    rows = [r for r in rows if r["status"] == "ok" and r.get("scores") and r.get("truth_scores")]
    if not rows:
        return False
    n = len(rows)
    cols = min(n, 4)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, row in zip(axes.ravel(), rows):
        pred, truth = row["scores"], row["truth_scores"]
        for q, (p_q, t_q) in enumerate(zip(pred, truth)):
            ax.scatter(t_q, p_q, s=10, alpha=0.8, color=plt.cm.tab10(q % 10))
        flat_t = [v for r_ in truth for v in r_]
        flat_p = [v for r_ in pred for v in r_]
        lo, hi = min(flat_t), max(flat_t)
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
        p_lo, p_hi = min(flat_p), max(flat_p)
        pad = 0.08 * ((p_hi - p_lo) or abs(p_hi) or 1.0)
        ax.set_ylim(p_lo - pad, p_hi + pad)  # the estimator's own range: a mis-scaled one still shows its ranking
        ax.set_title(f"{row['estimator'][:40]}\nPearson {row['pearson']:.3f}", fontsize=9)
        ax.set_xlabel(f"{row.get('ground_truth', 'pbrf')} Δ loss", fontsize=8)
        ax.set_ylabel("predicted", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.ticklabel_format(style="sci", scilimits=(-2, 2))
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.suptitle(f"{task} ({rows[0]['scale']} scale): predicted vs true test-loss change, colour = query",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def cost_figure(plt, rows: list[dict], tasks: list[str], estimators: list[str], title: str, path: Path) -> bool:
    """Accuracy against cost (Grosse et al. 2023, Fig. 7 style): per task a panel of the mean
    per-query Pearson (with its 95 % interval) against wall seconds of fit + scores, log scale,
    one point per estimator; contended rows (their seconds marked * on the page) hollow."""
    by = {(r["task"], r["estimator"]): r for r in rows
          if r["status"] == "ok" and r.get("pearson") is not None and (r.get("seconds") or 0) > 0}
    tasks = [t for t in tasks if any((t, e) in by for e in estimators)]
    if not tasks:
        return False
    cols = min(len(tasks), 3)
    nrows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.3 * nrows + 0.6), squeeze=False)
    for ax, task in zip(axes.ravel(), tasks):
        for i, est in enumerate(estimators):
            r = by.get((task, est))
            if r is None:
                continue
            ci = r.get("pearson_ci") or [r["pearson"], r["pearson"]]
            colour = plt.cm.tab20(i % 20)
            contended = bool((r.get("load") or {}).get("contended"))
            ax.errorbar([r["seconds"]], [r["pearson"]], yerr=[[max(r["pearson"] - ci[0], 0)], [max(ci[1] - r["pearson"], 0)]],
                        fmt="o", color=colour, mfc="none" if contended else colour, capsize=2, ms=5,
                        label=est if task == tasks[0] else None)
        ax.set_xscale("log")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("seconds (fit + scores)", fontsize=8)
        ax.set_ylabel("mean per-query Pearson", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(tasks):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.legend(loc="lower center", ncol=min(len(estimators), 6), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.02 * math.ceil(len(estimators) / 6), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def bar_figure(plt, rows: list[dict], tasks: list[str], estimators: list[str], title: str, path: Path) -> bool:
    """Mean per-query Pearson per estimator, grouped by task, with 95 % bootstrap intervals."""
    by = {(r["task"], r["estimator"]): r for r in rows if r["status"] == "ok" and r.get("pearson") is not None}
    if not by:
        return False
    width = 0.8 / max(len(estimators), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(tasks) * max(1, len(estimators)) + 2),
                                    3.6 + 0.25 * math.ceil(len(estimators) / 4)))
    for i, est in enumerate(estimators):
        xs, ys, errs = [], [], [[], []]
        for j, task in enumerate(tasks):
            r = by.get((task, est))
            if r is None:
                continue
            xs.append(j + (i - (len(estimators) - 1) / 2) * width)
            ys.append(r["pearson"])
            ci = r.get("pearson_ci") or [r["pearson"], r["pearson"]]
            errs[0].append(max(r["pearson"] - ci[0], 0.0))
            errs[1].append(max(ci[1] - r["pearson"], 0.0))
        if xs:
            ax.bar(xs, ys, width=width, yerr=errs, capsize=2, label=est, color=plt.cm.tab10(i % 10))
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, fontsize=8)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_ylim(min(-0.1, min(r["pearson"] for r in by.values()) - 0.1), 1.05)
    ax.set_ylabel("mean per-query Pearson", fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=min(len(estimators), 4), loc="upper center", bbox_to_anchor=(0.5, -0.12),
              frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---- the page ----------------------------------------------------------------------------------------

HOW = """\
How the numbers are computed (DESIGN.md §1–2):

- Each task trains a base model θˢ, removes R training examples one at a time (a downweighting
  by ε = 1/N) and records, for Q held-out queries, the true change of the query loss under the
  ground-truth response function: Δ[q, m] = ℓ_q(θ₋ₘ) − ℓ_q(θˢ), by default with θ₋ₘ the
  minimiser of the proximal Bregman response function (PBRF). An estimator predicts S[q, m].
- **Main number: the mean over queries of the Pearson correlation across removed examples**
  between S[q, ·] and Δ[q, ·], with a 95 % percentile bootstrap interval over removed examples
  (1000 resamples). Spearman is the same with ranks. **Bold**: the best main number of a task
  (ties: all); **≈ bold**: a row tied with it, i.e. best − row ≤ 1 − ceiling_lo (below). A
  query whose scores or truth are constant has no correlation: it is left out of the mean and
  counted; a row with no defined query is "undefined" and never bold.
- seconds: wall time of `fit` + scoring on the device listed under provenance (not comparable
  across machines), marked * where the row ran contended (the 1-minute load average exceeded the
  CPUs by more than 0.5 at its start or end; each result records its load and threads);
  evaluations, the primary cost column: a hardware-free count of model evaluations (forward passes,
  per-example gradients, curvature–vector products, per example and per vector).
- Scales differ in data, model size, R and Q: every scale has its own tables, and numbers from
  different scales are not comparable.
- Ground-truth certificate, per task: the fraction of removed examples whose PBRF solve met
  ‖∇J‖ ≤ tol · ε‖∇ℓₘ(θˢ)‖, and the median and largest relative gradient norm ‖∇J‖ / (ε‖∇ℓₘ‖)
  at the returned points. A low converged fraction means the ground truth itself is uncertain.
- Ground-truth error bar, per task (DESIGN.md §6): the PBRF of K seeded removed examples (K = 4 at
  `smoke`, 8 otherwise) is solved a second, independent way (full-batch L-BFGS from the
  linearized solution, one example at a time; `benchmark/second_solve.py`). Over the examples
  both solves trust: the median and max over examples of ‖s₁ − s₂‖ / ‖s₁‖ (scores over the
  queries), and the ceiling, the mean per-query Pearson between the two solves across those
  examples with its 95 % bootstrap interval [ceiling_lo, ceiling_hi]: what a perfect estimator
  could reach given the noise in the ground truth. A row is **tied** with the best row of its
  task (marked ≈) when best − row ≤ 1 − ceiling_lo: no smaller difference can be told apart
  from that noise. Without a ceiling (fewer than 3 trusted examples) only equal numbers tie.
- `pbrf-epochs` (the batch-norm nets VGG13 and ResNet-20, whose θˢ is a saddle of the PBRF at
  these scales, so that the minimiser does not exist): the paper's own protocol, the base
  recipe's optimizer on the PBRF objective from θˢ for half the base epochs, every removed
  example at once (`benchmark.responses.pbrf_epochs`; the SGD schedule scaled down to half the
  stability limit of the eval-mode objective where the recipe's exceeds it). It is a different
  response function from the minimiser, on tables of its own. Its certificate: a row is
  trusted where the run lowered its objective (J_m < 0 = J_m(θˢ)); its gradient norm is
  reported, not required to be small. Its error bar: the same K examples run again with
  another batch order, so the ceiling measures the protocol's minibatch noise.
"""


def cost_section(rows: list[dict], costs: list[dict]) -> list[str]:
    """Per scale, the tasks with a measured ground-truth cost (benchmark.cost) but no rows."""
    have = {(r["task"], r["scale"]) for r in rows}
    lines = []
    for scale in SCALE_ORDER:
        missing = [c for c in costs if c["scale"] == scale and (c["task"], scale) not in have]
        if not missing:
            continue
        order = {t: i for i, t in enumerate(_task_order(c["task"] for c in missing))}
        missing.sort(key=lambda c: order[c["task"]])
        commits = sorted({c["provenance"]["commit"] for c in missing})
        threads = sorted({str(c["provenance"]["threads"]) for c in missing})
        dates = sorted(c["provenance"]["date"][:10] for c in missing)
        ground_truth = sum(cost.ground_truth_seconds(c)[0] for c in missing)
        lissa = sum(c.get("lissa_projected_seconds") or 0 for c in missing)
        lines += [f"## Tasks without {scale}-scale rows: what their ground truth costs", "",
                  f"These tasks exist at `{scale}` scale but have no rows in the tables above. Measured by "
                  f"`python -m benchmark.cost --scale {scale} --task NAME` (commit {', '.join(commits)}; device "
                  f"{missing[0]['provenance']['device']}, {'/'.join(threads)} thread(s), {dates[0]} … {dates[-1]}): "
                  "the base training, one call of each model operator over the N training examples, the damped "
                  "Gauss–Newton setup (dense G and its Cholesky factor, or nothing on the CG path), one PBRF solve "
                  "(stopped after `--max-seconds`, then a lower bound), the projected ground truth setup + R × one "
                  "solve, and the default LiSSA's projected cost (depth × batch / N × R Gauss–Newton products "
                  f"over N). Together: ground truth ≥ {ground_truth / 3600:.1f} h and LiSSA ≈ {lissa / 3600:.1f} h, "
                  "on top of the rows above, where the whole suite is meant to take about an hour (`cpu`). "
                  "For meaningful numbers they need the `paper` scale on a GPU: "
                  "`pytest benchmark/ --scale paper --device cuda --task NAME` (sizes, and any further reason such "
                  "as ae-mnist's plateau, in each task's module docstring).", "", cost.cost_table(missing), ""]
    return lines


def build_page(rows: list[dict], out: Path, results_dir: Path, figures: bool = True) -> str:
    out = Path(out)
    plt = _matplotlib() if figures else None
    lines = ["# Leaderboard", "",
             f"Generated by `python -m benchmark.leaderboard` from {len(rows)} result file(s) in "
             f"`{_display(results_dir)}` on {datetime.date.today().isoformat()}; do not edit by hand.", "", HOW]
    if figures and not hasattr(plt, "subplots"):
        lines += [f"*Figures skipped: matplotlib could not be imported ({plt}); `pip install matplotlib`.*", ""]
        plt = None
    if not rows:
        lines += ["No results yet: run `pytest benchmark/ --scale smoke` first.", ""]
    for (scale, gt), group in _group(rows).items():
        tasks = _task_order(r["task"] for r in group)
        ests = _estimator_order(r["estimator"] for r in group)
        against = "the PBRF" if gt == "pbrf" else f"`{gt}`"
        lines += [f"## {scale} scale, against {against}", "", _provenance(group), ""]
        by = {(r["task"], r["estimator"]): r for r in group}
        # at a glance: tasks × estimators
        glance = []
        for task in tasks:
            best = _best([by[(task, e)] for e in ests if (task, e) in by])
            cells = [task]
            for est in ests:
                r = by.get((task, est))
                if r is None:
                    cells.append("")
                elif r["status"] != "ok":
                    cells.append(_STATUS.get(r["status"], "failed"))
                else:
                    cells.append(_main(r, best) + _ci(r, "pearson"))
            glance.append(cells)
        lines += ["Mean per-query Pearson [95 % bootstrap interval]:", "",
                  _table(["task"] + [f"`{e}`" for e in ests], glance), ""]
        # details
        detail = []
        for task in tasks:
            best = _best([by[(task, e)] for e in ests if (task, e) in by])
            for est in ests:
                r = by.get((task, est))
                if r is None:
                    continue
                if r["status"] != "ok":
                    detail.append([task, f"`{est}`", "–", "–", "–", _seconds(r), _num(r.get("evaluations"), ",d"),
                                   f"{_STATUS.get(r['status'], 'failed')}: {str(r.get('error'))[:120]}"])
                    continue
                detail.append([task, f"`{est}`", _main(r, best) + _ci(r, "pearson"),
                               _num(r.get("spearman")) + _ci(r, "spearman"), _num(r.get("output_distance_relative")),
                               _seconds(r), _num(r.get("evaluations"), ",d"), _row_notes(r)])
        lines += ["Per row:", "",
                  _table(["task", "estimator", "Pearson [95 % CI]", "Spearman [95 % CI]", "output dist. (rel.)",
                          "seconds", "evaluations", "status"], detail), ""]
        cert, cert_warnings = _certificate_rows(group, tasks)
        lines += [f"Ground truth (`{gt}`) per task:", "",
                  _table(["task", "R × Q", "converged", "median rel. ‖∇J‖", "max rel. ‖∇J‖", "stop reasons",
                          "error bar (second solve)", "second solve: trusted / K, stop reasons", "cache key"],
                         cert), ""]
        lines += [f"⚠ {w}" for w in cert_warnings] + ([""] if cert_warnings else [])
        if plt is not None:
            stem = f"{_slug(scale)}-{_slug(gt)}"
            links = []
            bar = out / "figures" / f"{stem}-pearson.png"
            if bar_figure(plt, group, tasks, ests, f"{scale} scale, against {gt}: mean per-query Pearson", bar):
                lines += [f"![mean per-query Pearson, {scale} scale](figures/{bar.name})", ""]
            accuracy_cost = out / "figures" / f"{stem}-accuracy-cost.png"
            if cost_figure(plt, group, tasks, ests, f"{scale} scale, against {gt}: accuracy against cost", accuracy_cost):
                lines += [f"![accuracy against cost, {scale} scale](figures/{accuracy_cost.name})", ""]
            for task in tasks:
                fig = out / "figures" / f"{stem}-{_slug(task)}-scatter.png"
                if scatter_figure(plt, task, [by[(task, e)] for e in ests if (task, e) in by], fig):
                    links.append(f"[{task}](figures/{fig.name})")
            if links:
                lines += ["Predicted against true scores: " + " · ".join(links), ""]
    lines += cost_section(rows, cost.load_results(results_dir))
    return "\n".join(lines).rstrip() + "\n"


def _display(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def csv_rows(rows: list[dict]) -> list[dict]:
    out, tied = [], {}
    groups = defaultdict(list)
    for r in rows:
        groups[(r["scale"], r.get("ground_truth", "pbrf"), r["task"])].append(r)
    for group in groups.values():
        best, ties = _best(group)
        tied.update({i: "best" for i in best} | {i: "tied" for i in ties})
    for r in rows:
        cert = r.get("ground_truth_certificate") or {}
        second = cert.get("second_solve") or {}
        ceiling_ci = second.get("ceiling_ci") or [None, None]
        prov = r.get("provenance") or {}
        p_ci, s_ci = r.get("pearson_ci") or [None, None], r.get("spearman_ci") or [None, None]
        out.append({
            **{k: r.get(k) for k in ("scale", "ground_truth", "task", "estimator", "status", "pearson", "spearman",
                                     "pearson_pooled", "spearman_pooled", "output_distance_relative", "seconds",
                                     "seconds_fit", "seconds_scores", "peak_memory_mb", "evaluations", "n_train",
                                     "n_params", "n_removed", "n_query", "error", "pearson_undefined")},
            "contended": (r.get("load") or {}).get("contended"),
            "loadavg_max": max([v for v in ((r.get("load") or {}).get(k) for k in ("loadavg_start", "loadavg_end"))
                                if v is not None], default=None),
            "pearson_ci_low": p_ci[0], "pearson_ci_high": p_ci[1],
            "spearman_ci_low": s_ci[0], "spearman_ci_high": s_ci[1],
            "gt_converged_fraction": cert.get("converged_fraction"),
            "gt_median_relative_gradient_norm": cert.get("median_relative_gradient_norm"),
            "gt_max_relative_gradient_norm": cert.get("max_relative_gradient_norm"),
            "gt_second_solve_median_relative_error": second.get("median_relative_error"),
            "gt_second_solve_max_relative_error": second.get("max_relative_error"),
            "gt_ceiling": second.get("ceiling"), "gt_ceiling_ci_low": ceiling_ci[0], "gt_ceiling_ci_high": ceiling_ci[1],
            "tied_with_best": tied.get(id(r)),
            "gt_key": prov.get("ground_truth_key") or cert.get("key"),
            **{k: prov.get(k) for k in ("commit", "torch", "device", "device_name", "threads", "seed", "date")},
            "estimator_params": json.dumps(r.get("estimator_params") or {}, sort_keys=True),
            "file": _display(Path(r["_file"])) if r.get("_file") else None,
        })
    return out


def write(results_dir: Path, out: Path, figures: bool = True) -> tuple[Path, Path, int]:
    rows = load_results(results_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    page = out / "LEADERBOARD.md"
    page.write_text(build_page(rows, out, results_dir, figures))
    table = out / "results.csv"
    ordered = [r for group in _group(rows).values() for r in group]
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_rows(ordered))
    return page, table, len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.leaderboard", description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", type=Path, default=REPO / "leaderboard" / "results",
                        help="where the result JSONs are, one folder per scale (default: leaderboard/results)")
    parser.add_argument("--out", type=Path, default=REPO / "leaderboard",
                        help="where LEADERBOARD.md, results.csv and figures/ go (default: leaderboard)")
    parser.add_argument("--no-figures", action="store_true", help="do not draw the PNG figures")
    args = parser.parse_args(argv)
    if not args.results_dir.is_dir():
        print(f"no results directory {args.results_dir}: run `pytest benchmark/` first", file=sys.stderr)
        return 2
    page, table, n = write(args.results_dir, args.out, figures=not args.no_figures)
    print(f"{n} result(s) -> {page}, {table}")
    if decomposition.load_results(args.results_dir):
        page, n = decomposition.write_page(args.results_dir, args.out, figures=not args.no_figures)
        print(f"{n} decomposition result(s) -> {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
