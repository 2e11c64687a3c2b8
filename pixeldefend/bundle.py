"""Model bundles: a directory with `model.safetensors`, `config.json` and, for density
models, `calibration.json`. Loading never unpickles anything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .atomic import atomic_dir, dir_lock, only_entries, write_json
from .errors import BundleError

FORMAT = "pixeldefend-bundle"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CALIBRATION = "calibration.json"


def save_bundle(
    path: str | Path,
    kind: str,
    architecture: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    meta: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
) -> Path:
    """Write a whole bundle atomically: the directory is swapped in one step
    (`atomic.atomic_dir`), so a crash leaves the previous bundle intact and a reader
    always finds a complete one; concurrent saves queue on a lock beside the bundle."""
    path = Path(path)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "package_version": __version__,
        "architecture": architecture,
        **(meta or {}),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    from .outputs import BUNDLE_FILES, prepare_dir  # the swap replaces only a bundle

    prepare_dir(path, command="save", bundle=True, overwrite=True, option="bundle")
    with atomic_dir(path, replaceable=only_entries(BUNDLE_FILES)) as tmp:
        save_file(tensors, str(tmp / WEIGHTS))
        write_json(tmp / CONFIG, config)
        if calibration is not None:
            write_json(tmp / CALIBRATION, calibration)
    return path


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise BundleError(f"{file.parent}: bundle is missing {file.name}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{file}: corrupt JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{file}: expected a JSON object")
    return data


def read_config(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """Read and check config.json: right format, compatible version, expected kind."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"{path}: no such model bundle (train one with `pixeldefend train`)")
    if not path.is_dir():
        raise BundleError(f"{path}: a model bundle is a directory with {WEIGHTS} and {CONFIG}")
    config = _read_json(path / CONFIG)
    if config.get("format") != FORMAT:
        raise BundleError(f"{path}: {CONFIG} is not a pixeldefend bundle")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format version {version} is not supported by pixeldefend "
            f"{__version__} (reads version {FORMAT_VERSION}); retrain or upgrade"
        )
    if kind is not None and config.get("kind") != kind:
        raise BundleError(f"{path}: bundle holds a {config.get('kind')!r} model, expected {kind!r}")
    return config


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    file = Path(path) / WEIGHTS
    if not file.exists():
        raise BundleError(f"{path}: bundle is missing {WEIGHTS}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BundleError(f"{file}: corrupt weights file ({exc})") from exc


def load_state_into(module: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path,
                    prefix: str = "") -> None:
    """Load `state` (keys starting with `prefix`) into `module`, with a clear error on mismatch."""
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        module.load_state_dict(own, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise BundleError(f"{path}: weights do not match config.json ({first})") from exc


def read_calibration(path: str | Path) -> dict[str, Any] | None:
    file = Path(path) / CALIBRATION
    if not file.exists():
        return None
    return _read_json(file)


def write_calibration(path: str | Path, calibration: dict[str, Any]) -> None:
    """Replace calibration.json, atomically and under the bundle's lock (a concurrent
    `save_bundle` swaps the whole directory: without the lock this write could land in
    the copy being retired)."""
    with dir_lock(path):
        read_config(path)
        write_json(Path(path) / CALIBRATION, calibration)
