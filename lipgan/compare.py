"""Compare Lipschitz methods side by side: train every method x seed, evaluate, report.

`run_compare(CompareConfig(...))` fills one folder::

    OUT/compare.json            what was asked (methods, seeds, budget or steps, training flags)
    OUT/runs/<method>-seed<k>/  one run folder per method and seed (the lipgan.runs layout)
    OUT/results.csv             one row per run: state, steps, time per step, bounds, eval.json
    OUT/report.html             the lipgan.report page of all runs

Every run gets the same budget: the same wall-clock time (``budget_s``, the fair comparison when
methods differ in cost per step, as a gradient penalty's double backward does) or the same number
of generator steps (``steps``). Each finished run is scored by ``lipgan.metrics.evaluate`` on
``eval_n`` generated samples (same latent seed for every run) against the test set.

Running it again on the same folder resumes: a run whose status.json says ``done`` is kept, one
that was interrupted (``running``) resumes from its last checkpoint with what is left of its
budget, a missing one is trained; a ``failed`` run (a non-finite loss) is kept and reported with
its reason, unless ``retry_failed`` moves it aside and trains it again.

With ``jobs`` > 1 the runs are trained ``jobs`` at a time, each in a worker process limited to
``cpu_count // jobs`` torch threads (or the ``threads`` training option); the main process logs
their progress and rewrites results.csv as each one ends.
"""

from __future__ import annotations

import csv
import json
import math
import os
import queue
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lipgan.errors import LipganError

#: The methods compared by default: one per way of making the critic Lipschitz, plus the
#: unconstrained non-saturating GAN as the control (sagan differs in architecture and loss too,
#: and l2 is weight decay; both can be added with ``methods``).
DEFAULT_METHODS = ("wgan-clip", "wgan-gp", "wgan-lp", "sn", "snr", "frobenius", "gan")

#: Training flags passed on to every run unchanged (None: the trainer's default).
TRAIN_FLAGS = ("model", "width", "batch_size", "device", "precision", "dataset")


@dataclass
class CompareConfig:
    """What to compare. Exactly one of ``budget_s`` and ``steps`` bounds each run."""

    out: str
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    seeds: int = 2
    budget_s: float | None = None
    steps: int | None = None
    model: str | None = None
    width: int | None = None
    batch_size: int | None = None
    device: str | None = None
    precision: str | None = None
    dataset: str | None = None
    #: other TrainConfig fields for every run (e.g. {"threads": 1, "fid_every": 500})
    train_options: dict = field(default_factory=dict)
    eval_n: int = 10000
    evaluate: bool = True
    retry_failed: bool = False
    quiet: bool = False
    #: runs trained at the same time, each in its own process (1: one after the other, in-process)
    jobs: int = 1

    def train_flags(self) -> dict:
        """Every TrainConfig field compare sets the same for all runs."""
        flags = {k: getattr(self, k) for k in TRAIN_FLAGS if getattr(self, k) is not None}
        return {**flags, **self.train_options}


@dataclass
class RunPlan:
    method: str
    seed: int
    path: Path
    action: str = "train"  # train | resume | keep


# --------------------------------------------------------------------------- parsing

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|sec|m|min|h|hr)?\s*$", re.IGNORECASE)


