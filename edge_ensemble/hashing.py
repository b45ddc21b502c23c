"""The sha256 of a file, read in chunks: one function for the model sources (verifying a download or an
assembled bundle), the route head's model hashes (:func:`edge_ensemble.routing.file_sha256`) and the API's
same-file check."""

from __future__ import annotations

import hashlib
import os
from typing import Callable

CHUNK = 1 << 22  # 4 MiB a read: large enough for throughput, small enough to keep memory flat


def sha256_file(path: str | os.PathLike[str], on_chunk: Callable[[int], None] | None = None,
                chunk_size: int = CHUNK) -> str:
    """The hex sha256 of the file at ``path``; ``on_chunk(n)`` is called after each chunk of ``n`` bytes (a
    progress bar)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
            if on_chunk is not None:
                on_chunk(len(chunk))
    return h.hexdigest()


__all__ = ["CHUNK", "sha256_file"]
