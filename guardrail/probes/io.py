"""Probe weights on disk: safetensors plus a JSON config, never pickle.

``save_probe(dir, head, config)`` writes ``<name>.safetensors`` (the head's trained tensors) and
``<name>.json`` (the head's own config under ``"head"``, the tensor shapes, and whatever the caller
records: base model, layer, threshold, rule, data sources, split sizes, metrics).
``load_probe(path)`` rebuilds the head and checks everything it can, with errors that name the
file and the key. ``load_paper_probe(dir)`` reads probes released in the entity-hallucination
paper's format (``probe_config.json`` + ``probe_head.safetensors`` or ``probe_head.bin``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import GuardrailError
from .heads import HEADS, LinearProbe, ProbeHead, build_head

__all__ = [
    "FORMAT",
    "PICKLE_SUFFIXES",
    "LoadedProbe",
    "ProbeFileError",
    "check_observer",
    "load_paper_probe",
    "load_probe",
    "save_probe",
]

FORMAT = "guardrail-probe"
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})


class ProbeFileError(GuardrailError):
    """A probe's files are missing, unsafe, or do not agree with each other or the observer."""


@dataclass
class LoadedProbe:
    """A rebuilt head with its config (``config["head"]`` is the head's own config) and the path
    of the weights it came from."""

    head: ProbeHead
    config: dict[str, Any]
    path: Path
    notes: list[str] = field(default_factory=list)

    @property
    def layer(self) -> int | None:
        layer = self.config.get("layer")
        return int(layer) if layer is not None else None

    @property
    def threshold(self) -> float | None:
        value = self.config.get("threshold")
        return float(value) if value is not None else None


def _json_safe(value: Any, where: str) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise ProbeFileError(f"probe config {where} is not JSON-serialisable: {exc}") from None
    return value


def save_probe(directory: str | Path, head: ProbeHead, config: Mapping[str, Any],
               name: str = "probe") -> Path:
    """Write ``<directory>/<name>.safetensors`` and ``<name>.json``; return the weights path.

    ``config`` holds what a user needs to trust and use the probe; recommended keys:
    ``base_model``, ``layer``, ``threshold``, ``rule``, ``data`` (sources), ``splits`` (sizes),
    ``metrics``. The keys ``format``, ``head`` and ``tensors`` are written by this function."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    reserved = {"format", "head", "tensors"} & set(config)
    if reserved:
        raise ProbeFileError(f"probe config may not set {sorted(reserved)}: save_probe writes them")
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    document = {
        "format": FORMAT,
        "version": 1,
        "name": name,
        "head": head.config,
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        **{k: _json_safe(v, repr(k)) for k, v in config.items()},
    }
    weights = directory / f"{name}.safetensors"
    save_file(tensors, str(weights), metadata={"format": "pt", "guardrail": FORMAT})
    (directory / f"{name}.json").write_text(json.dumps(document, indent=2) + "\n",
                                            encoding="utf-8")
    return weights


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ProbeFileError(
            f"refusing to load {path}: {path.suffix} files are pickle, which can run arbitrary "
            "code when loaded. guardrail loads probe weights from safetensors only; convert it "
            "with safetensors.torch.save_file(torch.load(path, weights_only=True), "
            "'probe.safetensors') and write the JSON config beside it."
        )


def _resolve(path: Path, name: str | None) -> tuple[Path, Path]:
    """(weights, config) paths for a directory, a .safetensors file or a .json file."""
    _refuse_pickle(path)
    if path.is_dir():
        if name is None:
            candidates = sorted(path.glob("*.safetensors"))
            if len(candidates) != 1:
                found = ", ".join(c.name for c in candidates) or "none"
                raise ProbeFileError(f"{path}: expected one .safetensors probe (found {found}); "
                                     "pass name=")
            return candidates[0], candidates[0].with_suffix(".json")
        path = path / f"{name}.safetensors"
    if path.suffix == ".json":
        return path.with_suffix(".safetensors"), path
    if path.suffix != ".safetensors":
        raise ProbeFileError(
            f"{path}: a probe is a .safetensors file with a .json config beside it"
        )
    return path, path.with_suffix(".json")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.exists():
        raise ProbeFileError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ProbeFileError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise ProbeFileError(f"{path}: expected a JSON object")
    return data


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise ProbeFileError(f"probe weights not found: {path}")
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types on bad files
        raise ProbeFileError(f"{path}: not a readable safetensors file ({exc})") from None


def _fill(head: ProbeHead, tensors: Mapping[str, torch.Tensor], weights: Path,
          config_path: Path) -> None:
    """Copy tensors into ``head``, naming any key or shape that disagrees with the config."""
    expected = head.state_dict()
    for key in expected:
        if key not in tensors:
            raise ProbeFileError(f"{weights} lacks tensor {key!r} that the head described in "
                                 f"{config_path} ({head.config}) needs")
    for key, tensor in tensors.items():
        if key not in expected:
            raise ProbeFileError(f"{weights} has tensor {key!r} that the head described in "
                                 f"{config_path} does not have")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ProbeFileError(
                f"tensor {key!r} has shape {tuple(tensor.shape)} in {weights}, but the head "
                f"config in {config_path} ({head.config}) gives {tuple(expected[key].shape)}"
            )
    head.load_state_dict(dict(tensors), strict=True)


def check_observer(loaded: LoadedProbe, observer: Any) -> None:
    """Raise if the probe cannot read this observer's states (hidden size, layer range)."""
    # The observer's width the probe was trained on: ``dims.hidden_size`` when the head reads more
    # than one row of states per token (several layers, pooled states), else the head's width.
    dims = loaded.config.get("dims")
    size = dims.get("hidden_size") if isinstance(dims, dict) else None
    if size is None:
        size = loaded.config.get("head", {}).get("hidden_size")
    if size is not None and int(size) != int(observer.hidden_size):
        raise ProbeFileError(
            f"probe {loaded.path} reads hidden size {size} but observer "
            f"{getattr(observer, 'name', '?')!r} has hidden size {observer.hidden_size}"
        )
    layer = loaded.layer
    n_layers = int(getattr(observer, "num_layers", 0) or 0)
    if layer is not None and n_layers and not -n_layers <= layer < n_layers:
        raise ProbeFileError(
            f"probe {loaded.path} reads layer {layer} but observer "
            f"{getattr(observer, 'name', '?')!r} has {n_layers} layers"
        )
    base = loaded.config.get("base_model")
    name = getattr(observer, "name", None)
    if base and name and base != name:
        loaded.notes.append(f"probe trained on {base!r}, observer is {name!r}")


