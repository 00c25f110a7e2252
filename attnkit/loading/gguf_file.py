"""Reading a GGUF file (llama.cpp's single-file checkpoint format) without copying it.

Layout of GGUF v2/v3 (little-endian)::

    "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv ×      key: string | u32 value type | value          (metadata)
    n_tensors × name: string | u32 n_dims | u64 dims[n_dims] | u32 ggml type | u64 offset
    padding to `general.alignment` (default 32) | tensor data

Strings are ``u64 length | UTF-8 bytes``; dims are innermost first, so a PyTorch shape is
``reversed(dims)``. Quantised blocks are decoded by ``gguf.quants.dequantize`` (the reference
implementation from the llama.cpp project); this module only parses the header.

Why not ``gguf.GGUFReader``? It wraps every array element in a numpy memmap view and needs ~2.6 s
for the 98 k strings of a 49 k-token vocabulary; parsing the same header with ``struct`` takes
~0.1 s. Every tensor's extent is checked against the file size when the file is opened, so a
truncated file is refused before anything is loaded.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

from .errors import ModelLoadError, UnsupportedModelError

MAGIC = b"GGUF"

# GGUF value types (gguf.GGUFValueType): id -> struct format of a scalar
_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_CHUNK = 1 << 18  # values dequantised per call
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}

#: The tensor types attnkit loads: every type gguf.quants.dequantize decodes. The common ones stay in their
#: blocks under attnkit's kernels (attnkit.quant.native.NATIVE_TYPES); the rest are dequantized at load.
SUPPORTED_TYPES = frozenset(
    GGMLQuantizationType[n]
    for n in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
              "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0",
              "MXFP4")
    if n in GGMLQuantizationType.__members__
)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order (outermost first)
    ggml_type: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    """A memory-mapped GGUF file: ``metadata`` (dict) and ``tensors`` (name → :class:`TensorInfo`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:  # a private mapping: tensors can view it in place (torch wants a writable buffer); nothing writes to it
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as e:  # ValueError: empty file
            raise ModelLoadError(self.path, f"cannot open as a GGUF file ({e})") from e
        try:
            self._parse()
        except (struct.error, IndexError, UnicodeDecodeError, ValueError) as e:
            raise ModelLoadError(self.path, f"truncated or corrupt GGUF header ({e})") from e

    # -- header ---------------------------------------------------------------------------------
    def _parse(self) -> None:
        buf, size = self._mm, len(self._mm)
        if buf[:4] != MAGIC:
            raise ModelLoadError(self.path, f"not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF')")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise UnsupportedModelError(self.path, f"GGUF version {version} is not supported (2 or 3; big-endian files are not)")
        pos = 24
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key, pos = self._string(pos)
            (vtype,) = struct.unpack_from("<I", buf, pos)
            self.metadata[key], pos = self._value(vtype, pos + 4)
        infos = []
        for _ in range(n_tensors):
            name, pos = self._string(pos)
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            ttype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            infos.append((name, dims, ttype, offset))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = (pos + align - 1) // align * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, ttype, offset in infos:
            try:
                qtype = GGMLQuantizationType(ttype)
            except ValueError:
                raise UnsupportedModelError(self.path, f"unknown ggml tensor type id {ttype}", tensor=name) from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            n = int(np.prod(dims)) if dims else 1
            if dims and dims[0] % block:
                raise ModelLoadError(
                    self.path, f"row length {dims[0]} is not a multiple of the {qtype.name} block size {block}", tensor=name)
            shape = tuple(int(d) for d in reversed(dims))
            info = TensorInfo(name, shape, qtype, data_start + offset, n // block * type_size)
            if info.offset + info.nbytes > size:
                raise ModelLoadError(
                    self.path, f"file is truncated: the tensor's data ends at byte {info.offset + info.nbytes} "
                    f"but the file has {size} bytes", tensor=name)
            self.tensors[name] = info

    def _string(self, pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self._mm, pos)
        end = pos + 8 + n
        if end > len(self._mm):
            raise ValueError(f"string at byte {pos} runs past the end of the file")
        return self._mm[pos + 8 : end].decode("utf-8", errors="replace"), end

    def _value(self, vtype: int, pos: int) -> tuple[Any, int]:
        if vtype in _SCALAR_FMT:
            fmt = _SCALAR_FMT[vtype]
            return struct.unpack_from(fmt, self._mm, pos)[0], pos + struct.calcsize(fmt)
        if vtype == _STRING:
            return self._string(pos)
        if vtype == _ARRAY:
            etype, count = struct.unpack_from("<IQ", self._mm, pos)
            pos += 12
            if etype in _NUMPY:
                dt = np.dtype(_NUMPY[etype])
                arr = np.frombuffer(self._mm, dtype=dt, count=count, offset=pos)
                return arr.tolist(), pos + count * dt.itemsize
            out = []
            for _ in range(count):
                v, pos = self._value(etype, pos)
                out.append(v)
            return out, pos
        raise ValueError(f"unknown GGUF value type {vtype} at byte {pos}")

    # -- tensors --------------------------------------------------------------------------------
    def check_type(self, name: str) -> None:
        t = self.tensors[name]
        if t.ggml_type not in SUPPORTED_TYPES:
            raise UnsupportedModelError(
                self.path, f"tensor type {t.ggml_type.name} is not supported "
                f"(supported: {', '.join(sorted(q.name for q in SUPPORTED_TYPES))})", tensor=name)

    def load(self, name: str) -> np.ndarray:
        """The tensor dequantised to a new float32 array of shape ``tensors[name].shape``.

        Blocks never straddle rows, so the data is decoded in chunks of ~256 k values regardless of
        rows: few Python-level calls into ``dequantize``, and temporaries small enough to stay in cache
        and be reused by the allocator (large temporaries cost a page fault per 4 KiB every time).
        """
        self.check_type(name)
        t = self.tensors[name]
        raw = np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        block, type_size = GGML_QUANT_SIZES[t.ggml_type]
        n_blocks = t.nbytes // type_size
        out = np.empty(n_blocks * block, dtype=np.float32)
        step = max(1, _CHUNK // block)
        for s in range(0, n_blocks, step):
            e = min(n_blocks, s + step)
            out[s * block : e * block] = dequantize(raw[s * type_size : e * type_size].reshape(1, -1), t.ggml_type).ravel()
        return out.reshape(t.shape)

    def raw_blocks(self, name: str) -> np.ndarray:
        """A quantized tensor's blocks as stored: uint8 (rows, cols / block · type_size), a copy."""
        return self.blocks(name).copy()

    def blocks(self, name: str) -> np.ndarray:
        """A tensor's blocks as stored, viewed in place in the file's mapping (no copy, nothing read yet):
        uint8 (rows, cols / block · type_size). Its pages are read from the file as they are first touched."""
        t = self.tensors[name]
        block, type_size = GGML_QUANT_SIZES[t.ggml_type]
        raw = np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)
        return raw.reshape(-1, t.shape[-1] // block * type_size)

    def aliases(self, ptr: int) -> bool:
        """Whether the address ``ptr`` lies in the file's mapping (a tensor viewing the file in place)."""
        base = np.frombuffer(self._mm, dtype=np.uint8, count=1).ctypes.data
        return base <= ptr < base + len(self._mm)

    def release(self, name: str) -> None:
        """Drop the pages of a tensor that was copied out of the file from this process's resident memory
        (they stay in the OS page cache). The mapping is private and never written, so a later read of these
        bytes would fetch them from the file again: nothing is lost."""
        t = self.tensors[name]
        page = mmap.PAGESIZE
        start, end = t.offset // page * page, -(-(t.offset + t.nbytes) // page) * page
        if hasattr(self._mm, "madvise"):
            self._mm.madvise(mmap.MADV_DONTNEED, start, min(end, len(self._mm)) - start)

    def load_q4(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """A Q4_0 / Q4_1 tensor's blocks undecoded: ``(codes, d, m)`` with w = d·q + m (Q4_1), d·(q − 8) (Q4_0).

        codes (rows, cols) uint8 in 0..15; d and m (rows, cols/32) float32 (m is None for Q4_0). A block
        (ggml's block_q4_0 / block_q4_1) is f16 d [, f16 m], then 16 bytes: byte j holds element j in its
        low nibble and element j + 16 in its high nibble.
        """
        t = self.tensors[name]
        if t.ggml_type not in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1):
            raise ValueError(f"{name} is {t.ggml_type.name}, not Q4_0/Q4_1")
        block, type_size = GGML_QUANT_SIZES[t.ggml_type]  # 32, 18 or 20
        cols = t.shape[-1]
        rows = t.nbytes // type_size * block // cols
        raw = np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset).reshape(rows, cols // block, type_size)
        d = raw[..., 0:2].copy().view("<f2")[..., 0].astype(np.float32)  # (rows, cols/32)
        m = raw[..., 2:4].copy().view("<f2")[..., 0].astype(np.float32) if type_size == 20 else None
        qs = raw[..., type_size - block // 2 :]  # (rows, cols/32, 16)
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, cols)
        return codes, d, m
