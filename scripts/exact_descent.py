"""Exact hypergradient descent on one instance of the testbed panel from x = 0, with the closed-form hypergradient
(`MultiTokenProblem.exact_hypergradient`), no sampling: plain steps x <- x - lr * grad Phi_tau(x), or Adam's
normalized steps (`--optimizer adam`, as the trainer steps x: torch's AdamW, beta1 0.9, beta2 `--adam_beta2`, no
weight decay). It
shows the landscape a method that follows the hypergradient meets: where Phi_tau is flat, plain steps crawl, while
Adam's keep their size as long as the direction is known.

    python scripts/exact_descent.py --instance 22 --lrs 0.01 0.1 1 --steps 20000
    python scripts/exact_descent.py --instance 22 --optimizer adam --lrs 0.01 --steps 360
    python scripts/exact_descent.py --instance 12 --optimizer adam --lrs 0.01 --steps 360 --adam_beta2 0.999 0.9
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch

from bilevel_rlhf import panel


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--panel", type=int, default=24, help="instances drawn (the panel's size)")
    p.add_argument("--panel_seed", type=int, default=0)
    p.add_argument("--instance", type=int, required=True)
    p.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--weight", type=float, default=0.1, help="objective_weight of win_rate")
    p.add_argument("--optimizer", choices=["gd", "adam"], default="gd", help="plain steps (gd) or Adam's")
    p.add_argument("--adam_beta2", type=float, nargs="+", default=[0.999],
                   help="--optimizer adam: Adam's second-moment decay (each value is a run)")
    args = p.parse_args(argv)
    try:
        spec = panel.drawn_instance(args.panel, args.panel_seed, args.instance)
    except ValueError as e:
        raise SystemExit(f"--{e}") from None
    _, problem = panel.build_instance(spec)
    obj = dict(objective=spec.objective, weight=args.weight)
    phi = lambda x: problem.phi_tau(x, spec.tau, **obj)  # noqa: E731
    grad = lambda x: problem.exact_hypergradient(x, spec.tau, **obj)  # noqa: E731
    print(spec.name if hasattr(spec, "name") else spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        print(f"Phi_tau at x = 0 {phi(np.zeros(len(problem.scores))):.4f}; partial_sgd's fixed point "
              f"{phi(problem.partial_sgd_fixed_point(spec.tau, **obj)):.4f}; optimum "
              f"{phi(problem.exact_optimum(spec.tau, **obj)):.4f}")
        checkpoints = sorted({0, 100, 1000, 5000, args.steps} & set(range(args.steps + 1)))
        rows = []
        runs = [(lr, b2) for lr in args.lrs for b2 in (args.adam_beta2 if args.optimizer == "adam" else [None])]
        for lr, beta2 in runs:
            x = torch.zeros(len(problem.scores), dtype=torch.float64, requires_grad=True)
            adam = None if beta2 is None else torch.optim.AdamW([x], lr=lr, betas=(0.9, beta2), weight_decay=0.0)
            for k in range(args.steps + 1):
                g = grad(x.detach().numpy())
                if k in checkpoints:
                    rows.append({"lr": lr, "adam_beta2": beta2, "step": k, "phi_tau": phi(x.detach().numpy()),
                                 "grad_norm": float(np.linalg.norm(g))})
                if adam is None:
                    with torch.no_grad():
                        x -= lr * torch.from_numpy(g)
                else:
                    x.grad = torch.from_numpy(g)
                    adam.step()
    print("| lr | Adam's beta2 | step | Phi_tau | norm of the hypergradient |\n|---|---|---|---|---|")
    for r in rows:
        beta2 = "-" if r["adam_beta2"] is None else f"{r['adam_beta2']:g}"
        print(f"| {r['lr']:g} | {beta2} | {r['step']} | {r['phi_tau']:.4f} | {r['grad_norm']:.1e} |")
    return rows


if __name__ == "__main__":
    main()
