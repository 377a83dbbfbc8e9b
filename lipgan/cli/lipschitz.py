"""`lipgan lipschitz PATH`: the layer table and the Lipschitz bounds of a saved network."""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser(
        "lipschitz",
        help="layer norms and certified upper / attained lower Lipschitz bounds of a saved model",
    )
    p.add_argument("path", help="a run folder or a lipgan .safetensors export")
    p.add_argument(
        "--which",
        default="critic",
        choices=["critic", "generator", "classifier"],
        help="which network of a run folder (default critic)",
    )
    p.add_argument("--input-shape", help="input shape C,H,W (or N for vectors)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-lower", action="store_true", help="skip the lower bounds")
    p.add_argument(
        "--data",
        help="start the lower-bound search from this dataset's test images (e.g. mnist) "
        "instead of random inputs",
    )
    p.add_argument("--samples", type=int, default=8, help="restarts of the lower-bound search")
    p.add_argument(
        "--lipsdp-iters",
        type=int,
        default=300,
        help="first-order steps per LipSDP-Neuron solve (deterministic: no time budget)",
    )
    p.add_argument("--lipsdp-time", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _shape(text: str | None):
    from lipgan.errors import LipganError

    if text is None:
        return None
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise LipganError(f"--input-shape must look like 1,28,28 or 784, got {text!r}")
    return shape


def _default_shape(net):
    """Vectors: the first Linear's width. Images: lipgan's models are MNIST-sized (C, 28, 28)."""
    from torch import nn

    first = next((m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
    if isinstance(first, nn.Linear):
        return (first.in_features,), None
    if isinstance(first, nn.Conv2d):
        return (first.in_channels, 28, 28), (
            f"input shape assumed {first.in_channels},28,28 (lipgan's image models are "
            "MNIST-sized); pass --input-shape otherwise"
        )
    return None, None


def analyse(net, input_shape=None, lower=True, data=None, samples=8, lipsdp_iters=300, seed=0):
    """The report of :func:`lipgan.lipschitz.estimate` for a loaded network (used by the CLI)."""
    import torch

    from lipgan import lipschitz

    note = None
    if input_shape is None:
        input_shape, note = _default_shape(net)
    x = None
    if lower and data:
        from lipgan import data as data_mod

        images, _ = data_mod.load(data).split("test")
        n = max(samples, 2)
        x = images[:n].float().div(127.5).sub(1.0)  # [-1, 1], as lipgan trains
        if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
            x = x.reshape(n, *input_shape)
    elif lower and input_shape is not None:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(max(samples, 2), *input_shape, generator=g)
    rep = lipschitz.estimate(
        net,
        x,
        input_shape=input_shape,
        lower=lower,
        restarts=samples,
        lipsdp_iters=lipsdp_iters,
        seed=seed,
    )
    if note:
        rep.notes.insert(0, note)
    return rep


def run(args) -> int:
    from lipgan import runs  # lazily: the CLI imports nothing heavy until a command runs

    net = runs.load_network(args.path, args.which)
    rep = analyse(
        net,
        _shape(args.input_shape),
        lower=not args.no_lower,
        data=args.data,
        samples=args.samples,
        lipsdp_iters=args.lipsdp_iters,
        seed=args.seed,
    )
    if args.json:
        print(json.dumps(rep.to_dict(), indent=2, default=float))
    else:
        print(f"{args.path} ({args.which})")
        print(rep)
    return 0
