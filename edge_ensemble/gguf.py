"""GGUF files: the magic, and a cheap structural check of the header and tensor table (no llama.cpp needed).

The one place that knows what a GGUF file starts with: the runtime (before llama.cpp loads a file), the model
sources (a path the user gave, a hub download, an assembled bundle) and the memory estimate all ask here.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelLoadError, ModelSourceError

__all__ = ["GGUF_MAGIC", "GGUFTensor", "check_gguf", "check_local_file", "check_magic"]

GGUF_MAGIC = b"GGUF"

# GGUF metadata value types -> fixed byte size (8 = string and 9 = array are variable).
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY, _GGUF_UINT32 = 8, 9, 4

# ggml tensor type -> (elements per block, bytes per block). Used only to compute where the last tensor ends;
# a type missing here just weakens the check (it then requires the tensor's first byte to be in the file).
# Q8_1 (9) is left out on purpose: it never appears in files and its size differs between sources.
# Cross-checked against gguf.GGML_QUANT_SIZES in tests/test_sources.py.
_GGML_BLOCKS = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),
    34: (256, 54), 35: (256, 66), 39: (32, 17),
}


class _Truncated(Exception):
    """Internal: the GGUF header walk ran past the end of the file."""


class _HeaderWalker:
    """Reads little-endian GGUF header fields from a buffer, raising _Truncated past its end."""

    def __init__(self, buf: Any, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, fmt: str) -> int:
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise _Truncated
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated
        self.pos += n

    def skip_string(self) -> None:
        self.skip(self.take("<Q"))

    def read_string(self) -> bytes:
        n = self.take("<Q")
        start = self.pos
        self.skip(n)
        return bytes(self.buf[start:self.pos])

    def skip_value(self, vtype: int, depth: int = 0) -> None:
        if vtype in _GGUF_SCALAR_SIZES:
            self.skip(_GGUF_SCALAR_SIZES[vtype])
        elif vtype == _GGUF_STRING:
            self.skip_string()
        elif vtype == _GGUF_ARRAY and depth < 4:
            itype, count = self.take("<I"), self.take("<Q")
            if itype in _GGUF_SCALAR_SIZES:
                self.skip(count * _GGUF_SCALAR_SIZES[itype])
            elif itype == _GGUF_STRING:
                if count > self.size:  # each string needs >= 8 bytes: a huge count is corruption
                    raise _Truncated
                for _ in range(count):  # a vocabulary: ~150k short strings, a few tens of ms
                    self.skip(self.take("<Q"))
            else:
                for _ in range(count):
                    self.skip_value(itype, depth + 1)
        else:
            raise ValueError(f"unknown metadata value type {vtype}")


def check_magic(path: Path) -> None:
    """Refuse, with one line (ModelLoadError), a file that is empty or does not start with the GGUF magic; the
    message says what the file looks like instead (a Git LFS pointer, a zip, safetensors)."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise ModelLoadError(f"{path} is empty, not a GGUF model (an interrupted download?)")
    if head[:4] != GGUF_MAGIC:
        raise ModelLoadError(_not_gguf_message(path, head))


def check_gguf(path: Path) -> list[GGUFTensor]:
    """Cheap structural check of a GGUF file without loading it.

    Verifies the magic, walks the metadata and the tensor table (skipping values, never reading tensor data),
    and checks that the file is long enough for every tensor it describes. This catches the common damage (a
    download or copy cut short, a non-GGUF file) in well under a second even for a 500 MB model. It does not
    validate the data itself; a catalog file is verified by sha256 instead. Raises ModelLoadError. Returns
    the tensor table.
    """
    path = Path(path)
    size = path.stat().st_size
    check_magic(path)
    if size < 24:
        raise ModelLoadError(f"{path} is truncated: {size} bytes, too short for a GGUF header")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return _walk_gguf(path, buf, size)


@dataclass(frozen=True)
class GGUFTensor:
    """One entry of a GGUF tensor table (``nbytes`` is 1 for a ggml type this module does not know)."""

    name: str
    ggml_type: int
    nbytes: int