def parse_duration(text: str | float | int) -> float:
    """Seconds in ``"20m"``, ``"90s"``, ``"1.5h"`` or a plain number of seconds."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        m = _DURATION.match(str(text))
        if not m:
            raise LipganError(
                f"cannot read the duration {text!r}; write it like 20m, 90s, 1.5h or 300"
            )
        unit = (m.group(2) or "s").lower()[0]
        seconds = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[unit]
    if not seconds > 0 or not math.isfinite(seconds):
        raise LipganError(f"the budget must be a positive duration, got {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _check(cfg: CompareConfig) -> None:
    if (cfg.budget_s is None) == (cfg.steps is None):
        raise LipganError("give exactly one of --budget (wall time per run) and --steps")
    if cfg.steps is not None and cfg.steps < 1:
        raise LipganError(f"--steps must be at least 1, got {cfg.steps}")
    if cfg.seeds < 1:
        raise LipganError(f"--seeds must be at least 1, got {cfg.seeds}")
    if isinstance(cfg.jobs, bool) or not isinstance(cfg.jobs, int) or cfg.jobs < 1:
        raise LipganError(
            f"--jobs must be a whole number of runs at a time, 1 or more (1: one after the "
            f"other), got {cfg.jobs!r}"
        )
    if not cfg.methods:
        raise LipganError("no methods to compare; pass --methods wgan-gp,sn,...")
    if len(set(cfg.methods)) != len(cfg.methods):
        raise LipganError(f"a method is listed twice in {','.join(cfg.methods)}")
    own = sorted(set(cfg.train_options) & {"method", "seed", "steps", "out", "quiet"})
    if own:
        raise LipganError(
            f"train option(s) {', '.join(own)} are set by compare itself; use --methods, "
            "--seeds, --steps or --budget, --out, --quiet"
        )
    known = _known_methods()
    unknown = [m for m in cfg.methods if m not in known]
    if unknown:
        raise LipganError(
            f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}"
        )
    # Bad training flags fail here, before anything is written, not at the first run.
    from lipgan import gan

    for method in cfg.methods:
        gan.resolve(gan.TrainConfig.from_dict({**cfg.train_flags(), "method": method}))
    gan.resolve_device(cfg.device or "auto")


# --------------------------------------------------------------------------- the trainer

# Only this section knows how a run is made, through lipgan.gan's public API (PRESETS,
# TrainConfig, train); everything else reads run folders.


def _known_methods() -> set[str]:
    from lipgan import gan

    return set(gan.PRESETS)


#: generator steps a budget run may take at most (its bound is the time): more than any reaches
BUDGET_STEP_CAP = 10**8


def budget_slack(budget_s: float) -> float:
    """Time left under which a budget run counts as complete: 3% of the budget, at least 0.5 s."""
    return max(0.03 * budget_s, 0.5)


def _train_config(
    plan: RunPlan, cfg: CompareConfig, steps: int, resume: bool, threads: int | None = None
):
    """The TrainConfig of one chunk: a new run from the preset and the training flags, or, to
    resume, the run's own config.yaml with only ``steps`` changed (as `lipgan train --resume`).
    ``threads`` (a worker's share of the CPU with ``jobs`` > 1) overrides both."""
    from lipgan import gan, runs

    own = {} if threads is None else {"threads": int(threads)}
    if resume:
        base = runs.Run(plan.path).read_config()
        base.update(out=str(plan.path), steps=int(steps), quiet=cfg.quiet, **own)
        return gan.TrainConfig.from_dict(base)
    return gan.TrainConfig.from_dict(
        {
            **cfg.train_flags(),
            **own,
            "method": plan.method,
            "seed": plan.seed,
            "steps": int(steps),
            "out": str(plan.path),
            "quiet": cfg.quiet,
        }
    )


def _train_one(
    plan: RunPlan,
    cfg: CompareConfig,
    say: Callable[[str], None],
    threads: int | None = None,
    stream=None,
) -> None:
    """Train or resume one run to its bound; the trainer writes everything in the folder.
    ``threads`` and ``stream`` (the trainer's progress lines) are set in worker processes only."""
    from lipgan import gan

    resume = plan.action == "resume"
    if cfg.steps is not None:
        kw = {} if stream is None else {"stream": stream}
        gan.train(_train_config(plan, cfg, cfg.steps, resume, threads), resume=resume, **kw)
        return
    _train_budget(plan, cfg, resume, say, threads, stream)


def _train_budget(
    plan: RunPlan,
    cfg: CompareConfig,
    resume: bool,
    say: Callable[[str], None],
    threads: int | None = None,
    stream=None,
) -> None:
    """Train for ``cfg.budget_s`` of the trainer's own wall clock: one run with
    ``max_time_s = budget`` (the time sums over resumes, so an interrupted run resumes with
    the time it has left) and a step cap it never reaches. The end-of-run work (sample grid,
    FID, per-layer norms, checkpoint) happens once, after the budget.
    """
    from lipgan import gan

    tc = _train_config(plan, cfg, BUDGET_STEP_CAP, resume, threads)
    tc = tc.replace(max_time_s=float(cfg.budget_s))
    kw = {} if stream is None else {"stream": stream}
    try:
        gan.train(tc, resume=resume, **kw)
    except gan.TimeLimitReached:
        # Killed after its final checkpoint but before it was marked done: it is complete.
        from lipgan import runs

        st = _status(plan.path)
        runs.Run(plan.path).write_status(
            "done", int(st.get("step") or 0), int(st.get("steps") or 0), float(st["wall_s"])
        )
    status = _status(plan.path)
    say(
        f"step {status.get('step')}, {float(status.get('wall_s') or 0):.1f} s of "
        f"{float(cfg.budget_s):.0f} s"
    )


# --------------------------------------------------------------------------- run folders


def _status(path: Path) -> dict:
    try:
        with open(path / "status.json", encoding="utf-8") as fh:
            value = json.load(fh)
        return value if isinstance(value, dict) else {}
    except (FileNotFoundError, ValueError):
        return {}


def _has_checkpoint(path: Path) -> bool:
    return (path / "checkpoints" / "last.pt").is_file()


def _interrupted(status: dict) -> bool:
    # The trainer records Ctrl-C as failed with reason "interrupted": not a result, resume it.
    return status.get("state") == "failed" and status.get("reason") == "interrupted"


def plan_runs(cfg: CompareConfig) -> list[RunPlan]:
    """One entry per method x seed, with what compare will do to it given the folder's state:
    ``keep`` (done, or failed on its own), ``resume`` (interrupted with a checkpoint, or in
    budget mode done short of the budget), ``train`` (the rest)."""
    root = Path(cfg.out) / "runs"
    plans = []
    for method in cfg.methods:
        for seed in range(cfg.seeds):
            path = root / f"{method}-seed{seed}"
            status = _status(path)
            state = status.get("state")
            short = cfg.budget_s is not None and float(
                status.get("wall_s") or 0.0
            ) < cfg.budget_s - budget_slack(cfg.budget_s)
            if state == "done" and short and _has_checkpoint(path):
                action = "resume"
            elif state == "done":
                action = "keep"
            elif state == "failed" and not _interrupted(status):
                action = "train" if cfg.retry_failed else "keep"
            elif _has_checkpoint(path):
                action = "resume"
            else:
                action = "train"
            plans.append(RunPlan(method, seed, path, action))
    return plans


def _clear_for_training(plan: RunPlan, out: Path) -> None:
    """A fresh start needs an empty folder: a failed run (retry) is moved to OUT/failed/ (kept
    for inspection); the remains of a run killed before its first checkpoint are deleted (they
    hold nothing a resume could use)."""
    if not plan.path.exists():
        return
    status = _status(plan.path)
    if status.get("state") == "failed" and not _interrupted(status):
        dest = out / "failed" / f"{plan.path.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(plan.path, dest)
    else:
        shutil.rmtree(plan.path)


_SETTINGS_FILE = "compare.json"


def _check_settings(cfg: CompareConfig, out: Path) -> None:
    """Resuming with other training flags or another budget would mix unlike runs in one table:
    refuse, and say how to proceed. Methods and seeds may grow (only new runs are trained)."""
    fixed = {
        "budget_s": cfg.budget_s,
        "steps": cfg.steps,
        "train": cfg.train_flags(),
        "eval_n": cfg.eval_n if cfg.evaluate else None,
    }
    path = out / _SETTINGS_FILE
    if path.is_file():
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            before = {}
        diffs = [k for k in ("budget_s", "steps", "train") if before.get(k) != fixed[k]]
        if diffs:
            old = {k: before.get(k) for k in diffs}
            new = {k: fixed[k] for k in diffs}
            raise LipganError(
                f"{out} was started with {json.dumps(old)}, now {json.dumps(new)}; rerun with "
                "the same flags to resume, or choose a new --out"
            )
        methods = list(dict.fromkeys([*before.get("methods", []), *cfg.methods]))
        seeds = max(int(before.get("seeds", 0)), cfg.seeds)
    else:
        methods, seeds = list(cfg.methods), cfg.seeds
    record = {**fixed, "methods": methods, "seeds": seeds, "config": asdict(cfg)}
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- evaluation


def evaluate_run(path: Path, *, n: int, dataset: str, device: str | None = None) -> dict:
    """Generate ``n`` samples from the run's generator (z ~ N(0, I), latent seed 0 for every run,
    so runs are scored on the same draws) and write ``eval.json`` with ``lipgan.metrics``."""
    import torch

    from lipgan import gan, metrics, runs

    gen = runs.load_network(str(path), "generator")
    z_dim = getattr(gen, "z_dim", None)
    if not isinstance(z_dim, int):
        raise LipganError(f"{path}: the generator has no integer z_dim; cannot sample it")
    dev = gan.resolve_device(device or "auto")
    gen = gen.to(dev).eval()
    g = torch.Generator().manual_seed(0)
    parts = []
    with torch.no_grad():
        for start in range(0, n, 500):
            z = torch.randn(min(500, n - start), z_dim, generator=g)
            parts.append(gen(z.to(dev)).float().cpu())
    res = metrics.evaluate(torch.cat(parts), dataset=dataset, n=n)
    tmp = path / "eval.json.tmp"
    tmp.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path / "eval.json")
    return res


