"""Products of float32 rows with weights kept in GGUF's Q4_1 / Q8_0 blocks
(``observer.options.matmul: q4_1``; docs/observer.md, "Mixed-precision products").

SmolLM2's float32 weights are its GGUF dequantized: every projection weight of its blocks is
exactly ``q * d + m`` over blocks of 32 inputs (``q`` in 0..15, ``d`` and ``m`` float16; Q4_1)
and every head weight ``q * d`` (``q`` an int8; Q8_0). Kept as those blocks a read streams 5
(9) bits a weight instead of float16's 16, and a small C kernel (``blockq.c``) rebuilds each
weight as the same float32 (in registers for up to 4 rows, into a panel shared by the rows
from 5), so the products are float32's but for the summation order. The blocks are recovered
from the float32 weights and checked bit for bit; a weight that is not exactly such blocks is
refused (``BlockqError``).

The kernel is compiled once per machine with the system's C compiler into the cache directory
(``$GUARDRAIL_CC`` names another compiler) and loaded with ctypes, in one library with
``blockstep.c`` (a forward's decoder blocks in one call, ``guardrail.observer.blockstep``),
which calls its products.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import torch

from ..cache import cache_dir

__all__ = ["BlockqError", "Q4_1Weight", "Q8_0Weight", "kernel", "kernel_unavailable",
           "q4_1_blocks", "q8_0_blocks"]

FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-shared", "-fPIC")
_BLOCK = 32
_VERSION = 6  # guardrail_blockq_version() of the source this module drives


class BlockqError(ValueError):
    """A weight is not exactly Q4_1 / Q8_0 blocks, or the kernel cannot be built or loaded."""


SOURCES = ("blockq.c", "blockstep.c")  # built into one library: blockstep calls the products
_STEP_VERSION = 1  # guardrail_blockstep_version() of blockstep.c (its argtypes: blockstep.py)


def _source() -> bytes:
    """The sources, named and joined (what the library's cache key hashes)."""
    here = resources.files("guardrail.observer")
    return b"".join(name.encode() + b"\0" + here.joinpath(name).read_bytes()
                    for name in SOURCES)


def _compiler() -> str | None:
    named = os.environ.get("GUARDRAIL_CC")
    if named is not None:
        return shutil.which(named)
    return shutil.which("cc") or shutil.which("gcc")


_LOADED: dict[str, ctypes.CDLL] = {}


def kernel() -> ctypes.CDLL:
    """The compiled kernel, built into ``<cache>/kernels/`` on first use (keyed by a hash of
    the sources and flags; written under a temporary name and renamed, so processes building
    at once do not race). Raises ``BlockqError`` saying why it cannot be had."""
    why = _cpu_unsupported()
    if why is not None:
        raise BlockqError(why)
    source = _source()
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + platform.machine().encode())
    path = cache_dir() / "kernels" / f"blockq-{key.hexdigest()[:16]}.so"
    if str(path) in _LOADED:
        return _LOADED[str(path)]
    if not path.exists():
        try:
            _build(path)
        except (OSError, subprocess.SubprocessError) as exc:  # a read-only cache, a hung cc
            raise BlockqError(f"cannot build the kernel into {path.parent}: {exc}") from exc
    try:
        lib = ctypes.CDLL(str(path))
        if (lib.guardrail_blockq_version() != _VERSION
                or lib.guardrail_blockstep_version() != _STEP_VERSION):
            raise BlockqError(f"{path} is another version of the kernel; delete it")
    except (OSError, AttributeError) as exc:  # AttributeError: a library without blockstep
        raise BlockqError(f"cannot load {path}: {exc}") from exc
    ptr, size = ctypes.c_void_p, ctypes.c_int
    lib.guardrail_q4_1.argtypes = [ptr, size, size, ptr, ptr, ptr, size, ptr]
    lib.guardrail_q8_0.argtypes = [ptr, size, size, ptr, ptr, size, ptr]
    lib.guardrail_q4_1.restype = lib.guardrail_q8_0.restype = ctypes.c_int
    lib.guardrail_pack_q4_1.argtypes = [ptr, size, size, ptr, ptr, ptr]
    lib.guardrail_pack_q8_0.argtypes = [ptr, size, size, ptr, ptr]
    lib.guardrail_pack_q4_1.restype = lib.guardrail_pack_q8_0.restype = ctypes.c_long
    _LOADED[str(path)] = lib
    return lib


def kernel_unavailable() -> str | None:
    """Why the kernel cannot run here, or None (builds it if need be)."""
    try:
        kernel()
    except BlockqError as exc:
        return str(exc)
    return None


def _cpu_unsupported() -> str | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernel is written for x86-64 (AVX2), not {platform.machine()}"
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    missing = [k for k in ("avx2", "fma3", "f16c") if not caps.get(k)]
    if missing:
        return f"the CPU lacks {', '.join(m.upper() for m in missing)}, which the kernel needs"
    return None


