"""Fetching public data sets with a checksum check, and reading archives safely.

Downloads go to a temporary file beside the target and are renamed into place only when the
MD5 matches the published one; each mirror is tried in turn. Archives are never extracted:
members are read in memory, after every member name has been checked (no absolute paths, no
``..``, no links or devices), so a crafted archive can neither write nor read outside its data.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

from pipeline.io import StageError

CHUNK = 1 << 20


def md5sum(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(filename: str, md5: str, mirrors: list[str], dest_dir: Path) -> Path:
    """Download ``filename`` from the first mirror that serves it with the right MD5."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / filename
    if target.exists() and md5sum(target) == md5:
        return target
    problems = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + filename
        tmp = dest_dir / f".{filename}.{os.getpid()}.tmp"
        try:
            _download(url, tmp)
            got = md5sum(tmp)
            if got != md5:
                problems.append(f"{url}: MD5 {got}, expected {md5}")
                continue
            os.replace(tmp, target)
            return target
        except (urllib.error.URLError, OSError) as exc:
            problems.append(f"{url}: {getattr(exc, 'reason', exc)}")
        finally:
            tmp.unlink(missing_ok=True)
    raise StageError(f"could not download {filename}: " + "; ".join(problems))


def _download(url: str, path: Path) -> None:
    with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0)
        done, shown, start = 0, 0.0, time.monotonic()
        for block in iter(lambda: response.read(CHUNK), b""):
            out.write(block)
            done += len(block)
            if total and (done == total or time.monotonic() - shown > 5):
                shown = time.monotonic()
                print(f"[ingest] {url}: {done / 1e6:.1f} of {total / 1e6:.1f} MB", flush=True)
    print(f"[ingest] downloaded {url} ({done / 1e6:.1f} MB, {time.monotonic() - start:.0f}s)")


def check_members(archive: tarfile.TarFile, path: Path) -> list[tarfile.TarInfo]:
    """All members, after refusing the archive if any could escape or is not a plain file."""
    members = archive.getmembers()
    for m in members:
        name = PurePosixPath(m.name)
        if name.is_absolute() or ".." in name.parts or m.name.startswith(("/", "\\")):
            raise StageError(f"{path}: refusing unsafe archive member {m.name!r} (path escapes)")
        if m.issym() or m.islnk():
            raise StageError(f"{path}: refusing archive member {m.name!r}: it is a link")
        if not (m.isfile() or m.isdir()):
            raise StageError(f"{path}: refusing archive member {m.name!r}: not a regular file")
    return members


def read_members(path: Path, wanted: list[str], optional: tuple[str, ...] = ()) -> dict[str, bytes]:
    """The bytes of each wanted (and each present optional) member, matched by file name, of a
    (gzipped) tar archive."""
    try:
        with tarfile.open(path, "r:*") as archive:
            members = {PurePosixPath(m.name).name: m for m in check_members(archive, path)}
            missing = [name for name in wanted if name not in members]
            if missing:
                raise StageError(f"{path}: archive lacks {', '.join(missing)}")
            out = {}
            for name in [*wanted, *(n for n in optional if n in members)]:
                member = archive.extractfile(members[name])
                out[name] = member.read() if member else b""
            return out
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise StageError(f"{path}: not a readable tar archive: {exc}") from None