def _needs_eval(path: Path, n: int) -> bool:
    try:
        return json.loads((path / "eval.json").read_text(encoding="utf-8")).get("n") != n
    except (FileNotFoundError, ValueError, AttributeError):
        return True


# --------------------------------------------------------------------------- results


def write_results(plans: Sequence[RunPlan], out: Path) -> Path:
    """results.csv: one row per planned run that has a folder (see lipgan.report.run_row)."""
    from lipgan import report

    rows = [report.run_row(report.load_run(p.path)) for p in plans if report.is_run_folder(p.path)]
    path = out / "results.csv"
    tmp = path.with_name(path.name + ".tmp")
    columns = list(rows[0]) if rows else ["run", "method", "seed", "state"]
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        for row in rows:
            w.writerow({k: "" if v is None else v for k, v in row.items()})
    os.replace(tmp, path)
    return path


def write_report(plans: Sequence[RunPlan], cfg: CompareConfig, out: Path) -> Path | None:
    from lipgan import report

    paths = [p.path for p in plans if report.is_run_folder(p.path)]
    if not paths:
        return None
    bound = f"{format_duration(cfg.budget_s)} per run" if cfg.budget_s else f"{cfg.steps} G steps"
    title = f"lipgan compare: {out.name} ({bound}, {cfg.seeds} seed(s))"
    return report.build_report(paths, out / "report.html", title=title, order=cfg.methods)


