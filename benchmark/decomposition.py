"""The paper's decomposition of influence misalignment (Bae et al. 2022, §4 and §6.1; DESIGN.md §1).

For every task, the five gaps between consecutive response functions, each measured as the
output distance d(a, b) = mean over a fixed subset of training inputs of ‖f(θ_a, x) − f(θ_b, x)‖₂
per removed example (metrics.output_distance on the stored evaluation outputs), then mean ± std
over the removed examples:

  warm-start gap        d(cold, warm)
  proximity gap         d(warm, proximal)
  non-convergence gap   d(proximal, pbrf)
  linearization error   d(pbrf, linear)
  solver error          d(linear, estimator)   for each iterative estimator (cg, lissa)

plus the paper's Table 2: Pearson and Spearman correlation of each estimator's scores with the
test-loss differences of cold-start retraining, warm-start retraining and the PBRF.

    python -m benchmark.decomposition --scale smoke [--task NAME ...] [--data-root DIR] [--cache-dir DIR]

writes leaderboard/DECOMPOSITION.md and leaderboard/figures/decomposition-<task>.png.
Problems, ground truths (cached; the retraining responses are computed on first use) and
estimators come from benchmark.runner.Session and estimators.make_estimator.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import traceback
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

from estimators import DEFAULT_ESTIMATORS, ParameterEstimator, make_estimator
from tasks import SCALES, TASKS

from .metrics import correlations, output_distance
from .runner import REPO, Session, Settings, git_commit

#: (label, response a, response b) of the first four gaps; the solver error follows per estimator
GAPS = (
    ("warm-start gap", "cold", "warm"),
    ("proximity gap", "warm", "proximal"),
    ("non-convergence gap", "proximal", "pbrf"),
    ("linearization error", "pbrf", "linear"),
)
SOLVERS = ("cg", "lissa")
TABLE2_TRUTHS = ("cold", "warm", "pbrf")
RETRAINING_RESPONSES = ("cold", "cold-controlled", "warm", "warm-controlled", "proximal")

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
| solver error | `linear`, estimator | the linear system solved approximately by the estimator (truncated CG, LiSSA) with its default settings |

`cold` and `warm` are the raw retraining responses (the paper's definitions, reference θˢ).
Continued training moves θ even with nothing removed; the *drift-controlled* variants
(`cold-controlled`, `warm-controlled`) take as reference the same run with nothing removed (same
seed and batch order). The drift table gives how far the raw variants move from the controlled
ones and the warm-start gap between the controlled variants. Per-query correlations are identical
for the two variants (they differ by a constant per query), so Table 2 uses the raw ones.
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


def _fmt(x: float) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.3g}"


def _pm(values: np.ndarray) -> str:
    return f"{_fmt(float(values.mean()))} ± {_fmt(float(values.std()))}"


def _estimator_results(problem, gt, spec: str) -> dict:
    """Fit one estimator; its scores (Q, R) and, for parameter estimators, its outputs."""
    removed = gt.removed.to(problem.device)
    est = make_estimator(spec).fit(problem)
    out = {"scores": None, "outputs": None}
    if isinstance(est, ParameterEstimator):
        delta = est.parameter_change(removed)
        eval_inputs = problem.train.inputs[gt.eval_idx.to(problem.device)]
        with torch.no_grad():
            out["outputs"] = torch.stack([problem.model(problem.params + d, eval_inputs) for d in delta]).cpu().numpy()
        out["scores"] = est.scores_from_change(delta, problem.query).detach().cpu().numpy()
    else:
        out["scores"] = est.scores(removed, problem.query).detach().cpu().numpy()
    problem.counter.reset()
    return out


def decompose(session: Session, task_name: str, estimators=DEFAULT_ESTIMATORS, solvers=SOLVERS) -> dict:
    """Gaps, drift, Table 2 and certificates of one task (numbers only)."""
    problem, gt, _ = session.task_state(task_name)
    names = ("pbrf", "linear", *RETRAINING_RESPONSES)
    outputs = {n: gt.response(n)["outputs"].numpy() for n in names}
    base = gt.base_outputs.numpy()[None]
    est = {}
    for spec in dict.fromkeys((*solvers, *estimators)):
        try:
            est[spec] = _estimator_results(problem, gt, spec)
        except Exception as exc:  # an estimator's failure is reported, the rest goes on
            est[spec] = {"error": f"{type(exc).__name__}: {exc}"}
    effect = output_distance(base, outputs["pbrf"])
    gaps = []
    for label, a, b in GAPS:
        gaps.append({"gap": label, "between": f"{a} / {b}", "d": output_distance(outputs[a], outputs[b])})
    for spec in solvers:
        if est[spec].get("outputs") is not None:
            gaps.append({"gap": f"solver error ({spec})", "between": f"linear / {spec}",
                         "d": output_distance(outputs["linear"], est[spec]["outputs"])})
        else:
            gaps.append({"gap": f"solver error ({spec})", "between": f"linear / {spec}", "d": None,
                         "error": est[spec].get("error", "no parameter change")})
    drift = [
        {"quantity": "cold drift d(cold, cold-controlled)", "d": output_distance(outputs["cold"], outputs["cold-controlled"])},
        {"quantity": "warm drift d(warm, warm-controlled)", "d": output_distance(outputs["warm"], outputs["warm-controlled"])},
        {"quantity": "warm-start gap, controlled: d(cold-controlled, warm-controlled)",
         "d": output_distance(outputs["cold-controlled"], outputs["warm-controlled"])},
        {"quantity": "effect of removal, raw warm: d(θˢ, warm)", "d": output_distance(base, outputs["warm"])},
        {"quantity": "effect of removal, controlled warm: d(θˢ, warm-controlled)",
         "d": output_distance(base, outputs["warm-controlled"])},
    ]
    table2 = []
    for spec in estimators:
        row = {"estimator": spec}
        if est[spec].get("scores") is None:
            row["error"] = est[spec].get("error")
        else:
            for truth in TABLE2_TRUTHS:
                c = correlations(est[spec]["scores"], gt.scores(truth).numpy(), seed=problem.seed)
                row[truth] = (c["pearson"], c["spearman"])
        table2.append(row)
    certificates = {}
    for n in names:
        cert = gt.response(n)["certificate"]
        rel = np.asarray(cert.get("relative_gradient_norm", []), dtype=float)
        certificates[n] = {
            "seconds": cert.get("seconds"),
            "converged": float(np.mean(cert["converged"])) if isinstance(cert.get("converged"), list) else cert.get("converged"),
            "median_rel_grad": float(np.median(rel)) if rel.size else None,
            "length": cert.get("epochs", cert.get("iterations", cert.get("steps"))),
        }
    return {"task": task_name, "n_train": problem.n_train, "n_params": problem.n_params,
            "n_removed": len(gt.removed), "n_eval": len(gt.eval_idx), "n_query": len(problem.query),
            "effect": effect, "gaps": gaps, "drift": drift, "table2": table2, "certificates": certificates}


def _length(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, list):
        return f"{min(value)}–{max(value)}" if value else "–"
    return str(value)


def task_markdown(r: dict, figure: str | None) -> str:
    lines = [f"## {r['task']}", "",
             f"N = {r['n_train']}, d = {r['n_params']}, {r['n_removed']} removed examples, {r['n_query']} queries, "
             f"outputs on {r['n_eval']} training inputs. Size of the effect d(θˢ, PBRF) = {_pm(r['effect'])}.", ""]
    effect = float(r["effect"].mean())
    rows = []
    for g in r["gaps"]:
        if g["d"] is None:
            rows.append([g["gap"], g["between"], f"failed: {g.get('error')}", "–"])
        else:
            rows.append([g["gap"], g["between"], _pm(g["d"]), _fmt(float(g["d"].mean()) / effect)])
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
            rows.append([t["estimator"], *(["failed"] * 2 * len(TABLE2_TRUTHS))])
        else:
            rows.append([t["estimator"], *(f"{v:.2f}" for truth in TABLE2_TRUTHS for v in t[truth])])
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
    return "\n".join(lines)


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
    bars = [(g["gap"].replace(" (", "\n("), g["d"], None) for g in gaps]
    bars.insert(1, ("warm-start gap\n(drift-controlled)", controlled["d"], "//"))
    means = np.array([b[1].mean() for b in bars])
    stds = np.array([b[1].std() for b in bars])
    colors = ["#4c72b0", "#a6bddb", "#55a868", "#c44e52", "#8172b2", "#ccb974", "#64b5cd", "#999999"]
    fig, ax = plt.subplots(figsize=(9, 4))
    x = np.arange(len(bars))
    floor = max(float(means[means > 0].min()) * 1e-2 if (means > 0).any() else 1e-16, 1e-300)
    container = ax.bar(x, np.maximum(means, floor), yerr=[np.minimum(stds, means * 0.999), stds],
                       color=colors[:len(bars)], capsize=4)
    for patch, (_, _, hatch) in zip(container.patches, bars):
        if hatch:
            patch.set_hatch(hatch)
    ax.axhline(float(r["effect"].mean()), color="k", ls="--", lw=1, label="effect d(θˢ, PBRF)")
    ax.set_yscale("log")
    ax.set_xticks(x, [b[0] for b in bars], fontsize=7)
    ax.set_ylabel("mean output distance")
    ax.set_title(f"{r['task']}: decomposition of influence misalignment")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmark.decomposition", description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", default="cpu", choices=SCALES)
    ap.add_argument("--task", action="append", default=None, choices=list(TASKS), help="repeatable; default: all")
    ap.add_argument("--data-root", type=Path, default=None)
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--output", type=Path, default=REPO / "leaderboard" / "DECOMPOSITION.md")
    ap.add_argument("--figures-dir", type=Path, default=REPO / "leaderboard" / "figures")
    args = ap.parse_args(argv)
    session = Session(Settings(scale=args.scale, device=args.device, cache_dir=args.cache_dir,
                               data_root=args.data_root, results_dir=None))
    tasks = args.task or list(TASKS)
    sections, failures, have_plots = [], [], True
    for name in tasks:
        print(f"[decomposition] {name} ({args.scale})", flush=True)
        try:
            r = decompose(session, name)
        except Exception as exc:
            failures.append(f"- {name}: {type(exc).__name__}: {exc}")
            traceback.print_exc()
            continue
        figure = None
        fig_path = args.figures_dir / f"decomposition-{name}.png"
        if plot_task(r, fig_path):
            try:
                figure = str(fig_path.relative_to(args.output.parent))
            except ValueError:
                figure = str(fig_path)
        else:
            have_plots = False
        sections.append(task_markdown(r, figure))
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    head = ["# Decomposition of influence misalignment", "",
            f"Scale `{args.scale}`; tasks: {', '.join(tasks)}; commit {git_commit()}; torch {torch.__version__}; "
            f"{date}. Generated by `python -m benchmark.decomposition --scale {args.scale}`.", "",
            EXPLANATION, DIFFERENCES.format(scale=args.scale)]
    if not have_plots:
        head += ["(matplotlib is not installed: no figures.)", ""]
    if failures:
        head += ["Tasks that failed:", "", *failures, ""]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(head + sections).rstrip() + "\n")
    print(f"[decomposition] wrote {args.output}")
    return 1 if failures and not sections else 0


if __name__ == "__main__":
    sys.exit(main())