def _walk_gguf(path: Path, buf: Any, size: int) -> list[GGUFTensor]:
    """Walk the header and the tensor table, check the file holds every tensor, return the table."""
    r = _HeaderWalker(buf, size)
    r.pos = 4
    version = struct.unpack_from("<I", buf, 4)[0]  # size >= 24 was checked by the caller
    if version == 1:
        return []  # 32-bit lengths; llama.cpp itself rejects v1 with its own message
    if version not in (2, 3):
        raise ModelLoadError(f"{path}: unsupported GGUF version {version} (or a corrupt header)")
    r.pos = 8
    tensors: list[GGUFTensor] = []
    try:
        n_tensors, n_kv = r.take("<Q"), r.take("<Q")
        if n_tensors > size or n_kv > size:
            raise ModelLoadError(
                f"{path} is corrupt: the header claims {n_tensors} tensors and {n_kv} metadata entries"
            )
        alignment = 32
        for _ in range(n_kv):
            key = r.read_string()
            vtype = r.take("<I")
            if key == b"general.alignment" and vtype == _GGUF_UINT32:
                alignment = r.take("<I")
            else:
                r.skip_value(vtype)
        if alignment <= 0 or alignment & (alignment - 1):
            raise ModelLoadError(f"{path} is corrupt: general.alignment = {alignment} is not a power of two")
        end_of_data = 0
        for _ in range(n_tensors):
            name = r.read_string()
            n_dims = r.take("<I")
            if n_dims > 8:
                raise ModelLoadError(f"{path} is corrupt: a tensor claims {n_dims} dimensions")
            n_elements = 1
            for _ in range(n_dims):
                n_elements *= r.take("<Q")
            ttype, offset = r.take("<I"), r.take("<Q")
            block, block_bytes = _GGML_BLOCKS.get(ttype, (0, 0))
            nbytes = n_elements // block * block_bytes if block else 1
            end_of_data = max(end_of_data, offset + nbytes)
            tensors.append(GGUFTensor(name.decode("utf-8", "replace"), ttype, nbytes))
    except _Truncated:
        raise ModelLoadError(
            f"{path} is truncated: its GGUF header runs past the end of the file ({size} bytes)"
        ) from None
    except ValueError as e:
        raise ModelLoadError(f"{path} is corrupt: {e}") from None
    data_start = -(-r.pos // alignment) * alignment
    needed = data_start + end_of_data
    if needed > size:
        raise ModelLoadError(
            f"{path} is truncated: its tensors need {needed:,} bytes but the file has {size:,}"
            " (an interrupted download or copy?)"
        )
    return tensors


def _not_gguf_message(path: Path, head: bytes) -> str:
    hint = ""
    if head.startswith(b"version https://git-lfs"):
        hint = "; it is a Git LFS pointer: fetch the real file (git lfs pull) or use hf:<org>/<repo>/<file>"
    elif head.startswith(b"PK"):
        hint = "; it is a zip archive (a wheel or a PyTorch checkpoint?)"
    elif len(head) >= 9 and head[8:9] == b"{":
        hint = "; it looks like safetensors: convert it with llama.cpp's convert_hf_to_gguf.py"
    return f"{path} is not a GGUF file (starts with {head[:8]!r}, expected b'GGUF'){hint}"



def check_local_file(path: Path) -> Path:
    """Validate a user-given model path and return it absolute. Missing path / directory / unreadable ->
    ModelSourceError; not GGUF / truncated -> ModelLoadError (one line each)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelSourceError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelSourceError(f"{path} is a directory, not a GGUF model file")
    if not path.is_file():
        raise ModelSourceError(f"{path} is not a regular file")
    try:
        check_gguf(path)
    except PermissionError:
        raise ModelSourceError(f"cannot read {path}: permission denied") from None
    except OSError as e:
        raise ModelSourceError(f"cannot read {path}: {e.strerror or e}") from None
    return path.absolute()

