"""One sweep driver: a grid of named config variants x seeds, one run folder per cell.

A *variant* is a name and the config fields it sets (``w64: {method: frobenius, width: 64}``);
the grid crosses the variants with seeds ``0..n-1``, and each cell is one run folder under a
root (``ROOT/<variant>-seed<k>`` by default). The driver knows nothing of what a cell trains:
its user (``lipgan compare``, ``lipgan study``) plans each cell from its folder (``keep``,
``resume`` or ``train``), hands the cells that need work to :func:`run_cells` with a top-level
function that does one cell, and gathers the folders afterwards. So resume is the user's rule
read from the folder, and the driver only decides where and when a cell runs:

* ``jobs == 1``: one after the other, in this process (Ctrl-C is an ordinary KeyboardInterrupt);
* ``jobs > 1``: a :class:`concurrent.futures.ProcessPoolExecutor` with ``jobs`` "spawn" workers
  (no forked torch thread pools or CUDA state), each limited to ``threads`` torch threads; log
  lines travel to this process through a queue; Ctrl-C stops the sweep cleanly (below). A fresh
  interpreter knows lipgan's own constraints only: the constraints a user registered in this
  process reach each worker by reference (their module is imported there, see
  :func:`lipgan.constraints.base.worker_registry`).

Ctrl-C with workers: the main process turns SIGINT into a flag that its loop polls every 0.2 s.
A KeyboardInterrupt raised asynchronously inside ``concurrent.futures.wait`` can leave a
future's lock held, after which the pool's shutdown hangs (seen in lipgan's tests before the
flag). On the flag the driver cancels the cells not started, gives the running ones
:data:`STOP_GRACE_S` to stop on their own (a terminal's Ctrl-C reaches every worker), then
sends each worker SIGINT (so the trainer records the run as interrupted and it resumes next
time), shuts the pool down and raises KeyboardInterrupt. Idle workers ignore SIGINT.
"""

from __future__ import annotations

import csv
import io
import os
import queue
import re
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lipgan.errors import LipganError
from lipgan.train import config

#: Seconds running cells get to stop on their own after Ctrl-C before they are interrupted.
STOP_GRACE_S = 3.0

#: A variant's name becomes part of a folder name: letters, digits and ``._+-`` only.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


# --------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Variant:
    """A named set of config fields; ``options`` maps field names to values."""

    name: str
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise LipganError(
                f"variant name {self.name!r}: use letters, digits and . _ + - only "
                "(it names the run folders)"
            )
        if not isinstance(self.options, dict):
            raise LipganError(f"variant {self.name}: its options must be a mapping KEY: VALUE")


@dataclass
class Cell:
    """One variant at one seed, run in the folder ``path``. ``action`` is the user's plan:
    ``train`` (a new run), ``resume`` (continue the run in ``path``) or ``keep`` (nothing to do).
    """

    variant: str
    seed: int
    options: dict
    path: Path
    action: str = "train"

    @property
    def name(self) -> str:
        return self.path.name


