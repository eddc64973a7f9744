"""Hashes of source files, naming what was built from them (the CUDA extension's build folder, the
custom ops' namespaces), so that an edit gives a fresh build and a fresh name."""

from __future__ import annotations

import hashlib
from pathlib import Path


def files_digest(root: Path, suffixes: tuple[str, ...], recursive: bool = False) -> str:
    """SHA-256 over the files under ``root`` with these suffixes: names relative to ``root``, then
    contents, in sorted order (sub-folders too when ``recursive``)."""
    h = hashlib.sha256()
    paths = root.rglob("*") if recursive else root.glob("*")
    for path in sorted(p for p in paths if p.suffix in suffixes):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def ops_namespace(digest: str, prefix: str) -> str:
    """The torch.ops namespace of ops built from sources that hash to ``digest``.

    torch.compile's caches (Inductor, AOTAutograd) key a graph on its ops' names, not on their
    schemas: under one fixed name, a graph cached against an older build would be replayed against
    this one's ops. A name that follows the sources makes such a graph miss."""
    return f"{prefix}_{digest[:12]}"
