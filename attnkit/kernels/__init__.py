"""attnkit's C kernels: GGUF block matrix–vector products (``kernels.c``, which dispatches through the table of
block types: one kernel file per type or family, ``legacy.c`` (Q4_0, Q4_1, Q5_0, Q5_1), ``q8.c``, ``q4_k.c``
(Q4_K, Q5_K), ``q6_k.c``), the prompt rows' integer matrix product (``gemm.c``), paged decode attention (``attention.c``), training attention's forward and backward (``train_attention.c``), the loss's softmax and its gradient (``cross_entropy.c``), a training step's SwiGLU and RMSNorm (``train_ops.c``), RoPE on a prompt's rows (``rope.c``), and a whole decode step of a Llama-family
model built on them (``decode_step.c``, its mixture-of-experts FFN ``moe.c``). Beside them, :mod:`.allocator`: glibc's
malloc policy for the process (keep freed activations for the engine's step loop, or give them back when training);
:mod:`.ops`: the GGUF products and RMSNorm as PyTorch operators (``torch.ops.attnkit.*``, for ``torch.compile``).

Compiled once per machine with the system C compiler (``-O3 -march=native -fopenmp``, a few seconds; ``-mtune=generic``
added where the compiler would tune a Zen 4/5 as a znver3: :func:`tune_override`; ``$ATTNKIT_MARCH`` overrides ``native``,
e.g. ``x86-64`` for the portable C) into a cache directory (``$ATTNKIT_CACHE`` or ~/.cache/attnkit) and loaded with ctypes. The
build goes to a temporary file that is renamed into place, so a crash never leaves a half-written
library. Without a compiler (or with ``ATTNKIT_NO_NATIVE=1``) :func:`library` returns None and
every caller falls back to PyTorch operations.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

SOURCES = sorted(Path(__file__).parent.glob("*.c"))
HEADERS = sorted(Path(__file__).parent.glob("*.h"))


def cache_dir() -> Path:
    return Path(os.environ.get("ATTNKIT_CACHE", Path.home() / ".cache" / "attnkit")) / "kernels"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags /proc/cpuinfo lists for this CPU (empty where there is no such file); where
    ``$ATTNKIT_MARCH`` names a target other than ``native``, only the SIMD extensions that target has (as the C
    compiler defines them: :func:`march_simd`), so that what attnkit chooses by the CPU (bf16 products, the 512-bit
    training kernels) matches the kernels built — e.g. ``x86-64-v3`` measures an AVX2 machine's paths on this one."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    flags = frozenset(line.partition(":")[2].split())
    march = os.environ.get("ATTNKIT_MARCH")
    if march and march != "native":
        has = march_simd(march)
        if has is not None:
            flags = frozenset(f for f in flags if f in has or not (f in SIMD_MACROS.values() or f.startswith(("avx512", "amx"))))
    return flags


# the compiler's predefined macro for each SIMD extension, by its /proc/cpuinfo name
SIMD_MACROS = {"__AVX__": "avx", "__AVX2__": "avx2", "__FMA__": "fma", "__F16C__": "f16c", "__AVXVNNI__": "avx_vnni",
               "__AVX512F__": "avx512f", "__AVX512BW__": "avx512bw", "__AVX512VL__": "avx512vl",
               "__AVX512DQ__": "avx512dq", "__AVX512CD__": "avx512cd", "__AVX512VNNI__": "avx512_vnni",
               "__AVX512BF16__": "avx512_bf16", "__AVX512VBMI__": "avx512vbmi", "__AMX_TILE__": "amx_tile",
               "__AMX_BF16__": "amx_bf16", "__AMX_INT8__": "amx_int8"}


@functools.cache
def march_simd(march: str) -> frozenset[str] | None:
    """The SIMD extensions (/proc/cpuinfo names) the C compiler enables for ``-march=march``, or None where it
    cannot say (no compiler, an unknown target)."""
    cc = os.environ.get("CC", "cc")
    try:
        out = subprocess.run([cc, f"-march={march}", "-dM", "-E", "-x", "c", os.devnull], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    defined = {line.split()[1] for line in out.stdout.splitlines() if line.startswith("#define ")}
    return frozenset(name for macro, name in SIMD_MACROS.items() if macro in defined)


@functools.cache
def train_kernels() -> ctypes.CDLL | None:
    """The library where this build has its 512-bit training kernels (AVX512-F/BW/VL: train_ops.c), else None."""
    lib = library() if {"avx512f", "avx512bw", "avx512vl"} <= cpu_flags() else None
    return lib if lib is not None and lib.ak_train_ops_available() else None


def native_bf16() -> bool:
    """Whether the CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX-BF16): there oneDNN's bf16
    matrix products run 2–3× faster than float32 ones; elsewhere bf16 is emulated and slower."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def compile_flags(march: str | None = None) -> list[str]:
    """The compiler's flags for ``-march=march`` (default ``$ATTNKIT_MARCH`` or ``native``), and for ``native`` the
    tuning :func:`tune_override` picks."""
    march, flags = march or os.environ.get("ATTNKIT_MARCH") or "native", cpu_flags()
    # the compiler is asked (~10 ms a process) only where an override can follow: -march=native on AVX-512
    tune = tune_override(native_tune(), flags) if march == "native" and "avx512f" in flags else None
    return ["-O3", f"-march={march}", *([f"-mtune={tune}"] if tune else []), "-fopenmp", "-shared", "-fPIC"]


