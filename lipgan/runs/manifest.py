"""``RUN/manifest.json``: the sha256 of every checkpoint and export lipgan wrote in a run folder.

Format::

    {"format": "lipgan-manifest", "version": 1,
     "files": {"checkpoints/last.pt": {"sha256": "…", "size": 123}, "critic.safetensors": …}}

A file is checked against its entry on every load; a file without an entry (a run folder written
before manifests existed, or a file a user put there) loads unchecked. The manifest is written
before the files it describes, and each entry also lists the digest of the version it replaced
(``"also"``): a process killed between the manifest update and the rename then leaves a folder
whose files all still verify, at the price of one manifest write per save. (Accepting the
previous version costs nothing in corruption detection: a damaged file does not turn into
lipgan's previous write of it; which checkpoint goes with which export is the checkpoint's own
record, ``state["exports"]``.) torch's zip reader checks no CRC and safetensors has no checksum,
so without this a flipped bit loads silently.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from lipgan.errors import LipganError
from lipgan.runs.files import atomic_write_text, read_text, sha256_bytes

FORMAT = "lipgan-manifest"
VERSION = 1
NAME = "manifest.json"


def run_root(file: str | os.PathLike) -> Path:
    """The run folder a checkpoint or export belongs to (``RUN/checkpoints/x.pt`` -> RUN)."""
    file = Path(file)
    return file.parent.parent if file.parent.name == "checkpoints" else file.parent


class Manifest:
    """The digests of one run folder. ``Manifest(root)`` reads nothing until asked."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.path = self.root / NAME

    def exists(self) -> bool:
        return self.path.is_file()

    def read(self) -> dict[str, dict]:
        """The ``files`` table (empty when there is no manifest)."""
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(read_text(self.path))
        except ValueError as exc:
            raise LipganError(
                f"{self.path}: not valid JSON ({exc}); restore it, or delete it to load the run's "
                "files without checksum checks"
            ) from None
        files = data.get("files") if isinstance(data, dict) else None
        if data.get("format") != FORMAT or not isinstance(files, dict):
            raise LipganError(f"{self.path}: not a lipgan manifest; restore or delete it")
        if data.get("version") != VERSION:
            raise LipganError(
                f"{self.path}: manifest version {data.get('version')} is not supported by this "
                f"lipgan (reads version {VERSION}); use the lipgan that wrote the run"
            )
        return {k: v for k, v in files.items() if isinstance(v, dict)}

    def _write(self, files: Mapping[str, dict]) -> None:
        doc = {"format": FORMAT, "version": VERSION, "files": dict(sorted(files.items()))}
        atomic_write_text(self.path, json.dumps(doc, indent=1) + "\n")

    def rel(self, file: str | os.PathLike) -> str:
        return Path(os.path.relpath(Path(file), self.root)).as_posix()

    def record(self, digests: Mapping[str, tuple[str, int]]) -> None:
        """Before replacing files: record each one's new digest, keeping the digest of the
        version it replaces valid too (``"also"``), so that a process killed before the rename
        leaves a file that still verifies. One manifest write per save."""
        files = self.read()
        for rel, (sha, size) in digests.items():
            old = files.get(rel, {}).get("sha256")
            also = [old] if isinstance(old, str) and old != sha else []
            files[rel] = {"sha256": sha, "size": size, "also": also}
        self._write(files)

    def verify(self, file: str | os.PathLike, data: bytes) -> bool:
        """Check ``data`` (the bytes of ``file``) against the manifest. True when checked, False
        when the manifest has no entry for it; a mismatch is a LipganError."""
        entry = self.read().get(self.rel(file))
        if entry is None:
            return False
        sha = sha256_bytes(data)
        valid = [entry.get("sha256"), *(entry.get("also") or [])]
        if sha not in valid:
            size = entry.get("size")
            how = (
                f"{len(data)} bytes where lipgan wrote {size}: truncated or replaced"
                if isinstance(size, int) and len(data) < size
                else f"sha256 {sha[:12]}…, {self.path.name} says {str(entry.get('sha256'))[:12]}…"
            )
            raise LipganError(
                f"{file}: checksum mismatch, the file was changed or corrupted after lipgan wrote "
                f"it ({how}); restore it from a copy, or resume from another checkpoint in "
                "checkpoints/"
            )
        return True


def tracked_write(root: str | os.PathLike, files: Mapping[str | os.PathLike, bytes]) -> dict:
    """Record the digests of ``files`` (path -> bytes) in ``root``'s manifest, then write them
    atomically in the order given. Returns rel -> sha256."""
    from lipgan.runs.files import atomic_write_bytes

    man = Manifest(root)
    digests = {man.rel(p): (sha256_bytes(b), len(b)) for p, b in files.items()}
    man.record(digests)
    for p, b in files.items():
        atomic_write_bytes(p, b)
    return {rel: sha for rel, (sha, _) in digests.items()}


def verified_read(file: str | os.PathLike) -> bytes:
    """The bytes of a checkpoint or export, checked against its run folder's manifest."""
    from lipgan.runs.files import read_bytes

    data = read_bytes(file)
    Manifest(run_root(file)).verify(file, data)
    return data