def load_probe(path: str | Path, *, name: str | None = None, observer: Any = None,
               embedding: torch.Tensor | None = None) -> LoadedProbe:
    """Load a probe saved by ``save_probe``: a directory (with ``name``, or holding one probe),
    its ``.safetensors`` or its ``.json``. With ``observer``, also check the dims match. Router
    heads need ``embedding`` (the observer's input embedding table)."""
    weights, config_path = _resolve(Path(path), name)
    if not weights.exists():
        raise ProbeFileError(f"probe weights not found: {weights}")
    config = _read_json(config_path, "probe config")
    if config.get("format") != FORMAT:  # the file's own value is not echoed: it may be anything
        raise ProbeFileError(f"{config_path}: not a guardrail probe config (key 'format' must be "
                             f"{FORMAT!r})")
    head_config = config.get("head")
    if not isinstance(head_config, dict):
        raise ProbeFileError(f"{config_path}: key 'head' (the head's kind and dims) is missing")
    kind = head_config.get("kind")
    if not isinstance(kind, str) or kind not in HEADS:  # named, not echoed, like 'format'
        raise ProbeFileError(f"{config_path}: key 'head.kind' must be one of "
                             f"{', '.join(sorted(HEADS))} (a plugin's head kind is known once "
                             "the module defining it is imported)")
    try:
        head = build_head(head_config, embedding=embedding)
    except ValueError as exc:
        raise ProbeFileError(f"{config_path}: key 'head': {exc}") from None
    tensors = _load_tensors(weights)
    declared = config.get("tensors")
    if isinstance(declared, dict):
        for key, shape in declared.items():
            if key in tensors and list(tensors[key].shape) != list(shape):
                raise ProbeFileError(
                    f"{config_path}: key 'tensors.{key}' says shape {shape}, {weights} holds "
                    f"{list(tensors[key].shape)}"
                )
    _fill(head, tensors, weights, config_path)
    head.eval()
    loaded = LoadedProbe(head, config, weights)
    if observer is not None:
        check_observer(loaded, observer)
    return loaded


def _paper_state(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    safe = directory / "probe_head.safetensors"
    if safe.exists():
        return _load_tensors(safe), safe
    pickled = directory / "probe_head.bin"
    if not pickled.exists():
        raise ProbeFileError(f"{directory}: no probe_head.safetensors or probe_head.bin")
    try:
        # weights_only=True uses torch's restricted unpickler: tensors and plain containers only.
        state = torch.load(pickled, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types on unsafe/bad files
        raise ProbeFileError(f"{pickled}: not a weights-only state dict ({exc})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise ProbeFileError(f"{pickled}: expected a state dict of tensors")
    return state, pickled


def load_paper_probe(directory: str | Path, *, observer: Any = None) -> LoadedProbe:
    """Load a probe released in the entity-hallucination paper's format: ``probe_config.json``
    (``layer_idx``, ``hidden_size``) and the value head's state dict (``weight``, ``bias``) as
    ``probe_head.safetensors`` or ``probe_head.bin`` (read with ``torch.load(weights_only=True)``).
    The layer index counts decoder blocks from 0, as ``Needs.layers`` does. A LoRA adapter beside
    the head is not applied (noted in ``notes`` and warned about)."""
    directory = Path(directory)
    config_path = directory / "probe_config.json"
    raw = _read_json(config_path, "paper probe config")
    for key in ("layer_idx", "hidden_size"):
        if not isinstance(raw.get(key), int):
            raise ProbeFileError(f"{config_path}: key {key!r} must be an integer, "
                                 f"got {raw.get(key)!r}")
    state, weights = _paper_state(directory)
    # The paper saves ``value_head.state_dict()``; accept a ``value_head.`` prefix too.
    state = {k.removeprefix("value_head."): v for k, v in state.items()}
    head = LinearProbe(raw["hidden_size"])
    renamed = {f"linear.{k}": v.float() for k, v in state.items()}
    _fill(head, renamed, weights, config_path)
    head.eval()
    config = {"format": FORMAT, "head": head.config, "layer": raw["layer_idx"],
              "source": "obeso-2025-release", "target_layer_name": raw.get("target_layer_name"),
              "threshold": 0.5}
    loaded = LoadedProbe(head, config, weights)
    if (directory / "adapter_model.safetensors").exists() or (
            directory / "adapter_config.json").exists():
        note = (f"{directory} has a LoRA adapter, which is not applied: this probe's scores "
                "match the paper's only on a model with that adapter merged")
        loaded.notes.append(note)
        warnings.warn(note, stacklevel=2)
    if observer is not None:
        check_observer(loaded, observer)
    return loaded