# --------------------------------------------------------------------------- the driver


def run_compare(
    cfg: CompareConfig, *, log: Callable[[str], None] | None = None
) -> dict[str, Path | None]:
    """Train what is missing, evaluate what is finished, write results.csv and report.html.

    Returns ``{"results": path, "report": path or None}``. A run that raises is recorded as
    failed by the trainer and does not stop the others; KeyboardInterrupt stops the comparison
    (the interrupted run resumes next time). With ``cfg.jobs`` > 1 the runs go to a pool of
    worker processes (see :func:`_run_parallel`); the outcome is the same.
    """
    _check(cfg)
    log = log or (lambda msg: None if cfg.quiet else print(msg, file=sys.stderr, flush=True))
    out = Path(cfg.out)
    _check_settings(cfg, out)
    plans = plan_runs(cfg)
    todo = [p for p in plans if p.action != "keep"]
    per_run = f"{format_duration(cfg.budget_s)} each" if cfg.budget_s else f"{cfg.steps} steps each"
    rounds = math.ceil(len(todo) / cfg.jobs)  # runs of equal length, jobs at a time
    est = f", about {format_duration(cfg.budget_s * rounds)}" if cfg.budget_s and todo else ""
    at_a_time = f", {cfg.jobs} at a time" if cfg.jobs > 1 and todo else ""
    log(
        f"compare: {len(cfg.methods)} method(s) x {cfg.seeds} seed(s) = {len(plans)} runs, "
        f"{per_run}; {len(plans) - len(todo)} kept, "
        f"{sum(p.action == 'resume' for p in todo)} to resume, "
        f"{sum(p.action == 'train' for p in todo)} to train{est}{at_a_time}"
    )
    dataset = cfg.dataset or "mnist"
    can_eval = cfg.evaluate and _metrics_available(dataset, log)
    if cfg.jobs > 1:
        _run_parallel(plans, cfg, out, log, can_eval)
    else:
        for i, plan in enumerate(plans, 1):
            _run_plan(plan, f"[{i}/{len(plans)}] {plan.path.name}", cfg, out, log, can_eval)
            write_results(plans, out)
    results = write_results(plans, out)
    page = write_report(plans, cfg, out)
    log(f"compare: wrote {results}" + (f" and {page}" if page else ""))
    return {"results": results, "report": page}


