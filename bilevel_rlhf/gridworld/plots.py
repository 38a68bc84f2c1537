"""Figures of the GridWorld recipe (matplotlib, Agg backend)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .problem import GoalProblem  # noqa: E402
from .solvers import occupancy  # noqa: E402


def plot_curves(runs: dict[str, list[dict]], best_phi: float, phi_start: float, path: str) -> None:
    """Exact Phi(x_k) against environment samples: mean over seeds and min-max band per method."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (method, seeds) in enumerate(runs.items()):
        color = f"C{i}"
        if method.startswith("exact"):  # no samples: it uses the model
            finals = [r["phi"] for r in seeds]
            ax.axhline(np.mean(finals), color=color, ls="--", label=f"{method} (model-based, 0 samples)")
            continue
        n = min(len(r["curve_phi"]) for r in seeds)
        xs = np.asarray(seeds[0]["curve_samples"][:n], dtype=float)
        ys = np.array([r["curve_phi"][:n] for r in seeds])
        ax.plot(xs, ys.mean(0), color=color, label=method)
        ax.fill_between(xs, ys.min(0), ys.max(0), color=color, alpha=0.2, lw=0)
    ax.axhline(best_phi, color="k", ls=":", label=f"global best {best_phi:.3f}")
    ax.axhline(phi_start, color="gray", ls=":", lw=0.8, label=f"start {phi_start:.3f}")
    ax.set_xlabel("environment transitions (samples)")
    ax.set_ylabel(r"exact $\Phi(x)$ ($\tau = 0$)")
    ax.set_title("GridWorld goal placement: mean over seeds, band = min..max")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_heatmaps(problem: GoalProblem, finals: dict[str, np.ndarray], path: str) -> None:
    """One panel per final x: occupancy of pi*_0(x) (colour), hazards (red), target (green),
    walls (black), start (white S) and the goal placement (star / placement weights)."""
    grid = problem.grid
    n_rows, n_cols = grid.shape
    k = len(finals)
    cols = min(k, 4)
    rows = (k + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.3 * rows), squeeze=False)
    for ax, (name, x) in zip(axes.flat, finals.items()):
        pi = problem.lower_policy(x, 0.0)
        d = occupancy(problem.mdp, pi).reshape(n_rows, n_cols)
        ax.imshow(np.log10(d + 1e-4), cmap="Blues", vmin=-4, vmax=0)
        for mask, color in ((grid.hazard, "red"), (grid.target, "green")):
            for r, c in grid.coords[mask]:
                ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, ec=color, lw=1.5))
        for r, c in grid.coords[grid.wall]:
            ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, color="black"))
        for r, c in grid.coords[grid.mdp.rho > 0]:
            ax.text(c, r, "S", ha="center", va="center", color="orange", fontsize=9, weight="bold")
        if problem.parameterization == "position":
            ax.plot(x[1], x[0], marker="*", color="gold", mec="k", ms=14)
        else:
            w = problem.goal_weights(x)
            ax.scatter(grid.coords[:, 1], grid.coords[:, 0], s=300 * w / w.max(), c="gold", edgecolors="k")
        ax.set_title(f"{name}\nPhi = {float(problem.phi(x)):.3f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[k:]:
        ax.axis("off")
    fig.suptitle("log10 occupancy of the induced policy; red = hazard, green = target, star = goal", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
