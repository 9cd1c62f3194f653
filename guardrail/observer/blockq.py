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

``observer.options.matmul: q4_1_q8`` / ``q4_1_q16`` multiply the same blocks in integers
(``Q4_1IntWeight``, ``Q8_0IntWeight``): the weights regrouped 8 output rows to a vector at load,
each row quantized per block of 32 to int8 or int16 on every product (``quantize_rows``), as
llama.cpp does on the CPU; the rows' rounding makes these not float32's products.

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

__all__ = ["BlockqError", "Q4_1IntWeight", "Q4_1Weight", "Q8_0IntWeight", "Q8_0Weight",
           "kernel", "kernel_unavailable", "q4_1_blocks", "q4_1_groups", "q8_0_blocks",
           "q8_0_groups", "quantize_rows"]

FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-shared", "-fPIC")
_BLOCK = 32
_VERSION = 8  # guardrail_blockq_version() of the source this module drives


class BlockqError(ValueError):
    """A weight is not exactly Q4_1 / Q8_0 blocks, or the kernel cannot be built or loaded."""


SOURCES = ("blockq.c", "blockstep.c")  # built into one library: blockstep calls the products
_STEP_VERSION = 2  # guardrail_blockstep_version() of blockstep.c (its argtypes: blockstep.py)


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
    lib.guardrail_q4_1_fixed.argtypes = lib.guardrail_q4_1.argtypes
    lib.guardrail_q4_1.restype = lib.guardrail_q8_0.restype = ctypes.c_int
    lib.guardrail_q4_1_fixed.restype = ctypes.c_int
    lib.guardrail_pack_q4_1.argtypes = [ptr, size, size, ptr, ptr, ptr]
    lib.guardrail_pack_q8_0.argtypes = [ptr, size, size, ptr, ptr]
    lib.guardrail_pack_q4_1.restype = lib.guardrail_pack_q8_0.restype = ctypes.c_long
    for bits in (8, 16):
        getattr(lib, f"guardrail_q4_1_q{bits}").argtypes = [ptr, size, size, ptr, ptr, ptr,
                                                            size, ptr]
        getattr(lib, f"guardrail_q8_0_q{bits}").argtypes = [ptr, size, size, ptr, ptr, size, ptr]
        getattr(lib, f"guardrail_q4_1_q{bits}").restype = ctypes.c_int
        getattr(lib, f"guardrail_q8_0_q{bits}").restype = ctypes.c_int
    lib.guardrail_quantize_rows.argtypes = [size, ptr, size, size, ptr, ptr, ptr]
    lib.guardrail_quantize_rows.restype = None
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

    def __init__(self, parts: tuple[torch.Tensor, ...], k: int, n: int | None = None,
                 fn_name: str | None = None) -> None:
        self.parts = parts  # kept alive: the kernel reads their memory
        self._ptrs = [p.data_ptr() for p in parts]
        self.out_features = int(parts[0].shape[0]) if n is None else n
        self.in_features = k
        self._fn = getattr(kernel(), fn_name or self._fn_name)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # as few tensor ops as can be: 121 calls a forward of SmolLM2, 3 us each saved 0.4 ms
        k = self.in_features
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        out = torch.empty((*x.shape[:-1], self.out_features))
        if self._fn(x.data_ptr(), x.numel() // k, k, *self._ptrs, self.out_features,
                    out.data_ptr()):
            raise MemoryError("guardrail's blockq kernel could not allocate its buffers")
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


# ---- Integer products (observer.options.matmul: q4_1_q8 / q4_1_q16) ----
# The same blocks laid out for blockq.c's integer kernels: groups of 8 output rows, one int32
# lane per output row (the C source describes each layout), rows quantized per block of 32 to
# int8 (``bits`` 8) or int16 (16) on every call.

_GROUP = 8


def _natural_q4_1(qs: torch.Tensor) -> torch.Tensor:
    """The kernel's Q4_1 nibbles (N, nb, 16) as q (N, nb, 32) uint8 in input order (byte j < 8
    holds weights j and j + 8, byte 8 + j weights 16 + j and 24 + j)."""
    low, high = qs & 15, qs >> 4
    return torch.cat((low[..., :8], high[..., :8], low[..., 8:], high[..., 8:]), dim=-1)


def _grouped(t: torch.Tensor) -> torch.Tensor:
    """(N, ...) zero-padded to a multiple of 8 rows and viewed as (groups, 8, ...)."""
    n = int(t.shape[0])
    pad = -n % _GROUP
    if pad:
        t = torch.cat((t, t.new_zeros((pad, *t.shape[1:]))))
    return t.reshape(-1, _GROUP, *t.shape[1:])


