"""The two CSV logs of a run folder, metrics.csv and layer_norms.csv: appending, repair, reading.

Rows are appended one at a time and flushed (a killed process leaves at most one torn last row);
:meth:`RunLogs.truncate_logs` drops torn rows and rows past a step on resume or rollback, by an
atomic rewrite. No torch here.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from lipgan.runs.files import atomic_write_text, os_error, read_text
from lipgan.schema import LAYER_COLUMNS, METRIC_COLUMNS


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


class RunLogs:
    """The CSV-log part of :class:`lipgan.runs.RunFolder` (a mixin): it uses the folder's
    ``metrics_path``, ``layer_norms_path``, ``lock()`` and ``_writing()``, and keeps the open
    files in ``_metrics_fh`` and ``_layers_fh``."""

    _metrics_fh = None
    _layers_fh = None
    #: the header of each open log file: the current columns, then any an older lipgan wrote
    _headers: dict[Path, list[str]] = {}

    def _open_csv(self, path: Path, columns: Iterable[str]):
        """Open a log for appending under the folder's lock. A file written by an older lipgan
        with fewer columns is first rewritten to the current ones (its rows mapped by its own
        header, new cells empty), so its rows are kept and new rows line up."""
        self.lock()
        columns = list(columns)
        try:
            header = self._file_header(path)
            if header is not None and not set(columns) <= set(header):
                header = self._rewrite(path, columns, None)
            fh = open(path, "a", newline="")
            if header is None:
                header = columns
                csv.writer(fh).writerow(columns)
                fh.flush()
        except OSError as exc:
            raise os_error(exc, path) from None
        self._headers = {**self._headers, path: header}
        return fh

    @staticmethod
    def _file_header(path: Path) -> list[str] | None:
        """The first row of the CSV at ``path``; None when there is no file or it is empty."""
        if not path.is_file() or path.stat().st_size == 0:
            return None
        with open(path, newline="") as fh:
            return next(csv.reader(fh), None)

    def _rewrite(self, path: Path, columns: list[str], after_step: int | None) -> list[str]:
        """Rewrite the log at ``path`` atomically with header ``columns`` plus the file's other
        columns (kept: nothing written is lost), each row mapped by the file's own header.
        Dropped: torn rows (not as many cells as that header), and with ``after_step`` rows
        whose step is not a number or is above it. Returns the new header."""
        rows = list(csv.reader(io.StringIO(read_text(path), newline="")))
        old = rows[0] if rows else columns
        at = old.index("step") if "step" in old else 0
        kept = []
        for r in rows[1:]:
            if len(r) != len(old):
                continue
            if after_step is not None:
                try:
                    if int(r[at]) > after_step:
                        continue
                except ValueError:
                    continue
            kept.append(dict(zip(old, r)))
        # an old column stays while a kept row has a value in it (not a header torn by a kill)
        header = columns + [c for c in old if c not in columns and any(k[c] for k in kept)]
        buf = io.StringIO()
        csv.writer(buf).writerows([header] + [[k.get(c, "") for c in header] for k in kept])
        with self._writing():
            atomic_write_text(path, buf.getvalue())
        return header

    def _append(self, fh, rows: Iterable[list], path: Path) -> None:
        try:
            csv.writer(fh).writerows(rows)
            fh.flush()
        except OSError as exc:  # a torn row is dropped on resume (truncate_logs)
            raise os_error(exc, path) from None

    def log_metrics(self, row: dict[str, Any]) -> None:
        """Append one row to metrics.csv (unknown keys are an error; missing ones stay empty)."""
        extra = set(row) - set(METRIC_COLUMNS)
        if extra:
            raise ValueError(f"unknown metrics columns {sorted(extra)}")
        if self._metrics_fh is None:
            self._metrics_fh = self._open_csv(self.metrics_path, METRIC_COLUMNS)
        header = self._headers[self.metrics_path]
        self._append(self._metrics_fh, [[_fmt(row.get(c)) for c in header]], self.metrics_path)

    def log_layer_norms(self, step: int, rows: Iterable[tuple[str, Any, Any]]) -> None:
        """Append ``(layer, operator_norm, reshaped_norm)`` rows for ``step`` to layer_norms.csv."""
        if self._layers_fh is None:
            self._layers_fh = self._open_csv(self.layer_norms_path, LAYER_COLUMNS)
        header = self._headers[self.layer_norms_path]
        out = []
        for layer, op, reshaped in rows:
            cells = dict(zip(LAYER_COLUMNS, (step, layer, _fmt(op), _fmt(reshaped))))
            out.append([cells.get(c, "") for c in header])
        self._append(self._layers_fh, out, self.layer_norms_path)

    def truncate_logs(self, after_step: int) -> None:
        """Drop CSV rows with ``step > after_step`` and torn rows (resume, rollback); a log an
        older lipgan wrote gets the current columns, its rows mapped by its own header."""
        self.close_logs()
        for path, columns in (
            (self.metrics_path, METRIC_COLUMNS),
            (self.layer_norms_path, LAYER_COLUMNS),
        ):
            if path.is_file():
                self._rewrite(path, list(columns), after_step)

    def _csv_rows(self, path: Path) -> tuple[list[str], list[list[str]]]:
        if not path.is_file():
            return [], []
        rows = list(csv.reader(io.StringIO(read_text(path), newline="")))
        return (rows[0], rows[1:]) if rows else ([], [])

    def read_metrics(self) -> list[dict[str, float | None]]:
        """metrics.csv as a list of dicts (empty cells -> None; torn rows dropped)."""
        header, rows = self._csv_rows(self.metrics_path)
        out = []
        for cells in rows:
            try:
                if len(cells) == len(header):
                    out.append({k: float(v) if v else None for k, v in zip(header, cells)})
            except ValueError:
                continue
        return out

    def metrics_columns(self) -> dict[str, np.ndarray]:
        """metrics.csv as columns of float64; empty cells are NaN. A last line cut short by a
        killed process (fewer cells than the header, or a cell that is not a number) is
        dropped."""
        header, rows = self._csv_rows(self.metrics_path)
        if not header:
            return {}
        values = [
            [v if v is not None else math.nan for v in r.values()] for r in self.read_metrics()
        ]
        data = np.array(values, dtype=np.float64).reshape(len(values), len(header))
        return {name: data[:, i] for i, name in enumerate(header)}

    def close_logs(self) -> None:
        for attr in ("_metrics_fh", "_layers_fh"):
            fh = getattr(self, attr)
            if fh is not None:
                setattr(self, attr, None)
                try:
                    fh.close()
                except OSError:  # a full disk: the rows already written are flushed
                    pass
