"""Time to quality: lipgan's best recipe against the textbook WGAN-GP loop on one budget.

    PYTHONPATH=. .venv/bin/python benchmarks/time_to_quality.py [--budget 300] [--clock wall]
        [--threads 2] [--recipe fast-sn-t8] [--eval-n 10000] [--json out.json]

The textbook side is the plain loop most WGAN-GP code uses, after the official ``gan_mnist.py``
of Gulrajani et al. (2017): its networks (lipgan has them as ``dcgan28``, DIM = 64), Adam 1e-4
betas (0.5, 0.9), lambda 10, n_critic 5, batch 64, fp32, separate critic forwards for real and
fake, the fake made with autograd on and detached, no EMA; written here in plain PyTorch.
lipgan's side is a recipe of ``benchmarks/recipe_sweep.py`` (its own short loop: the trainer
gets the EMA and the recipes in issue 19, on top of issue 18's restructuring), sampled from its
EMA generator. Each side trains for ``--budget`` seconds of ``--clock`` (``wall``: the issue's
"same 5 minutes on the same machine", meaningful only on an idle machine; ``cpu``: process CPU
seconds, the fair clock on a shared one), one after the other, then both are scored by
lipgan's eval (:func:`lipgan.metrics.evaluate`, the shipped MNIST extractor, ``--eval-n``
samples against the test set). Prints both FIDs and the ratio lipgan / textbook (issue 19's
target: at most 1/4).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import recipe_sweep as rs  # noqa: E402

from lipgan import data, metrics, models  # noqa: E402


def textbook(budget_s: float, clock: str, seed: int = 0) -> dict:
    """The textbook WGAN-GP loop for ``budget_s`` seconds; returns the generator and counts."""
    torch.manual_seed(seed)
    ds = data.load("mnist")
    x_all = ds.train_images.float() * (2 / 255) - 1  # (60000, 1, 28, 28) in [-1, 1]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_all), batch_size=64, shuffle=True, drop_last=True
    )
    G = models.build("generator", "dcgan28", width=64)
    D = models.build("critic", "dcgan28", width=64)
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-4, betas=(0.5, 0.9))

    def batches():
        while True:
            for (real,) in loader:
                yield real

    it = batches()
    now = time.process_time if clock == "cpu" else time.perf_counter
    cpu0, wall0, start = time.process_time(), time.perf_counter(), now()
    steps = 0
    while now() - start < budget_s:
        for _ in range(5):  # n_critic
            real = next(it)
            fake = G(torch.randn(64, 128)).detach()
            alpha = torch.rand(64, 1, 1, 1)
            x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
            out = D(x_hat)
            (grad,) = torch.autograd.grad(out, x_hat, torch.ones_like(out), create_graph=True)
            gp = 10.0 * ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()
            loss_d = D(fake).mean() - D(real).mean() + gp
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
        loss_g = -D(G(torch.randn(64, 128))).mean()
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        steps += 1
    return dict(
        g=G, steps=steps, cpu_s=time.process_time() - cpu0, wall_s=time.perf_counter() - wall0
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=300.0, help="seconds of training per side")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipe", default="fast-sn-t8", choices=sorted(rs.RECIPES))
    ap.add_argument("--eval-n", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the result here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    r = rs.Recipe(**rs.RECIPES[args.recipe])
    ours = rs.train(r, 10**9, args.seed, budget_s=args.budget, clock=args.clock)
    g_ours = ours["ema"].module if ours["ema"] is not None else ours["g"]
    ref = textbook(args.budget, args.clock, args.seed)
    ev_ours = metrics.evaluate(rs.samples(g_ours, args.eval_n))
    ev_ref = metrics.evaluate(rs.samples(ref["g"], args.eval_n))
    result = {
        "budget_s": args.budget,
        "clock": args.clock,
        "threads": args.threads,
        "eval_n": args.eval_n,
        "lipgan": {
            "recipe": args.recipe,
            "ema": ours["ema"] is not None,
            "steps": ours["steps"],
            "cpu_s": round(ours["cpu_s"], 1),
            "wall_s": round(ours["wall_s"], 1),
            **{k: ev_ours[k] for k in ("fid", "precision", "recall", "classes_covered")},
        },
        "textbook": {
            "steps": ref["steps"],
            "cpu_s": round(ref["cpu_s"], 1),
            "wall_s": round(ref["wall_s"], 1),
            **{k: ev_ref[k] for k in ("fid", "precision", "recall", "classes_covered")},
        },
    }
    result["ratio"] = ev_ours["fid"] / ev_ref["fid"]
    a, b = result["lipgan"], result["textbook"]
    print(
        f"lipgan ({args.recipe}, EMA): FID {a['fid']:.1f}, recall {a['recall']:.2f}, "
        f"{a['classes_covered']} classes, {a['steps']} steps"
    )
    print(
        f"textbook WGAN-GP: FID {b['fid']:.1f}, recall {b['recall']:.2f}, "
        f"{b['classes_covered']} classes, {b['steps']} steps"
    )
    print(
        f"ratio lipgan / textbook: {result['ratio']:.3f} (target <= 0.25) after "
        f"{args.budget:g} {args.clock} seconds each, {args.threads} thread(s)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
