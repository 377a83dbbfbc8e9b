"""ms per generator step: lipgan's trainer against a plain-PyTorch WGAN-GP loop, in one process.

    .venv/bin/python benchmarks/train_speed.py [--steps 20] [--rounds 3] [--threads 0]

The reference is the straightforward loop most WGAN-GP code uses (it follows the official
gan_mnist.py): a DataLoader over a TensorDataset, separate critic forwards for real and fake,
the fake made by the generator with autograd on and then detached, the gradient penalty with one
alpha per sample, Adam 1e-4 betas (0.5, 0.9), n_critic 5, lambda 10, fp32. Both sides train the
same dcgan28 networks (width 64, batch 64) from the same initial weights.

1. Equivalence: lipgan's fp32 critic and generator steps, fed the same weights, batches, z and
   alpha as the reference, give the same W, critic and generator losses (relative 1e-4) over the
   first generator steps.
2. Speed: reference and lipgan runs alternate in rounds of ``--steps`` generator steps; lipgan
   runs through its full training session (metrics.csv, TensorBoard, gradient norms every 100
   steps: the defaults) into a temporary run folder. Median ms per generator step per side.
   Rows: lipgan's default precision (``auto``: bf16 + channels-last where the CPU has native
   bf16, else fp32) and its fp32 mode; the same for the ``sn`` method against the reference
   wgan-gp.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lipgan import data, models  # noqa: E402
from lipgan.gan import GANTrainer, Session, TrainConfig  # noqa: E402

LAMBDA = 10.0
N_CRITIC = 5


# --------------------------------------------------------------------------- the reference


def reference_gp(critic, real, fake, alpha):
    """The usual WGAN-GP penalty: lambda * mean((||grad_x D(x_hat)||_2 - 1)^2)."""
    x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    out = critic(x_hat)
    (grad,) = torch.autograd.grad(out, x_hat, torch.ones_like(out), create_graph=True)
    return LAMBDA * ((grad.view(grad.size(0), -1).norm(2, dim=1) - 1) ** 2).mean()


class Reference:
    """A plain WGAN-GP training loop (fp32), one generator step per ``step()`` call."""

    def __init__(self, G, D, images_float, batch, seed=0):
        self.G, self.D, self.batch = G, D, batch
        self.opt_g = torch.optim.Adam(G.parameters(), lr=1e-4, betas=(0.5, 0.9))
        self.opt_d = torch.optim.Adam(D.parameters(), lr=1e-4, betas=(0.5, 0.9))
        loader = DataLoader(
            TensorDataset(images_float),
            batch_size=batch,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(seed),
        )
        self.loader = loader
        self.it = iter(loader)

    def next_real(self):
        try:
            return next(self.it)[0]
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)[0]

    def critic_step(self, real, z, alpha):
        for p in self.D.parameters():
            p.requires_grad = True
        self.D.zero_grad()
        fake = self.G(z).detach()
        d_real = self.D(real).mean()
        d_fake = self.D(fake).mean()
        gp = reference_gp(self.D, real, fake, alpha)
        loss = d_fake - d_real + gp
        loss.backward()
        self.opt_d.step()
        return {"wasserstein": (d_real - d_fake).item(), "loss_d": loss.item()}

    def generator_step(self, z):
        for p in self.D.parameters():
            p.requires_grad = False
        self.G.zero_grad()
        loss = -self.D(self.G(z)).mean()
        loss.backward()
        self.opt_g.step()
        return {"loss_g": loss.item()}

    def step(self):
        b = self.batch
        for _ in range(N_CRITIC):
            real = self.next_real()
            self.critic_step(real, torch.randn(b, 128), torch.rand(b, 1, 1, 1))
        self.generator_step(torch.randn(b, 128))


# --------------------------------------------------------------------------- checks


def equivalence(images, width, batch, gsteps=3, tol=1e-4) -> float:
    """Largest relative difference of W, loss_d, loss_g between lipgan fp32 and the reference."""
    cfg = TrainConfig(method="wgan-gp", width=width, batch_size=batch, precision="fp32")
    lip = GANTrainer(cfg, images)
    G = models.build("generator", "dcgan28", width=width)
    D = models.build("critic", "dcgan28", width=width)
    G.load_state_dict(lip.generator.state_dict())
    D.load_state_dict(lip.critic.state_dict())
    real_f = images[:1024].float().mul(2 / 255).sub(1)
    ref = Reference(G, D, real_f, batch)
    feed = torch.Generator().manual_seed(123)
    worst = 0.0

    def rel(a, b):
        return abs(a - b) / max(abs(b), 1e-6)

    for g in range(gsteps):
        for c in range(N_CRITIC):
            idx = torch.randint(len(real_f), (batch,), generator=feed)
            real = real_f[idx]
            z = torch.randn(batch, 128, generator=feed)
            seed = 1000 * g + c
            torch.manual_seed(seed)  # alpha: the first global draw of both penalties
            r = ref.critic_step(real, z, torch.rand(batch, 1, 1, 1))
            torch.manual_seed(seed)
            out = lip.critic_step(real, lip.make_fakes(z))
            for k in ("wasserstein", "loss_d"):
                worst = max(worst, rel(out[k].item(), r[k]))
        z = torch.randn(batch, 128, generator=feed)
        r = ref.generator_step(z)
        out = lip.generator_step(z)
        worst = max(worst, rel(out["loss_g"].item(), r["loss_g"]))
    if worst > tol:
        raise SystemExit(f"lipgan fp32 and the reference differ: relative {worst:.2e} > {tol}")
    return worst


def time_steps(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn(n)
    return 1000 * (time.perf_counter() - t0) / n


def speed(images, args, method: str, precision: str, channels_last, tmp: str) -> dict:
    """Alternate reference and lipgan in rounds; median ms per generator step of each."""
    cfg = TrainConfig(
        method=method,
        width=args.width,
        batch_size=args.batch,
        precision=precision,
        channels_last=channels_last,
        steps=10**9,  # no end-of-run work inside the timing
        out=f"{tmp}/{method}-{precision}-{channels_last}",
        quiet=True,
        fid_every=-1,  # no FID extractor cost in a speed test
    )
    sess = Session(cfg, images=images)
    G = models.build("generator", "dcgan28", width=args.width)
    D = models.build("critic", "dcgan28", width=args.width)
    ref = Reference(G, D, images.float().mul(2 / 255).sub(1), args.batch)

    def run_lip(n):
        sess.run(sess.trainer.step + n)

    def run_ref(n):
        for _ in range(n):
            ref.step()

    run_ref(2)
    run_lip(2)  # warm-up: allocator, oneDNN primitive caches
    t_ref, t_lip = [], []
    for _ in range(args.rounds):
        t_ref.append(time_steps(run_ref, args.steps))
        t_lip.append(time_steps(run_lip, args.steps))
    sess.close()
    c = sess.cfg  # resolved: what actually ran
    label = c.precision + (" + channels_last" if c.channels_last else "")
    if precision == "auto":
        label = f"default ({label})"
    return {"ref": statistics.median(t_ref), "lip": statistics.median(t_lip), "label": label}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="generator steps per round and side")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--only", default=None, help="comma list of rows to run (e.g. gp-fp32,sn-bf16)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = data.load("mnist").train_images

    worst = equivalence(images, args.width, args.batch)
    print("equivalence: lipgan wgan-gp fp32 vs reference, 3 generator steps (15 critic steps):")
    print(f"  largest relative difference of W / loss_d / loss_g = {worst:.2e} (limit 1e-4)")

    # "auto" rows are lipgan's default (TrainConfig.precision = "auto", channels_last None): bf16
    # + channels-last on a CPU with native bf16, else fp32; the label says what it resolved to.
    rows = [
        ("gp-default", "wgan-gp", "auto", None),
        ("gp-fp32", "wgan-gp", "fp32", False),
        ("sn-default", "sn", "auto", None),
        ("sn-fp32", "sn", "fp32", False),
    ]
    if args.only:
        keep = set(args.only.split(","))
        rows = [r for r in rows if r[0] in keep]
    print(
        f"\nms per generator step, dcgan28 width {args.width}, batch {args.batch}, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} rounds x {args.steps} steps"
    )
    print(f"{'lipgan method':<16}{'precision':<32}{'reference':>11}{'lipgan':>9}{'speed-up':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for _, method, precision, cl in rows:
            r = speed(images, args, method, precision, cl, tmp)
            print(
                f"{method:<16}{r['label']:<32}{r['ref']:>11.0f}{r['lip']:>9.0f}"
                f"{r['ref'] / r['lip']:>9.2f}x",
                flush=True,
            )
    print("reference = plain PyTorch WGAN-GP, fp32 (DataLoader, separate forwards)")


if __name__ == "__main__":
    main()
