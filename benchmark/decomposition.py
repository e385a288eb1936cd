"""The paper's decomposition of influence misalignment (Bae et al. 2022, §4 and §6.1; DESIGN.md §1).

For every task, the five gaps between consecutive response functions, each measured as the
output distance d(a, b) = mean over a fixed subset of training inputs of ‖f(θ_a, x) − f(θ_b, x)‖₂
per removed example (metrics.output_distance on the stored evaluation outputs), then mean ± std
over the removed examples:

  warm-start gap        d(cold, warm)
  proximity gap         d(warm, proximal)
  non-convergence gap   d(proximal, pbrf)
  linearization error   d(pbrf, linear)
  solver error          d(linear, estimator)   for each estimator that returns a parameter change

plus the paper's Table 2: Pearson and Spearman correlation of each estimator's scores with the
test-loss differences of cold-start retraining, warm-start retraining and the PBRF. Removed
examples whose PBRF solve has no local solution (benchmark.runner.untrusted_rows) are left out
of every number, as in the leaderboard, and counted.

Computed per task by `pytest benchmark/` (on by default at smoke scale, `--decomposition`
elsewhere; the estimators' rows of the same run are reused) or by

    python -m benchmark.decomposition --scale cpu [--task NAME ...] [--estimator SPEC ...]

both of which write one JSON per task to <results-dir>/<scale>/decomposition/<task>.json.
`python -m benchmark.leaderboard` (which the command above also runs) renders those into
leaderboard/DECOMPOSITION.md and leaderboard/figures/decomposition-<scale>-<task>.png.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import textwrap
import traceback
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

from estimators import DEFAULT_ESTIMATORS
from tasks import SCALES, TASKS, default_tasks

from .cache import TaskResultFiles
from .ground_truth import PBRF_EPOCHS, SECOND_SOLVE
from .metrics import correlations, output_distance
from .runner import (MIN_TRUSTED_REMOVED, REPO, NoGroundTruth, Session, Settings, git_commit, second_solve_summary,
                     untrusted_rows)
from .second_solve import error_bar_text
from .training import show_progress

#: (label, response a, response b) of the first four gaps; a solver error per estimator follows
GAPS = (
    ("warm-start gap", "cold", "warm"),
    ("proximity gap", "warm", "proximal"),
    ("non-convergence gap", "proximal", "pbrf"),
    ("linearization error", "pbrf", "linear"),
)
TABLE2_TRUTHS = ("cold", "warm", "pbrf")
RETRAINING_RESPONSES = ("cold", "cold-controlled", "warm", "warm-controlled", "proximal")
RESPONSE_NAMES = ("pbrf", "linear", *RETRAINING_RESPONSES)

EXPLANATION = """\
Each gap is the distance between two consecutive response functions of the paper's Table 1,
measured as in its §6: d(a, b) = mean over inputs x of ‖f(θ_a, x) − f(θ_b, x)‖₂, here over the
fixed evaluation subset of training inputs stored with the ground truth, for each removed training
example; the tables give the mean ± standard deviation over the removed examples, and the same
mean relative to the size of the effect itself, d(θˢ, PBRF).

| gap | between | what it measures |
| --- | --- | --- |
| warm-start gap | `cold`, `warm` | retraining from θ⁰ (the base recipe, the removed example left out of its minibatch) vs. from θˢ for half the base epochs: the objective has more than one optimum, and where training ends depends on where it starts |
| proximity gap | `warm`, `proximal` | the damping λ of the influence estimate acts as a proximity term (λ/2)‖θ − θˢ‖² added to warm-start retraining |
| non-convergence gap | `proximal`, `pbrf` | θˢ is not a minimum of the training objective; the PBRF replaces the training loss by a Bregman divergence to θˢ's outputs, of which θˢ is the minimum |
| linearization error | `pbrf`, `linear` | the PBRF vs. its first-order (linearized) solution ε (G + (wd+λ)I)⁻¹ ∇ℓₘ, solved exactly |
| solver error | `linear`, estimator | the linear system solved approximately by the estimator (truncated CG, LiSSA) with its default settings; `exact` solves the same system as `linear` and shows the floating-point floor |