def _build(path: Path) -> None:
    cc = _compiler()
    if cc is None:
        named = os.environ.get("GUARDRAIL_CC")
        raise BlockqError(f"no C compiler ($GUARDRAIL_CC={named!r} not found)" if named
                          else "no C compiler (cc or gcc) on the PATH; set $GUARDRAIL_CC")
    path.parent.mkdir(parents=True, exist_ok=True)
    here = resources.files("guardrail.observer")
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        sources = []
        for name in SOURCES:
            src = Path(tmp) / name
            src.write_bytes(here.joinpath(name).read_bytes())
            sources.append(str(src))
        out = Path(tmp) / path.name
        proc = subprocess.run([cc, *FLAGS, "-o", str(out), *sources], capture_output=True,
                              text=True, timeout=120)
        if proc.returncode != 0:
            raise BlockqError(f"{cc} failed to build the kernel: {proc.stderr.strip()[-400:]}")
        os.replace(out, path)  # atomic: another process sees the whole file or none


def _weight(weight: torch.Tensor) -> torch.Tensor:
    w = weight.detach()
    if w.dtype != torch.float32 or w.dim() != 2 or w.shape[1] % _BLOCK or w.device.type != "cpu":
        raise BlockqError(f"a {tuple(w.shape)} {w.dtype} weight on {w.device} is not float32 "
                          "blocks of 32 on the CPU")
    return w.contiguous()


def _nbp(k: int) -> int:
    return (k // _BLOCK + 7) // 8 * 8  # blocks per output row, padded to a multiple of 8


def q4_1_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight`` (N, K) as the kernel's Q4_1 blocks: nibbles (N, K/32, 16) uint8, d (N, nbp)
    float32 and m (N, nbp) float16 (nbp: K/32 rounded up to 8, zero-padded), such that
    ``q * d + m`` in float32 is every weight bit for bit; ``BlockqError`` if the weight is not
    such blocks (``q`` in 0..15, ``d`` and ``m`` float16 values, a block's minimum at
    ``q = 0``: as GGUF's quantizer makes them)."""
    w = _weight(weight)
    n, k = int(w.shape[0]), int(w.shape[1])
    qs = torch.zeros(n, k // _BLOCK, 16, dtype=torch.uint8)
    d = torch.zeros(n, _nbp(k))
    m = torch.zeros(n, _nbp(k), dtype=torch.float16)
    bad = kernel().guardrail_pack_q4_1(w.data_ptr(), n, k, qs.data_ptr(), d.data_ptr(),
                                       m.data_ptr())
    if bad:
        raise BlockqError(f"a {tuple(w.shape)} weight is not exact Q4_1 blocks ({bad} of "
                          f"{n * (k // _BLOCK)} blocks of 32 are not q * d + m)")
    return qs, d, m


def q8_0_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (N, K) as the kernel's Q8_0 blocks: (N, K/32, 32) int8 and d (N, nbp) float32
    with ``q * d`` every weight bit for bit (``d`` a float16 value, the largest magnitude at
    ``|q|`` 100-127); ``BlockqError`` if the weight is not such blocks."""
    w = _weight(weight)
    n, k = int(w.shape[0]), int(w.shape[1])
    qs = torch.zeros(n, k // _BLOCK, 32, dtype=torch.int8)
    d = torch.zeros(n, _nbp(k))
    bad = kernel().guardrail_pack_q8_0(w.data_ptr(), n, k, qs.data_ptr(), d.data_ptr())
    if bad:
        raise BlockqError(f"a {tuple(w.shape)} weight is not exact Q8_0 blocks ({bad} of "
                          f"{n * (k // _BLOCK)} blocks of 32 are not q * d)")
    return qs, d


class _BlockWeight:
    """A weight (N, K) in blocks; ``__call__(x)`` is ``x @ W.T`` on float32 rows."""

    _fn_name = ""

    def __init__(self, parts: tuple[torch.Tensor, ...], k: int) -> None:
        self.parts = parts  # kept alive: the kernel reads their memory
        self._ptrs = [p.data_ptr() for p in parts]
        self.out_features, self.in_features = int(parts[0].shape[0]), k
        self._fn = getattr(kernel(), self._fn_name)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # as few tensor ops as can be: 121 calls a forward of SmolLM2, 3 us each saved 0.4 ms
        k = self.in_features
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        out = torch.empty((*x.shape[:-1], self.out_features))
        if self._fn(x.data_ptr(), x.numel() // k, k, *self._ptrs, self.out_features,
                    out.data_ptr()):
            raise MemoryError("guardrail's q4_1 kernel could not allocate its buffers")
        return out


class Q4_1Weight(_BlockWeight):
    _fn_name = "guardrail_q4_1"

    @classmethod
    def of(cls, weight: torch.Tensor) -> Q4_1Weight:
        return cls(q4_1_blocks(weight), int(weight.shape[1]))


class Q8_0Weight(_BlockWeight):
    _fn_name = "guardrail_q8_0"

    @classmethod
    def of(cls, weight: torch.Tensor) -> Q8_0Weight:
        return cls(q8_0_blocks(weight), int(weight.shape[1]))