def _run_plan(
    plan: RunPlan,
    tag: str,
    cfg: CompareConfig,
    out: Path,
    log: Callable[[str], None],
    can_eval: bool,
    threads: int | None = None,
    stream=None,
) -> None:
    """Everything compare does to one planned run: train or resume it (or keep it), then
    evaluate it when it is done and has no eval.json of ``cfg.eval_n`` samples. The serial loop
    and every worker process run this."""
    if plan.action == "keep":
        log(f"{tag}: {_status(plan.path).get('state')}, kept")
    else:
        if plan.action == "train":
            _clear_for_training(plan, out)
        log(f"{tag}: {plan.action}")
        try:
            _train_one(plan, cfg, lambda msg: log(f"{tag}: {msg}"), threads, stream)
        except LipganError as exc:
            # A run the trainer stopped and recorded as failed (a non-finite loss) is a
            # result; anything else (a bad flag) would fail every run alike: stop here.
            if _status(plan.path).get("state") != "failed":
                raise
            log(f"{tag}: {exc}")
        status = _status(plan.path)
        reason = f" ({status['reason']})" if status.get("reason") else ""
        log(
            f"{tag}: {status.get('state')}{reason}, {status.get('step')} steps in "
            f"{float(status.get('wall_s') or 0):.1f} s"
        )
    if can_eval and _status(plan.path).get("state") == "done":
        if _needs_eval(plan.path, cfg.eval_n):
            t0 = time.perf_counter()
            res = evaluate_run(
                plan.path, n=cfg.eval_n, dataset=cfg.dataset or "mnist", device=cfg.device
            )
            took = time.perf_counter() - t0
            log(f"{tag}: FID {res['fid']:.2f} (n {cfg.eval_n}, evaluated in {took:.0f} s)")


def _needs_work(plan: RunPlan, cfg: CompareConfig, can_eval: bool) -> bool:
    """Whether a plan is trained (or resumed), or is kept but still needs its evaluation."""
    return plan.action != "keep" or (
        can_eval
        and _status(plan.path).get("state") == "done"
        and _needs_eval(plan.path, cfg.eval_n)
    )


# --------------------------------------------------------------------------- parallel runs

#: Seconds the workers get to stop on their own (a Ctrl-C in a terminal reaches them all) before
#: the main process interrupts them itself.
STOP_GRACE_S = 3.0


