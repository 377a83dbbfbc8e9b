"""Generator steps per second of lipgan's trainer on one device (for the GPU table of issue 9).

    python benchmarks/gpu_speed.py [--device cuda] [--steps 200] [--warmup 20]

dcgan28, width 64, batch 64, n_critic 5 (the presets'), methods wgan-gp and sn, fp32 and bf16
autocast. Times ``GANTrainer.train_step`` alone (no logging), with the device synchronized before
and after, so the figure is the step arithmetic; the median over 3 rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lipgan import data  # noqa: E402
from lipgan.gan import GANTrainer, TrainConfig  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steps_per_second(method: str, precision: str, args) -> float:
    cfg = TrainConfig(
        method=method,
        model="dcgan28",
        width=64,
        batch_size=64,
        device=args.device,
        precision=precision,
        quiet=True,
        tensorboard=False,
    )
    images = data.load("mnist").train_images
    trainer = GANTrainer(cfg, images)
    for _ in range(args.warmup):
        trainer.train_step()
    rates = []
    for _ in range(3):
        sync(trainer.device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            out = trainer.train_step()
        float(out["wasserstein"]) if "wasserstein" in out else None
        sync(trainer.device)
        rates.append(args.steps / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    args = p.parse_args()
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}")
    print("| method | precision | generator steps/s | ms per generator step |")
    print("|---|---|---|---|")
    for method in ("wgan-gp", "sn"):
        for precision in ("fp32", "bf16"):
            r = steps_per_second(method, precision, args)
            print(f"| {method} | {precision} | {r:.1f} | {1000 / r:.2f} |")


if __name__ == "__main__":
    main()