def grid(
    variants: Sequence[Variant],
    seeds: int,
    root: str | Path,
    pattern: str = "{variant}-seed{seed}",
) -> list[Cell]:
    """Every variant x seed ``0..seeds-1``, variant-major, with folders ``root/pattern``."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise LipganError(f"--seeds must be a whole number >= 1, got {seeds!r}")
    names = [v.name for v in variants]
    if not names:
        raise LipganError("no variants to run")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise LipganError(f"variant name(s) given twice: {', '.join(twice)}")
    root = Path(root)
    return [
        Cell(v.name, seed, dict(v.options), root / pattern.format(variant=v.name, seed=seed))
        for v in variants
        for seed in range(seeds)
    ]


# a comma that starts the next `key=`: values may hold commas themselves ([1, 2], a,b lists)
_NEXT_KEY = re.compile(r",(?=\s*[A-Za-z_][\w-]*\s*=)")


def parse_variant(text: str) -> Variant:
    """``NAME:key=value,key=value`` (or just ``NAME``) as a :class:`Variant`."""
    name, _, rest = text.partition(":")
    items = [s for s in _NEXT_KEY.split(rest) if s.strip()] if rest.strip() else []
    return Variant(name.strip(), config.parse_options(items, f"--variant {name.strip()}:"))


def read_variants(path: str | Path) -> list[Variant]:
    """Variants from a YAML file: a mapping ``name: {field: value, ...}``, in file order."""
    data = config.load_yaml(path)
    if not data or not all(isinstance(o, dict) or o is None for o in data.values()):
        raise LipganError(f"{path}: write the variants as a mapping NAME: {{field: value, ...}}")
    return [Variant(str(name), dict(opts or {})) for name, opts in data.items()]


def write_table(path: str | Path, rows: Sequence[dict], columns: Sequence[str] = ()) -> Path:
    """One CSV row per mapping (None as an empty field), columns in order of first appearance
    after ``columns``; written atomically (a reader never sees half a table)."""
    from lipgan.runs import atomic_write_text

    keys = list(dict.fromkeys([*columns, *(k for r in rows for k in r)]))
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r.get(k) for k in keys})
    return atomic_write_text(path, buf.getvalue())


# --------------------------------------------------------------------------- running cells


@dataclass
class Context:
    """What a cell's function gets besides its cell: ``log`` (a line for the user), ``threads``
    (torch threads of a worker process; None in-process) and ``stream`` (a text stream for the
    trainer's progress lines in a worker; None in-process, where the trainer uses stderr)."""

    log: Callable[[str], None]
    threads: int | None = None
    stream: Any = None


#: ``work(cell, tag, context)`` does one cell; ``tag`` is ``[i/n] name`` for its log lines.
Work = Callable[[Cell, str, Context], Any]


@dataclass
class Summary:
    """What :func:`run_cells` did: each cell run with the value its function returned, in the
    order they finished, and the wall time."""

    finished: list[tuple[Cell, Any]]
    wall_s: float


def default_threads(jobs: int) -> int:
    """An equal share of the CPUs per worker: ``cpu_count // jobs``, at least 1."""
    return max(1, (os.cpu_count() or 1) // jobs)


def check_jobs(jobs: Any) -> int:
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise LipganError(
            f"--jobs must be a whole number of runs at a time, 1 or more (1: one after the "
            f"other), got {jobs!r}"
        )
    return jobs


def run_cells(
    cells: Sequence[Cell],
    work: Work,
    *,
    jobs: int = 1,
    threads: int | None = None,
    log: Callable[[str], None] = lambda msg: None,
    on_done: Callable[[Cell, Any, set[Path]], None] | None = None,
) -> Summary:
    """Run ``work`` on every cell, ``jobs`` at a time (see the module docstring).

    ``work`` must be a top-level function (or a ``functools.partial`` of one) with picklable
    arguments when ``jobs > 1``. ``on_done(cell, value, unfinished)`` runs in this process after
    each cell, ``unfinished`` the folders of the cells still running or waiting. The first error
    a cell raises stops the sweep (cells not started are cancelled, running ones interrupted)
    and is raised here, as in-process; so does KeyboardInterrupt. A script that calls this with
    ``jobs > 1`` needs the usual ``if __name__ == "__main__":`` guard ("spawn" workers).
    """
    check_jobs(jobs)
    t0 = time.perf_counter()
    finished: list[tuple[Cell, Any]] = []
    n = len(cells)
    tags = {id(c): f"[{i}/{n}] {c.name}" for i, c in enumerate(cells, 1)}

    def done(cell: Cell, value: Any, unfinished: set[Path]) -> None:
        finished.append((cell, value))
        if on_done is not None:
            on_done(cell, value, unfinished)

    if jobs == 1 or n <= 1:
        for i, cell in enumerate(cells):
            value = work(cell, tags[id(cell)], Context(log))
            done(cell, value, {c.path for c in cells[i + 1 :]})
    else:
        _run_pool(cells, work, tags, min(jobs, n), threads or default_threads(jobs), log, done)
    return Summary(finished, time.perf_counter() - t0)


# A worker process's end of the pool: set by _worker_init.
_WORKER: dict = {}


class _LineStream:
    """A text stream for a trainer's progress lines in a worker: each complete line goes to
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


def _worker_init(threads: int, messages, stop, registry: dict) -> None:
    """Once per worker: limit torch's threads, register the parent's user constraints
    (``registry``: :func:`lipgan.constraints.base.worker_registry`), keep the queue and the stop
    flag, ignore Ctrl-C while idle (a cell in progress takes it: see _in_worker)."""
    import torch

    from lipgan.constraints import base

    torch.set_num_threads(threads)
    base.load_worker_registry(registry)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER.update(threads=threads, messages=messages, stop=stop)
    messages.put(("pid", os.getpid()))


def _in_worker(work: Work, cell: Cell, tag: str) -> tuple[bool, Any]:
    """One cell in a worker; (False, None) when the sweep was stopped before it began."""
    messages = _WORKER["messages"]

    def say(msg: str) -> None:
        messages.put(("log", msg))

    # Ctrl-C first, then the stop flag: the main process sets the flag before it interrupts.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if _WORKER["stop"].is_set():
            return False, None
        stream = _LineStream(lambda line: say(f"{tag}: {line}"))
        return True, work(cell, tag, Context(say, _WORKER["threads"], stream))
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_pool(cells, work, tags, workers, threads, log, done) -> None:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    from lipgan.constraints import base

    ctx = multiprocessing.get_context("spawn")
    messages, stop = ctx.Queue(), ctx.Event()
    lines: queue.SimpleQueue = queue.SimpleQueue()
    pids: set[int] = set()

    def receive() -> None:  # a thread: keeps the workers' queue drained until the pool is down
        while (item := messages.get()) is not None:
            kind, value = item
            if kind == "pid":
                pids.add(value)
            else:
                lines.put(value)

    def flush() -> None:
        while True:
            try:
                log(lines.get_nowait())
            except queue.Empty:
                return

    receiver = threading.Thread(target=receive, name="lipgan-sweep-log", daemon=True)
    receiver.start()
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=ctx,
        initializer=_worker_init,
        initargs=(threads, messages, stop, base.worker_registry()),
    )
    busy: dict = {}
    interrupted = threading.Event()
    restore = _catch_sigint(interrupted)
    try:
        try:
            for cell in cells:
                busy[pool.submit(_in_worker, work, cell, tags[id(cell)])] = cell
            while busy:
                ready, _ = wait(list(busy), timeout=0.2, return_when=FIRST_COMPLETED)
                flush()
                if interrupted.is_set():
                    raise KeyboardInterrupt
                for fut in [f for f in busy if f in ready]:
                    cell = busy.pop(fut)
                    try:
                        _, value = fut.result()
                    except BrokenProcessPool:
                        raise LipganError(
                            "a worker process died (killed, out of memory?); run the same "
                            "command again to resume, maybe with a smaller --jobs"
                        ) from None
                    done(cell, value, {c.path for c in busy.values()})
        except BaseException:
            _stop_workers(pool, busy, stop, pids)
            raise
        pool.shutdown(wait=True)
    finally:
        restore()
        messages.put(None)
        receiver.join(timeout=10)
        flush()


def _catch_sigint(flag: threading.Event) -> Callable[[], None]:
    """Make SIGINT set ``flag`` (main thread only: nowhere else can a handler be installed);
    returns the function that puts the previous handler back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGINT, lambda signum, frame: flag.set())

    def restore() -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)

    return restore


def _stop_workers(pool, busy: dict, stop, pids: set[int]) -> None:
    """Cancel what has not started; give the cells in progress STOP_GRACE_S to stop on their own,
    then send their workers SIGINT; then shut the pool down."""
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