def worker_threads(cfg: CompareConfig) -> int:
    """Torch threads per worker: the ``threads`` training option if set (> 0), else an equal
    share of the CPUs, ``cpu_count // jobs`` (at least 1)."""
    threads = cfg.train_options.get("threads")
    if isinstance(threads, int) and not isinstance(threads, bool) and threads > 0:
        return threads
    return max(1, (os.cpu_count() or 1) // cfg.jobs)


class _LineStream:
    """A text stream for the trainer's progress lines in a worker: each complete line goes to
    ``send`` (not a terminal, so the trainer prints a line every 5% instead of redrawing)."""

    def __init__(self, send: Callable[[str], None]) -> None:
        self.send, self.buf = send, ""

    def write(self, text: str) -> int:
        self.buf += text
        *lines, self.buf = self.buf.split("\n")
        for line in lines:
            line = line.rsplit("\r", 1)[-1].strip()
            if line:
                self.send(line)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


# A worker process's end of the pool: set by _worker_init.
_WORKER: dict = {}


def _worker_init(threads: int, messages, stop) -> None:
    """Runs once in each worker: limit torch's threads, keep the message queue and the stop
    flag, and ignore Ctrl-C while idle (a run in progress takes it: see _work)."""
    import torch

    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER.update(threads=threads, messages=messages, stop=stop)
    messages.put(("pid", os.getpid()))


def _work(plan: RunPlan, tag: str, cfg: CompareConfig, out: Path, can_eval: bool) -> bool:
    """One planned run in a worker process, as the serial loop does it (_run_plan); log lines go
    to the main process. False when the comparison was stopped before it began."""
    messages = _WORKER["messages"]

    def say(msg: str) -> None:
        messages.put(("log", msg))

    # Ctrl-C first, then the stop flag: the main process sets the flag before it interrupts.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if _WORKER["stop"].is_set():
            return False
        stream = _LineStream(lambda line: say(f"{tag}: {line}"))
        _run_plan(plan, tag, cfg, out, say, can_eval, _WORKER["threads"], stream)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return True


def _run_parallel(
    plans: Sequence[RunPlan],
    cfg: CompareConfig,
    out: Path,
    log: Callable[[str], None],
    can_eval: bool,
) -> None:
    """Run the plans that need work in ``cfg.jobs`` worker processes ("spawn": safe with CUDA
    and threads), each limited to :func:`worker_threads` threads; results.csv is rewritten as
    each run ends (without the runs not finished yet). A failed run is a result, as in serial;
    any other error, or KeyboardInterrupt, stops the rest (pending runs are cancelled, running
    ones interrupted: they resume next time) and is raised here. The workers are started the
    "spawn" way, so a script that calls run_compare with jobs > 1 needs the usual
    ``if __name__ == "__main__":`` guard."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    n = len(plans)
    work = []
    for i, plan in enumerate(plans, 1):
        tag = f"[{i}/{n}] {plan.path.name}"
        if _needs_work(plan, cfg, can_eval):
            work.append((plan, tag))
        else:
            _run_plan(plan, tag, cfg, out, log, can_eval)  # kept, nothing to do: one log line
    if not work:
        return
    ctx = multiprocessing.get_context("spawn")
    messages, stop = ctx.Queue(), ctx.Event()
    lines: queue.SimpleQueue = queue.SimpleQueue()
    pids: set[int] = set()

    def receive() -> None:  # a thread: keeps the workers' queue drained until the pool is down
        while True:
            item = messages.get()
            if item is None:
                return
            kind, value = item
            if kind == "pid":
                pids.add(value)
            else:
                lines.put(value)

    def flush() -> None:
        while True:
            try:
                msg = lines.get_nowait()
            except queue.Empty:
                return
            log(msg)

    receiver = threading.Thread(target=receive, name="lipgan-compare-log", daemon=True)
    receiver.start()
    pool = ProcessPoolExecutor(
        max_workers=min(cfg.jobs, len(work)),
        mp_context=ctx,
        initializer=_worker_init,
        initargs=(worker_threads(cfg), messages, stop),
    )
    busy: dict = {}
    # Ctrl-C becomes a flag the loop polls: a KeyboardInterrupt raised asynchronously inside
    # concurrent.futures' wait() can leave a future's lock held, and the shutdown then hangs
    # (seen once in the tests). Only the main thread can install a handler.
    interrupted = threading.Event()
    installed, previous = False, None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.set())
        installed = True
    try:
        try:
            for plan, tag in work:
                busy[pool.submit(_work, plan, tag, cfg, out, can_eval)] = plan
            while busy:
                done, _ = wait(list(busy), timeout=0.2, return_when=FIRST_COMPLETED)
                flush()
                if interrupted.is_set():
                    raise KeyboardInterrupt
                for fut in [f for f in busy if f in done]:
                    busy.pop(fut)
                    try:
                        fut.result()
                    except BrokenProcessPool:
                        raise LipganError(
                            "a worker process died (killed, out of memory?); run the same "
                            "command again to resume, maybe with a smaller --jobs (a script "
                            "that calls run_compare needs `if __name__ == '__main__':`)"
                        ) from None
                    running = {p.path for p in busy.values()}
                    write_results([p for p in plans if p.path not in running], out)
        except BaseException:
            _stop_workers(pool, busy, stop, pids, flush)
            raise
        pool.shutdown(wait=True)
    finally:
        if installed:
            restore = signal.default_int_handler if previous is None else previous
            signal.signal(signal.SIGINT, restore)
        messages.put(None)
        receiver.join(timeout=10)
        flush()


def _stop_workers(pool, busy: dict, stop, pids: set[int], flush: Callable[[], None]) -> None:
    """Cancel what has not started; give the runs in progress STOP_GRACE_S to stop on their own
    (a Ctrl-C in a terminal reaches every worker), then interrupt them: the trainer records an
    interrupted run, which the next compare resumes. Then shut the pool down."""
    from concurrent.futures import wait

    stop.set()
    for fut in busy:
        fut.cancel()
    running = [f for f in busy if not f.done()]
    if running:
        wait(running, timeout=STOP_GRACE_S)
        if any(not f.done() for f in running) and os.name == "posix":
            for pid in list(pids):
                try:
                    os.kill(pid, signal.SIGINT)
                except (ProcessLookupError, PermissionError):
                    pass
    pool.shutdown(wait=True, cancel_futures=True)
    flush()


def _metrics_available(dataset: str, log) -> bool:
    try:
        from lipgan import metrics

        ok = metrics.available(dataset)
    except ImportError:
        ok = False
    if not ok:
        log(f"compare: no shipped feature extractor for {dataset}; runs are not evaluated")
    return ok