def tune_override(native: str | None, flags: frozenset[str]) -> str | None:
    """``generic`` where the compiler's ``-march=native`` tunes for an AMD core without AVX-512 (znver1–3) on a CPU
    that has it, i.e. a Zen 4 or Zen 5 newer than the compiler (GCC 12.2 knows neither): znver3's cost model
    schedules the 512-bit kernels worse. On a Zen 5 (GCC 12.2) a 1B Q4_K_M's 512-token prefill ran 1.06–1.07×
    faster with ``-mtune=generic``, batched decode at 1–16 sequences 1.00–1.04× (alternated runs;
    docs/performance.md, session 22). None: keep the compiler's own choice."""
    if native in ("znver1", "znver2", "znver3") and "avx512f" in flags:
        return "generic"
    return None


@functools.cache
def native_tune() -> str | None:
    """The ``-mtune`` that the C compiler's ``-march=native`` implies (GCC's ``-Q --help=target``), or None where
    the compiler does not say (clang, no compiler)."""
    cc = os.environ.get("CC", "cc")
    try:
        out = subprocess.run([cc, "-march=native", "-Q", "--help=target"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.stdout.splitlines():
        key, _, value = line.strip().partition(" ")
        if key == "-mtune=" and value.strip():
            return value.strip()
    return None


def build(out: Path, march: str | None = None, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Compile the kernels into ``out`` (raises CalledProcessError with the compiler's messages on failure)."""
    cc = os.environ.get("CC", "cc")
    return subprocess.run([cc, *compile_flags(march), *extra, *map(str, SOURCES), "-o", str(out), "-lm"], check=True,
                          capture_output=True, timeout=180)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels for this machine (built on first use), or None with a warning if it can't be."""
    if os.environ.get("ATTNKIT_NO_NATIVE"):
        return None
    src = b"".join(p.name.encode() + p.read_bytes() for p in SOURCES + HEADERS)
    flags = compile_flags()
    cpu = " ".join(sorted(cpu_flags())).encode()
    key = hashlib.sha256(src + " ".join(flags).encode() + cpu + sys.platform.encode()).hexdigest()[:16]
    so = cache_dir() / f"kernels-{key}.so"
    try:
        so.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # an unwritable home: build under the temporary directory instead
        so = Path(tempfile.gettempdir()) / "attnkit-kernels" / so.name
        so.parent.mkdir(parents=True, exist_ok=True)
    if not so.exists():
        with tempfile.TemporaryDirectory(dir=so.parent) as tmp:  # build aside, then rename: never a half-written .so
            out = Path(tmp) / so.name
            try:
                build(out)
            except (OSError, subprocess.SubprocessError) as e:
                detail = getattr(e, "stderr", b"") or b""
                warnings.warn(f"attnkit: could not build its C kernels ({e}; {detail.decode(errors='replace')[:300]}); "
                              "falling back to PyTorch operations", RuntimeWarning, stacklevel=2)
                return None
            os.replace(out, so)
    return load(so)


def load(so: Path) -> ctypes.CDLL:
    """A built kernel library with its functions' argument types declared."""
    lib = ctypes.CDLL(str(so))
    vp, i, ip = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int)
    lib.ak_type_info.argtypes = [i, ip, ip]
    lib.ak_type_x4_fields.argtypes = [i, ip, i]
    lib.ak_type_x4_rows.argtypes = [i]
    lib.ak_gemv.argtypes = [i, vp, vp, vp, i, i, i, vp, i]
    lib.ak_gemm.argtypes = lib.ak_gemv.argtypes  # the prompt rows' product (gemm.c)
    lib.ak_gemv_gated.argtypes = [i, vp, vp, vp, i, i, i, vp, i, i]  # act(gate)·up of a fused gate/up
    lib.ak_gemm_gated.argtypes = lib.ak_gemv_gated.argtypes
    lib.ak_quantize_act.argtypes = [i, vp, i, i, vp]  # activation rows as the products quantize them
    lib.ak_gemm_available.argtypes = [i]
    lib.ak_gemm_takes.argtypes = [i, i, i]
    lib.ak_dequantize.argtypes = [i, vp, vp, i, i, i, i]
    lib.ak_dequantize_rows.argtypes = [i, vp, vp, i, vp, i, i]
    lib.ak_paged_attention_kv.argtypes = [vp, vp, vp, i, vp, vp, vp, vp, i, i, i, i, i, i, i, ctypes.c_float, vp, i, vp,
                                          ctypes.c_float]
    lib.ak_quantize_kv_rows.argtypes = [i, vp, vp, i, i]
    lib.ak_hadamard64.argtypes = [vp, ctypes.c_int64, i]
    lib.ak_llama_decode.argtypes = [vp, i, vp, i, i, i, i, i, i, i, ctypes.c_float, vp, i, i, i, vp, vp, vp, vp,
                                    ctypes.c_size_t, i, vp, vp]
    i64, f = ctypes.c_int64, ctypes.c_float
    lib.ak_attn_train_available.argtypes = [i]
    lib.ak_attn_train_forward.argtypes = [vp, vp, vp, vp, i64, vp, vp, i, i, i, i, i, i, i]
    lib.ak_attn_train_backward.argtypes = [vp, vp, vp, vp, i64, vp, vp, vp, vp, vp, vp, i, i, i, i, i, i, f, i]
    lib.ak_attn_train_forward_bf16.argtypes = [vp, vp, vp, vp, i64, vp, vp, i, i, i, i, i, i, f, i]
    lib.ak_attn_train_backward_bf16.argtypes = lib.ak_attn_train_backward.argtypes
    lib.ak_cross_entropy.argtypes = [vp, vp, i, i, i, vp, vp, i]
    lib.ak_train_ops_available.argtypes = []
    lib.ak_swiglu_forward.argtypes = [vp, vp, i64, i64, i, i, i, vp, i]
    lib.ak_swiglu_backward.argtypes = [vp, vp, i64, i64, vp, i, i, i, vp, vp, i]
    lib.ak_rmsnorm_forward.argtypes = [vp, vp, i, i, f, vp, i, vp, i, i]
    lib.ak_rmsnorm_backward.argtypes = [vp, vp, vp, vp, i, i, i, vp, vp, i]
    lib.ak_rope_rows.argtypes = [vp, i64, i, i, i, i, vp, vp, i]
    lib.ak_moe_work_bytes.argtypes = [i, i, i, i, i, i]
    lib.ak_moe_work_bytes.restype = ctypes.c_size_t
    lib.ak_moe_ffn.argtypes = [vp, vp, vp, i, i, vp, ctypes.c_size_t, i]
    assert lib.ak_act_block_bytes() == 40  # the activation blocks' size that callers' scratch sizes assume
    return lib