def _group_scales(d: torch.Tensor, nb: int) -> torch.Tensor:
    """Per-block scales (N, nbp) as (groups, nb, 8) float32."""
    return _grouped(d[:, :nb].float()).permute(0, 2, 1).contiguous()


def _q16_q4_1_index() -> tuple[torch.Tensor, torch.Tensor]:
    """For the int16 Q4_1 layout: per vector h of a block and byte b, the output row and the
    input (of 32) of its low nibble (its high nibble: that input + 4)."""
    byte = torch.arange(32)
    which, lane = (byte % 16) // 8, (byte // 16) * 8 + byte % 8
    out = lane // 2
    inputs = torch.stack([8 * h + 2 * which + lane % 2 for h in range(4)])
    return out.expand(4, 32), inputs


def q4_1_groups(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor,
                                                          torch.Tensor]:
    """``weight`` (N, K), exactly Q4_1 blocks (else ``BlockqError``), laid out for the integer
    kernel on rows of ``bits`` (8 or 16): nibbles (groups, K/32 * 128) uint8, d and m
    (groups, K/32, 8) float32."""
    qs, d, m = q4_1_blocks(weight)
    nb = int(qs.shape[1])
    q = _grouped(_natural_q4_1(qs))  # (G, 8, nb, 32)
    if bits == 8:  # byte 4o + t of vector j: inputs 8j + t (low) and 8j + 4 + t (high)
        v = q.reshape(q.shape[0], _GROUP, nb, 4, 2, 4).permute(0, 2, 3, 4, 1, 5)
        packed = v[:, :, :, 0] | (v[:, :, :, 1] << 4)
    else:
        out, inputs = _q16_q4_1_index()
        qp = q.permute(0, 2, 1, 3)  # (G, nb, 8, 32)
        packed = qp[:, :, out, inputs] | (qp[:, :, out, inputs + 4] << 4)
    return (packed.reshape(q.shape[0], -1).contiguous(), _group_scales(d, nb),
            _group_scales(m, nb))


def q8_0_groups(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (N, K), exactly Q8_0 blocks (else ``BlockqError``), laid out for the integer
    kernel on rows of ``bits``: int8 (groups, K/32 * 256) as uint8 bytes, d (groups, K/32, 8)."""
    qs, d = q8_0_blocks(weight)
    nb = int(qs.shape[1])
    q = _grouped(qs)  # (G, 8, nb, 32)
    per = 4 if bits == 8 else 2  # inputs per output row in one vector
    v = q.reshape(q.shape[0], _GROUP, nb, 32 // per, per).permute(0, 2, 3, 1, 4)
    packed = v.contiguous().view(torch.uint8).reshape(q.shape[0], -1)
    return packed, _group_scales(d, nb)


def quantize_rows(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor,
                                                       torch.Tensor]:
    """The kernel's quantization of float32 rows (M, K): q (M, K) int8 or int16, per block of
    32 d = max|x| / 127 (32767) and s = d * sum(q), both (M, K/32)."""
    x = x.float().contiguous()
    m, k = int(x.shape[0]), int(x.shape[1])
    q = torch.empty(m, k, dtype=torch.int8 if bits == 8 else torch.int16)
    d, s = torch.empty(m, k // _BLOCK), torch.empty(m, k // _BLOCK)
    kernel().guardrail_quantize_rows(bits, x.data_ptr(), m, k, q.data_ptr(), d.data_ptr(),
                                     s.data_ptr())
    return q, d, s


class Q4_1IntWeight(_BlockWeight):
    """Q4_1 blocks multiplied in integers with rows quantized to int8 (``bits`` 8) or int16."""

    @classmethod
    def of(cls, weight: torch.Tensor, bits: int = 8) -> Q4_1IntWeight:
        return cls(q4_1_groups(weight, bits), int(weight.shape[1]), int(weight.shape[0]),
                   f"guardrail_q4_1_q{bits}")


class Q8_0IntWeight(_BlockWeight):
    """Q8_0 blocks (the head) multiplied in integers with rows quantized to int8 or int16."""

    @classmethod
    def of(cls, weight: torch.Tensor, bits: int = 8) -> Q8_0IntWeight:
        return cls(q8_0_groups(weight, bits), int(weight.shape[1]), int(weight.shape[0]),
                   f"guardrail_q8_0_q{bits}")
