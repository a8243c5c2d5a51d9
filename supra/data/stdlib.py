"""The embedded default corpus: the Python standard library's own source files.

Present on every machine with Python, offline, and real code-and-prose text. Documents are the
files, in sorted path order; each file's split is fixed by a stable hash of its relative path.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idlelib", "turtledemo"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    root = stdlib_root()
    return sorted(p for p in root.rglob("*.py") if not SKIP_DIRS.intersection(p.relative_to(root).parts))


def is_heldout(key: str, heldout_fraction: float) -> bool:
    """Stable across runs, machines and Python versions (unlike hash())."""
    digest = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")
    return digest / 2**64 < heldout_fraction


def stdlib_documents(split: str = "train", heldout_fraction: float = 0.02) -> Iterator[str]:
    root = stdlib_root()
    for path in stdlib_files():
        if is_heldout(str(path.relative_to(root)), heldout_fraction) == (split == "heldout"):
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield text
