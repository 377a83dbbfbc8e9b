"""Classify run folders: train a classifier, measure it, write it down.

:func:`lipgan.train.classifier.train` fits a small classifier with one of the Lipschitz methods
of :mod:`lipgan.constraints`; :func:`lipgan.classify.measure.evaluate` measures every link of the
generalization study's chain on the trained network; :func:`run` does both and writes a run
folder:

    RUN/config.yaml                 the resolved :class:`ClassifyConfig`
    RUN/results.json                every measurement (see :func:`evaluate`), training history
    RUN/classifier.safetensors      the trained network, plain weights, self-describing metadata

A folder that already holds files is refused unless ``overwrite`` (a classify run only).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from lipgan.classify.measure import (  # noqa: F401  (the measurements' public names, here too)
    GLORO_MNIST,
    accuracy_and_loss,
    attack_l2,
    certify,
    evaluate,
    generalization_gap,
    summary,
)
from lipgan.errors import LipganError
from lipgan.runs import Export, RunFolder, atomic_write_text
from lipgan.runs.files import read_text
from lipgan.train.classifier import (  # noqa: F401  (the trainer's public names, here too)
    Trained,
    build_model,
    load_classifier,
    load_data,
    pairwise_head_constants,
    plain_copy,
    save_classifier,
    train,
    unit_pixels,
)
from lipgan.train.classifier_config import (  # noqa: F401
    PRESETS,
    TRAINING_FIELDS,
    ClassifyConfig,
    make_constraint,
    method_names,
    preset,
)

#: what a classify run folder holds (besides the lock and partial files)
_RUN_FILES = ("config.yaml", "results.json", "classifier.safetensors", "manifest.json")


def _make_way(run: RunFolder, overwrite: bool) -> None:
    """Refuse a folder that already holds files, unless ``overwrite`` and they are a classify
    run's: then they go first (under the folder's lock), so no stale result outlives a rerun."""
    out = run.path
    if out.exists() and not out.is_dir():
        raise LipganError(f"{out} is a file; choose another --out")
    held = sorted(p.name for p in out.iterdir() if p.name != ".lock") if out.exists() else []
    held = [n for n in held if not n.endswith(".part")]
    if not held:
        return
    foreign = [n for n in held if n not in _RUN_FILES]
    if foreign or "config.yaml" not in held:
        raise LipganError(
            f"{out} holds {', '.join((foreign or held)[:3])} and is not a classify run; choose "
            "another --out"
        )
    if not overwrite:
        raise LipganError(
            f"{out} already holds a classify run; choose another --out, or pass --overwrite to "
            "replace it (--reevaluate measures it again without training)"
        )
    run.lock()
    for name in held:
        (out / name).unlink()


def run(
    cfg: ClassifyConfig, log: Callable[[str], None] | None = print, *, overwrite: bool = False
) -> dict:
    """Train, evaluate and (with ``cfg.out``) write the run folder; returns the results dict.
    A folder already holding files is refused (a classify run's are replaced with
    ``overwrite``); the folder is locked while it is written (one writer)."""
    cfg = cfg.resolved()
    folder = RunFolder(cfg.out) if cfg.out else None
    try:
        if folder is not None:
            _make_way(folder, overwrite)
            folder.create(asdict(cfg))
        results, tr = _train_and_measure(cfg, log)
        if folder is not None:
            folder.write_exports({"classifier": Export(tr.plain, cfg.model, tr.kwargs)})
            atomic_write_text(folder.path / "results.json", json.dumps(results, indent=2))
    finally:
        if folder is not None:
            folder.close()
    return results


def _train_and_measure(
    cfg: ClassifyConfig, log: Callable[[str], None] | None
) -> tuple[dict, Trained]:
    t0 = time.perf_counter()
    tr = train(cfg, log=log)
    results: dict = {
        "config": asdict(cfg),
        "history": tr.history,
        "train_s": tr.train_s,
        "n_train": int(tr.train_y.shape[0]),
        "n_test": int(tr.test_y.shape[0]),
    }
    if cfg.evaluate:
        results.update(evaluate(tr.plain, cfg, tr.train_x, tr.train_y, tr.test_x, tr.test_y, log))
        results["summary"] = summary(results)
    else:
        results["accuracy"] = generalization_gap(
            tr.plain, tr.train_x, tr.train_y, tr.test_x, tr.test_y
        )
    results["wall_s"] = time.perf_counter() - t0
    return results, tr


def reevaluate(
    run_dir: str | Path,
    log: Callable[[str], None] | None = None,
    overrides: dict | None = None,
) -> dict:
    """Measure a finished run folder again (same subset, same seed) without retraining.

    Reads ``config.yaml`` and ``classifier.safetensors``, reruns :func:`evaluate` with the
    evaluation options in ``overrides`` (eval_n, eps, pgd_steps, ...) and rewrites
    ``results.json`` (and ``config.yaml``) keeping the training history and time.
    """
    folder = RunFolder(run_dir)
    res_path = folder.path / "results.json"
    if not folder.config_path.is_file() or not res_path.is_file():
        raise LipganError(f"{run_dir}: not a finished classify run (config.yaml, results.json)")
    raw = folder.read_config()
    raw.pop("lipsdp_time", None)  # older runs recorded it; LipSDP now stops on iteration counts
    for key in overrides or {}:
        if key in TRAINING_FIELDS:
            raise LipganError(f"{key} changes training; train a new run instead")
    raw.update(overrides or {})
    cfg = ClassifyConfig.from_dict(raw).resolved()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = folder.load_export("classifier")
    for p in model.parameters():
        p.requires_grad_(False)
    ds, tr_x, tr_y = load_data(cfg)
    old = json.loads(read_text(res_path))
    t0 = time.perf_counter()
    res = {k: old[k] for k in ("history", "train_s", "n_train", "n_test") if k in old}
    res["config"] = asdict(cfg)
    test_x = unit_pixels(ds.test_images)
    res.update(evaluate(model, cfg, unit_pixels(tr_x), tr_y, test_x, ds.test_labels, log))
    res["summary"] = summary(res)
    res["wall_s"] = old.get("train_s", 0.0) + (time.perf_counter() - t0)
    with folder.lock():
        if overrides:
            folder.write_config(asdict(cfg))
        atomic_write_text(res_path, json.dumps(res, indent=2))
    return res