`cold` and `warm` are the raw retraining responses (the paper's definitions, reference θˢ).
Continued training moves θ even with nothing removed; the *drift-controlled* variants
(`cold-controlled`, `warm-controlled`) take as reference the same run with nothing removed (same
seed and batch order). The drift table gives how far the raw variants move from the controlled
ones and the warm-start gap between the controlled variants. Per-query correlations are identical
for the two variants (they differ by a constant per query), so Table 2 uses the raw ones.

Removed examples whose PBRF solve left the basin around θˢ or diverged (no local solution; see
the leaderboard's ground-truth certificates) are left out of every gap and of Table 2, and the
number left out is given per task.
"""

DIFFERENCES = """\
Differences from the paper:

- Scale: the numbers are at the `{scale}` scale (see `tasks/` for epochs, widths and subset sizes);
  at `smoke` scale the networks are tiny and trained for few epochs, so they illustrate the
  pipeline rather than reproduce the paper's magnitudes.
- The PBRF is solved to convergence by damped Gauss–Newton (its certificate gives the relative
  gradient norm per removed example), not by K epochs of SGD on the proximal Bregman objective as
  in the paper; the linearized PBRF is solved exactly (dense or float64 CG), not by LiSSA. The
  non-convergence gap therefore includes what K epochs of SGD would leave unsolved of the PBRF.
- Output distances are averaged over a fixed evaluation subset of the training inputs
  (`n_eval` per task), not the whole training set, and over the ground truth's removed examples.
- For the logistic-regression tasks (recipe: L-BFGS) every retraining is full-batch L-BFGS to
  convergence (polished by Newton steps), so cold, warm and proximal are optima, not K epochs.
- Warm-start and proximal retraining restart the recipe's learning-rate schedule and momentum
  and reuse the batch order of the first K = epochs // 2 base epochs.
- Table 2 is computed for every task (the paper gives it for MNIST only), with the benchmark's
  correlation: per query across removed examples, then the mean over queries.
"""


def _fmt(x) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.3g}"


def _pm(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{_fmt(float(values.mean()))} ± {_fmt(float(values.std()))}" if values.size else "–"


def _list(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=float)]


def pbrf_response(session: Session, task_name: str) -> str:
    """The response that stands for the PBRF in the decomposition: the rows' ground truth where it
    is `pbrf-epochs` (the batch-norm nets, whose θˢ is a saddle of the PBRF: no minimiser to
    solve for; the paper's own PBRF there is this protocol), else the PBRF's minimiser."""
    return PBRF_EPOCHS if session.ground_truth_of(task_name) == PBRF_EPOCHS else "pbrf"


def decompose(session: Session, task_name: str, estimators=DEFAULT_ESTIMATORS) -> dict:
    """Gaps, drift, Table 2 and certificates of one task, as plain JSON-serialisable numbers.

    Per-removed-example distances are lists over the trusted removed examples (those with a
    local PBRF solution); estimator scores and outputs come from session.estimate (the rows
    already scored in this session, else fitted now). Raises NoGroundTruth when fewer than
    MIN_TRUSTED_REMOVED removed examples are trusted, or when a retraining diverges."""
    problem, gt, _ = session.task_state(task_name)
    pbrf_name = pbrf_response(session, task_name)
    bad = untrusted_rows(gt.response(pbrf_name)["certificate"])
    keep = ~bad if bad.size else np.ones(len(gt.removed), dtype=bool)
    if keep.sum() < MIN_TRUSTED_REMOVED:
        raise NoGroundTruth(f"only {int(keep.sum())} of {len(gt.removed)} removed examples have a trusted PBRF "
                            f"solution at {session.settings.scale} scale: no decomposition")
    try:
        outputs = {n: gt.response(pbrf_name if n == "pbrf" else n)["outputs"].numpy()[keep] for n in RESPONSE_NAMES}
    except FloatingPointError as exc:  # a retraining diverged: that response does not exist here
        raise NoGroundTruth(f"no retraining response at {session.settings.scale} scale: {exc}") from exc
    base = gt.base_outputs.numpy()[None]
    est = {}
    for spec in dict.fromkeys(estimators):
        try:
            est[spec] = session.estimate(task_name, spec)
        except Exception as exc:  # an estimator's failure is reported, the rest goes on
            est[spec] = {"error": f"{type(exc).__name__}: {exc}"}

    def gap(label, a, b, out_a, out_b):
        return {"gap": label, "between": f"{a} / {b}", **_d(out_a, out_b)}

    gaps = [gap(label, a, b, outputs[a], outputs[b]) for label, a, b in GAPS]
    for spec, e in est.items():
        if e.get("outputs") is not None:
            gaps.append(gap(f"solver error ({spec})", "linear", spec, outputs["linear"], e["outputs"][keep]))
        elif "error" in e:
            gaps.append({"gap": f"solver error ({spec})", "between": f"linear / {spec}", "d": None,
                         "error": e["error"]})
    drift = [
        {"quantity": "cold drift d(cold, cold-controlled)", **_d(outputs["cold"], outputs["cold-controlled"])},
        {"quantity": "warm drift d(warm, warm-controlled)", **_d(outputs["warm"], outputs["warm-controlled"])},
        {"quantity": "warm-start gap, controlled: d(cold-controlled, warm-controlled)",
         **_d(outputs["cold-controlled"], outputs["warm-controlled"])},
        {"quantity": "effect of removal, raw warm: d(θˢ, warm)", **_d(base, outputs["warm"])},
        {"quantity": "effect of removal, controlled warm: d(θˢ, warm-controlled)",
         **_d(base, outputs["warm-controlled"])},
    ]
    table2 = []
    for spec, e in est.items():
        row = {"estimator": spec}
        if e.get("scores") is None:
            row["error"] = e.get("error")
        else:
            for truth in TABLE2_TRUTHS:
                c = correlations(e["scores"][:, keep], gt.scores(pbrf_name if truth == "pbrf" else truth).numpy()[:, keep],
                                 seed=problem.seed)
                row[truth] = [c["pearson"], c["spearman"]]
        table2.append(row)
    certificates = {}
    for n in (pbrf_name if n == "pbrf" else n for n in RESPONSE_NAMES):
        cert = gt.response(n)["certificate"]
        rel = np.asarray(cert.get("relative_gradient_norm", []), dtype=float)
        converged = cert.get("converged")
        certificates[n] = {
            "seconds": cert.get("seconds"),
            "converged": float(np.mean(converged)) if isinstance(converged, list) else converged,
            "median_rel_grad": float(np.median(rel)) if rel.size else None,
            "length": cert.get("epochs", cert.get("iterations", cert.get("steps"))),
        }
        if cert.get("lr_halvings"):  # its run went non-finite and was rerun at a smaller lr
            certificates[n].update({k: cert[k] for k in ("lr", "lr_halvings", "diverged_at_epoch")})
    second = second_solve_summary(gt.responses[SECOND_SOLVE]) if SECOND_SOLVE in gt.responses else None
    if second is not None:
        cert = gt.responses[SECOND_SOLVE]["certificate"]
        certificates["pbrf (second solve)"] = {
            "seconds": cert["seconds"], "converged": second["converged_fraction"],
            "median_rel_grad": float(np.median(cert["relative_gradient_norm"])), "length": cert["iterations"]}
    return {"task": task_name, "scale": session.settings.scale, "n_train": problem.n_train,
            "n_params": problem.n_params, "n_removed": len(gt.removed), "n_trusted": int(keep.sum()),
            "n_eval": len(gt.eval_idx), "n_query": len(problem.query), "pbrf_response": pbrf_name,
            "effect": _list(output_distance(base, outputs["pbrf"])), "gaps": gaps, "drift": drift,
            "table2": table2, "certificates": certificates, "second_solve": second,
            "provenance": {"commit": git_commit(), "torch": torch.__version__, "device": session.settings.device,
                           "threads": torch.get_num_threads(), "ground_truth_key": gt.key,
                           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}}


def _d(a: np.ndarray, b: np.ndarray) -> dict:
    return {"d": _list(output_distance(a, b))}


def relative_gaps(r: dict) -> dict[str, float]:
    """gap label -> mean gap / mean effect d(θˢ, PBRF) (None where the gap failed)."""
    effect = float(np.mean(r["effect"]))
    return {g["gap"]: None if g["d"] is None else float(np.mean(g["d"])) / max(effect, 1e-300) for g in r["gaps"]}


def summarize(r: dict) -> dict:
    """The few numbers of one task's decomposition shown at a glance (JSON-serialisable)."""
    exact = next((t for t in r["table2"] if t["estimator"] == "exact" and "error" not in t), None)
    return {"task": r["task"], "effect": float(np.mean(r["effect"])), "relative": relative_gaps(r),
            "trusted": f"{r['n_trusted']}/{r['n_removed']}",
            "exact": {t: exact[t][0] for t in TABLE2_TRUTHS} if exact else None}


def decomposition_summary(summaries: list[dict], tablefmt: str = "simple") -> str:
    """One line per task: the effect, the gaps relative to it, and `exact`'s Pearson with cold,
    warm and the PBRF."""
    rows = []
    for s in summaries:
        solvers = {k.removeprefix("solver error (").rstrip(")"): v for k, v in s["relative"].items()
                   if k.startswith("solver error")}
        rows.append([s["task"], s["trusted"], _fmt(s["effect"]), *(_fmt(s["relative"][label]) for label, _, _ in GAPS),
                     ", ".join(f"{k} {_fmt(v)}" for k, v in solvers.items()) or "–",
                     *((_fmt2(s["exact"][t]) for t in TABLE2_TRUTHS) if s["exact"] else ["–"] * len(TABLE2_TRUTHS))])
    headers = ["task", "trusted R", "effect", "warm-start", "proximity", "non-conv.", "linearization", "solver error",
               *(f"exact vs {t}" for t in TABLE2_TRUTHS)]
    return tabulate(rows, headers=headers, tablefmt=tablefmt)


#: the estimators whose error against the linearized PBRF is the paper's "solver error": iterative
#: solves of the same damped Gauss–Newton system (the paper's LiSSA; CG). KFAC, EKFAC, Arnoldi,
#: DataInf and the gradient baselines change the system itself, so their distance to the linearized
#: PBRF is an approximation error, not the solver's (DataInf's is 49-209 × the effect at cpu).
ITERATIVE_SOLVERS = ("cg", "lissa")


def findings(group: list[dict]) -> list[str]:
    """The paper's two findings checked on each task's numbers, one line per task:
    convex tasks: every gap small against the effect and exact influence ≈ cold-start
    retraining (Pearson ≥ 0.95); others: warm-start + proximity + non-convergence larger than
    linearization + the largest error of an iterative solver (ITERATIVE_SOLVERS), and exact
    influence closer to the PBRF than to cold-start retraining."""
    from tasks import get_task
    lines = []
    for r in group:
        rel = relative_gaps(r)
        exact = next((t for t in r["table2"] if t["estimator"] == "exact" and "error" not in t), None)
        solvers = [rel.get(f"solver error ({name})") for name in ITERATIVE_SOLVERS]
        solvers = [v for v in solvers if v is not None]
        solver = max(solvers) if solvers else 0.0
        try:
            convex = get_task(r["task"]).convex
        except KeyError:
            convex = False
        if convex:
            largest = max(rel[label] for label, _, _ in GAPS)
            ok = largest < 0.5 and exact is not None and exact["cold"][0] >= 0.95
            lines.append(f"- {r['task']} (convex): largest of the four gaps {_fmt(largest)} × the effect; `exact` vs "
                         f"cold-start Pearson {_fmt2(exact['cold'][0]) if exact else '–'} (paper: ≥ 0.95) — "
                         + ("as in the paper." if ok else "**differs from the paper**."))
        else:
            retrain = sum(rel[label] for label in ("warm-start gap", "proximity gap", "non-convergence gap"))
            linear = rel["linearization error"] + solver
            closer = exact is not None and exact["pbrf"][0] > exact["cold"][0]
            ok = retrain > linear and closer
            lines.append(f"- {r['task']}: warm-start + proximity + non-convergence {_fmt(retrain)} vs linearization + "
                         f"solver {_fmt(linear)} (× the effect); `exact` vs PBRF Pearson "
                         f"{_fmt2(exact['pbrf'][0]) if exact else '–'} vs cold-start "
                         f"{_fmt2(exact['cold'][0]) if exact else '–'} — "
                         + ("as in the paper." if ok else "**differs from the paper**."))
    return lines


# ---- storage -------------------------------------------------------------------------------------

#: <results>/<scale>/decomposition/<task>.json
RESULTS = TaskResultFiles("decomposition", ("task", "scale", "gaps", "effect", "table2", "provenance"))
write_result = RESULTS.write


def load_results(results_dir: Path) -> list[dict]:
    """Every readable decomposition result, ordered by scale and the task registry (unreadable
    files are skipped with a warning)."""
    order = {t: i for i, t in enumerate(TASKS)}
    scales = {s: i for i, s in enumerate(SCALES)}
    return sorted(RESULTS.load(results_dir),
                  key=lambda r: (scales.get(r["scale"], 99), order.get(r["task"], 999), r["task"]))

def _length(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, list):
        return f"{min(value)}–{max(value)}" if value else "–"
    return str(value)


def task_markdown(r: dict, figure: str | None) -> str:
    """The section of one task: gaps, figure, drift, Table 2 and certificates."""
    left_out = r["n_removed"] - r["n_trusted"]
    lines = [f"### {r['task']}", "",
             f"N = {r['n_train']}, d = {r['n_params']}, {r['n_removed']} removed examples"
             + (f" ({left_out} left out: no trusted PBRF solution, see the certificates)" if left_out else "")
             + f", {r['n_query']} queries, outputs on {r['n_eval']} training inputs. "
             f"Size of the effect d(θˢ, PBRF) = {_pm(r['effect'])}.", ""]
    if r.get("pbrf_response", "pbrf") != "pbrf":
        lines += [f"The PBRF here is `{r['pbrf_response']}`, this task's ground truth (the base optimizer on the "
                  "PBRF objective from θˢ for half the base epochs, the paper's §6 protocol), not a minimiser: "
                  "θˢ is a saddle of this net's PBRF at this scale.", ""]
    relative = relative_gaps(r)
    rows = []
    for g in r["gaps"]:
        if g["d"] is None:
            rows.append([g["gap"], g["between"], f"failed: {g.get('error')}", "–"])
        else:
            rows.append([g["gap"], g["between"], _pm(g["d"]), _fmt(relative[g["gap"]])])
    lines += [tabulate(rows, headers=["gap", "between", "d (mean ± std)", "relative to d(θˢ, PBRF)"],
                       tablefmt="github"), ""]
    if figure:
        lines += [f"![decomposition of {r['task']}]({figure})", ""]
    lines += ["Drift of continued training (nothing removed) and the controlled variants:", "",
              tabulate([[d["quantity"], _pm(d["d"])] for d in r["drift"]], headers=["quantity", "d (mean ± std)"],
                       tablefmt="github"), ""]
    rows = []
    for t in r["table2"]:
        if "error" in t:
            rows.append([t["estimator"], f"failed: {str(t['error'])[:100]}", *([""] * (2 * len(TABLE2_TRUTHS) - 1))])
        else:
            rows.append([t["estimator"], *(_fmt2(v) for truth in TABLE2_TRUTHS for v in t[truth])])
    headers = ["estimator", *(f"{truth} {c}" for truth in TABLE2_TRUTHS for c in ("P", "S"))]
    lines += ["Table 2 (correlation of the estimator's scores with each response's test-loss differences; "
              "P = Pearson, S = Spearman, mean over queries):", "",
              tabulate(rows, headers=headers, tablefmt="github"), ""]
    rows = [[n, _fmt(c["seconds"]), _length(c["length"]),
             "–" if c["converged"] is None else (f"{c['converged']:.0%}" if not isinstance(c["converged"], bool)
                                                 else str(c["converged"])),
             _fmt(c["median_rel_grad"])] for n, c in r["certificates"].items()]
    lines += ["Ground-truth certificates (seconds: when the entry was computed; relative gradient norm: "
              "‖∇J_m‖ / ε‖∇ℓₘ(θˢ)‖ of each response's own objective):", "",
              tabulate(rows, headers=["response", "seconds", "epochs / steps", "converged", "median rel. grad."],
                       tablefmt="github"), ""]
    for n, c in r["certificates"].items():
        if c.get("lr_halvings"):
            lines += [f"`{n}`: its run went non-finite (after epoch {', '.join(map(str, c['diverged_at_epoch']))} "
                      f"of {c['length']}) and was rerun from θˢ with the learning rate halved {c['lr_halvings']} "
                      f"time(s), to lr {c['lr']:.3g} (`benchmark.training.sgd_halving_lr`).", ""]
    second = r.get("second_solve")
    if second:
        lines += [f"Ground-truth error bar: the PBRF of {second['n']} of the removed examples solved a second time "
                  f"({second['method']}; {second['n_trusted']} trusted by both solves): "
                  f"{error_bar_text(second)} (relative error ‖s₁ − s₂‖ / ‖s₁‖ of the scores over the queries; "
                  "ceiling: the per-query Pearson between the two solves, 95 % bootstrap interval).", ""]
    return "\n".join(lines)


def _fmt2(x) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.2f}"


def plot_task(r: dict, path: Path) -> bool:
    """A bar chart of the gaps of one task, with the drift-controlled warm-start gap beside the raw
    one (log scale, error bars = std over removed examples); False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    gaps = [g for g in r["gaps"] if g["d"] is not None]
    controlled = next(d for d in r["drift"] if d["quantity"].startswith("warm-start gap, controlled"))
    bars = [(textwrap.fill(g["gap"], 14), np.asarray(g["d"]), None) for g in gaps]
    bars.insert(1, ("warm-start gap\n(drift-controlled)", np.asarray(controlled["d"]), "//"))
    means = np.array([b[1].mean() for b in bars])
    stds = np.array([b[1].std() for b in bars])
    colors = ["#4c72b0", "#a6bddb", "#55a868", "#c44e52", "#8172b2", "#ccb974", "#64b5cd", "#999999", "#dd8452"]
    fig, ax = plt.subplots(figsize=(9, 4))
    x = np.arange(len(bars))
    floor = max(float(means[means > 0].min()) * 1e-2 if (means > 0).any() else 1e-16, 1e-300)
    container = ax.bar(x, np.maximum(means, floor), yerr=[np.minimum(stds, means * 0.999), stds],
                       color=[colors[i % len(colors)] for i in range(len(bars))], capsize=4)
    for patch, (_, _, hatch) in zip(container.patches, bars):
        if hatch:
            patch.set_hatch(hatch)
    ax.axhline(float(np.mean(r["effect"])), color="k", ls="--", lw=1, label="effect d(θˢ, PBRF)")
    ax.set_yscale("log")
    ax.set_xticks(x, [b[0] for b in bars], fontsize=7)
    ax.set_ylabel("mean output distance")
    ax.set_title(f"{r['task']} ({r['scale']} scale): decomposition of influence misalignment")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


#: the paper's Table 2 (MNIST; Pearson, Spearman of influence against cold-start, warm-start, PBRF)
PAPER_TABLE2 = {
    "mlp-mnist": ("MLP", (-0.55, 0.01), (0.22, 0.35), (0.98, 0.99)),
    "lenet-mnist": ("LeNet", (-0.19, 0.12), (0.32, 0.25), (0.93, 0.52)),
    "alexnet-mnist": ("AlexNet", (-0.16, -0.08), (0.51, 0.58), (0.99, 0.99)),
    "vgg13-mnist": ("VGG13", (0.45, -0.07), (-0.28, -0.51), (0.98, 0.77)),
    "resnet20-mnist": ("ResNet-20", (0.09, -0.06), (0.02, 0.09), (0.81, 0.76)),
}


def table2_beside_paper(group: list[dict]) -> list[str]:
    """The paper's Table 2 rows with this scale's `exact` numbers beside them ('ours / paper'),
    '– / paper' where the task has no decomposition at this scale."""
    by = {r["task"]: r for r in group}
    rows = []
    for task, (model, *paper) in PAPER_TABLE2.items():
        exact = next((t for t in (by[task]["table2"] if task in by else [])
                      if t["estimator"] == "exact" and "error" not in t), None)
        cells = [f"{model} (`{task}`)"]
        for truth, (p, s) in zip(("cold", "warm", "pbrf"), paper):
            ours = exact.get(truth) if exact else None
            fmt = lambda v: "–" if v is None else f"{v:.2f}"
            cells += [f"{fmt(ours[0] if ours else None)} / {p:.2f}", f"{fmt(ours[1] if ours else None)} / {s:.2f}"]
        rows.append(cells)
    missing = [t for t in PAPER_TABLE2 if t not in by]
    epochs = [t for t in PAPER_TABLE2 if by.get(t, {}).get("pbrf_response", "pbrf") != "pbrf"]
    note = ([f"PBRF column of {', '.join(epochs)}: against `pbrf-epochs` (the paper's protocol, as in its Table 2 "
             "for these nets), whose error bar on the leaderboard (a second run with another batch order) says how "
             "much of it is minibatch noise at this scale.", ""] if epochs else [])
    lines = ["The paper's Table 2 beside ours (`exact` influence against each response; ours / paper; the "
            "paper trains on 10 % of MNIST at its own widths, this scale's sizes are in the task docstrings):", "",
            tabulate(rows, headers=["model", "cold P", "cold S", "warm P", "warm S", "PBRF P", "PBRF S"],
                     tablefmt="github"), ""] + (
        [f"No decomposition at this scale for {', '.join(missing)}: not run at this scale (the leaderboard's "
         "cost table gives what its ground truth would cost), or skipped (too few trusted PBRF rows, or a "
         "retraining that diverged; the test's skip reason says which).", ""]
        if missing else [])
    return lines + note


def build_page(results: list[dict], out_dir: Path, figures: bool = True) -> str:
    """leaderboard/DECOMPOSITION.md from decomposition results (figures under out_dir/figures)."""
    lines = ["# Decomposition of influence misalignment", "",
             "Generated by `python -m benchmark.leaderboard` from the decomposition results in "
             "`leaderboard/results/<scale>/decomposition/` (computed by `python -m benchmark.decomposition "
             "--scale <scale>` or `pytest benchmark/ --decomposition`); do not edit by hand.", "", EXPLANATION]
    if not results:
        lines += ["No decomposition results yet: run `python -m benchmark.decomposition --scale smoke`.", ""]
    have_plots = True
    for scale in dict.fromkeys(r["scale"] for r in results):
        group = [r for r in results if r["scale"] == scale]
        commits = sorted({r["provenance"]["commit"] for r in group})
        dates = sorted(r["provenance"]["date"] for r in group)
        lines += [f"## {scale} scale", "",
                  f"Tasks: {', '.join(r['task'] for r in group)}; commit {', '.join(commits)}; "
                  f"torch {group[0]['provenance']['torch']}; device {group[0]['provenance']['device']}; "
                  f"{dates[0]} … {dates[-1]}.", "", DIFFERENCES.format(scale=scale), ""]
        lines += ["At a glance: the removed examples with a trusted PBRF, the effect d(θˢ, PBRF), each gap "
                  "relative to the effect, and the Pearson correlation of `exact` influence with each response:", "",
                  decomposition_summary([summarize(r) for r in group], tablefmt="github"), "",
                  "The paper's findings, checked on these numbers (solver: the largest error of an iterative "
                  f"solver of the damped system, {' or '.join(f'`{n}`' for n in ITERATIVE_SOLVERS)}):", "", *findings(group), "", *table2_beside_paper(group)]
        for r in group:
            figure = None
            if figures:
                path = Path(out_dir) / "figures" / f"decomposition-{scale}-{r['task']}.png"
                if plot_task(r, path):
                    figure = f"figures/{path.name}"
                else:
                    have_plots = False
            lines += [task_markdown(r, figure), ""]
    if figures and not have_plots:
        lines.insert(4, "*Figures skipped: matplotlib is not installed (`pip install matplotlib`).*\n")
    return "\n".join(lines).rstrip() + "\n"


def write_page(results_dir: Path, out_dir: Path, figures: bool = True) -> tuple[Path, int]:
    results = load_results(results_dir)
    page = Path(out_dir) / "DECOMPOSITION.md"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(build_page(results, out_dir, figures))
    return page, len(results)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmark.decomposition", description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", default="cpu", choices=SCALES)
    ap.add_argument("--task", action="append", default=None, choices=list(TASKS),
                    help="repeatable; default: the tasks meant for the scale (tasks.default_tasks)")
    ap.add_argument("--estimator", action="append", default=None, metavar="SPEC",
                    help=f"repeatable; default: {', '.join(DEFAULT_ESTIMATORS)}")
    ap.add_argument("--data-root", type=Path, default=None)
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--results-dir", type=Path, default=REPO / "leaderboard" / "results",
                    help="where the per-task JSON goes (default: leaderboard/results)")
    ap.add_argument("--out", type=Path, default=REPO / "leaderboard",
                    help="where DECOMPOSITION.md and figures/ go (default: leaderboard)")
    args = ap.parse_args(argv)
    show_progress()
    session = Session(Settings(scale=args.scale, device=args.device, cache_dir=args.cache_dir,
                               data_root=args.data_root, results_dir=None))
    failures = 0
    for name in args.task or default_tasks(args.scale):
        print(f"[decomposition] {name} ({args.scale})", flush=True)
        try:
            path = write_result(decompose(session, name, args.estimator or DEFAULT_ESTIMATORS), args.results_dir)
            print(f"[decomposition] wrote {path}", flush=True)
        except NoGroundTruth as exc:
            print(f"[decomposition] {name}: skipped: {exc}", flush=True)
        except Exception:
            failures += 1
            traceback.print_exc()
    page, n = write_page(args.results_dir, args.out)
    print(f"[decomposition] {n} task result(s) -> {page}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
