"""Where a command may write: never onto its own inputs, never over what pixeldefend did
not create, and every check made before the slow work starts.

Rules (README, "Outputs never destroy your files"):

- An output file (`--output`, `--junit`, `sample --out`, `--npz`) that already exists as a
  regular file is replaced only with `--overwrite`; a device node or FIFO (`/dev/null`) is
  written through; a symlink is followed. It may never be one of the call's inputs or lie
  inside an input bundle (`-o models/digits/config.json`).
- An output folder is created with a marker file, `.pixeldefend-output.json`, naming the
  command. A non-empty folder without the marker (or, for bundles, without a valid
  pixeldefend `config.json` and nothing but bundle files) was not made by pixeldefend and
  is never emptied or written into, `--overwrite` or not. One with the marker is replaced
  only with `--overwrite` (or continued with `--resume` where the command has it).
- An output folder may not equal or contain an input (`train --data X --out X`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .atomic import atomic_path, is_write_through, resolve_target, write_json
from .data import (
    ARRAY_EXTENSIONS,
    list_image_files,
    parse_builtin,
    save_image,
    save_npz,
    split_slice,
    to_8bit,
)
from .errors import UsageError

MARKER = ".pixeldefend-output.json"
LOSSLESS = {".png", ".bmp", ".tif", ".tiff"}  # purify writes these as they came; others .png
BUNDLE_FILES = frozenset({"model.safetensors", "config.json", "calibration.json", MARKER})
OVERWRITE_HINT = "pass overwrite=True to replace it"


class OutputError(UsageError):
    """An output location that may not or cannot be written (exit 2, before any work).

    `label` names the output (a parameter such as `out`, or the caller's own name for
    it) at the start of the message; the CLI shows a parameter as its flag."""

    label: str | None = None

    @classmethod
    def at(cls, label: str, message: str) -> OutputError:
        error = cls(message)
        error.label = label
        return error


def input_paths(*specs: str | os.PathLike[str] | Iterable[str] | None) -> list[Path]:
    """The existing files and folders among data specs (built-in names such as
    `digits:test` and slices such as `folder[:100]` are reduced to their path)."""
    found: list[Path] = []
    for spec in specs:
        if spec is None:
            continue
        items = [spec] if isinstance(spec, str | os.PathLike) else list(spec)
        for item in items:
            text = os.fspath(item)
            base = split_slice(text)[0] if isinstance(item, str) else text
            if isinstance(item, str) and parse_builtin(base) is not None:
                continue
            for candidate in {text, base, text.split("@", 1)[-1]}:
                if candidate and os.path.lexists(candidate):
                    found.append(resolve_target(candidate))
    return found


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _is_bundle(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("format") == "pixeldefend-bundle"


def _writable_ancestor(path: Path, option: str) -> None:
    """The nearest existing ancestor must be a folder we may create entries in."""
    for parent in path.parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise OutputError.at(option, f"{option} {path}: {parent} is not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputError.at(option, f"{option} {path}: cannot write in {parent} "
                                  "(permission denied)")
            return


def check_file(path: Path | None, *, inputs: Iterable[Path] = (), overwrite: bool = False,
               option: str = "output") -> Path | None:
    """Refuse, up front, an output file that would replace an input, a folder or an
    existing file without --overwrite, or that cannot be written."""
    if path is None:
        return None
    real = resolve_target(path)
    exists = os.path.lexists(real)
    for item in inputs:
        # the input itself, a file of an input folder (it may be read), or any path
        # inside an input bundle
        if real == item or (item.is_dir() and _inside(real, item) and
                            (exists or _is_bundle(item))):
            raise OutputError.at(
                option, f"{option} {path} would overwrite an input of this command "
                        f"({item}): write the output somewhere else")
    try:
        mode = os.stat(real).st_mode
    except (FileNotFoundError, NotADirectoryError):
        _writable_ancestor(real, option)
        return path
    except OSError as exc:
        raise OutputError.at(option, f"{option} {path}: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        raise OutputError.at(option, f"{option} {path} is a folder, not a file")
    if is_write_through(real):
        if not os.access(real, os.W_OK):
            raise OutputError.at(option, f"{option} {path}: not writable")
        return path
    if not overwrite:
        raise OutputError.at(option, f"{option} {path} already exists: {OVERWRITE_HINT}")
    if not os.access(real.parent, os.W_OK | os.X_OK):
        raise OutputError.at(
            option, f"{option} {path}: cannot write in {real.parent} (permission denied)")
    return path


def check_files(*paths: tuple[Path | None, str], inputs: Iterable[Path] = (),
                overwrite: bool = False) -> None:
    """`check_file` for several (path, option) pairs; two outputs may not coincide."""
    inputs = list(inputs)
    seen: dict[Path, str] = {}
    for path, option in paths:
        if path is None:
            continue
        check_file(path, inputs=inputs, overwrite=overwrite, option=option)
        real = resolve_target(path)
        if real in seen and not is_write_through(real):
            raise OutputError(f"{seen[real]} and {option} name the same file {path}")
        seen[real] = option


@dataclass(frozen=True)
class OutputDir:
    """A checked output folder: `existing` says whether it already held our output."""

    path: Path
    command: str
    existing: bool

    def mark(self) -> None:
        """Create the folder (if needed) with its marker."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_marker(self.path, self.command)


def write_marker(folder: Path, command: str) -> None:
    write_json(folder / MARKER, {"created_by": "pixeldefend", "command": command,
                                 "version": __version__})


def owner(folder: Path) -> str | None:
    """'marker' or 'bundle' when pixeldefend made `folder`; None when it did not."""
    if (folder / MARKER).is_file():
        try:
            doc = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            doc = None
        if isinstance(doc, dict) and doc.get("created_by") == "pixeldefend":
            return "marker"
    if _is_bundle(folder):
        return "bundle"
    return None


def prepare_dir(path: Path, *, command: str, inputs: Iterable[Path] = (),
                overwrite: bool = False, resume: bool = False, can_resume: bool = False,
                option: str = "out", bundle: bool = False) -> OutputDir:
    """Check an output folder before any work; refuse what is not ours to replace.

    `bundle`: the folder is a model bundle (recognised by its config.json too; it may
    hold only bundle files). `can_resume`: the command continues its own earlier output
    with --resume. Nothing is created or deleted here except for `clear_dir` callers.
    """
    real = resolve_target(path)
    for item in inputs:
        if _inside(item, real):
            what = "is" if item == real else "contains"
            raise OutputError.at(
                option, f"{option} {path} {what} an input of this command ({item}): "
                        "write the output to another folder")
    if os.path.lexists(real) and not real.is_dir():
        raise OutputError.at(option, f"{option} {path} is a file, not a folder")
    if not real.is_dir():
        _writable_ancestor(real, option)
        return OutputDir(path, command, existing=False)
    try:
        entries = sorted(p.name for p in real.iterdir())
    except OSError as exc:
        raise OutputError.at(
            option, f"{option} {path}: cannot read the folder ({exc.strerror})") from None
    if not os.access(real, os.W_OK | os.X_OK) or not os.access(real.parent, os.W_OK | os.X_OK):
        raise OutputError.at(option, f"{option} {path}: not writable (permission denied)")
    if not [e for e in entries if e != MARKER]:  # empty, or ours and still empty
        return OutputDir(path, command, existing=False)
    made_by = owner(real)
    if made_by is None or (made_by == "bundle" and not bundle):
        raise OutputError(
            f"{option} {path} is a non-empty folder that pixeldefend did not create; "
            "refusing to write into it (overwrite=True only replaces pixeldefend's own "
            "outputs): choose a new or empty folder")
    if bundle or made_by == "bundle":
        foreign = [e for e in entries if e not in BUNDLE_FILES]
        if foreign:
            raise OutputError(
                f"{option} {path} holds files that are not part of a bundle "
                f"({', '.join(foreign[:5])}); refusing to replace it even with overwrite=True: "
                "move them or choose another folder")
    if not (overwrite or (resume and can_resume)):
        hint = OVERWRITE_HINT + (" or resume=True to continue it" if can_resume else "")
        what = "a model bundle" if made_by == "bundle" else "pixeldefend output"
        raise OutputError.at(option, f"{option} {path} already holds {what}: {hint}")
    return OutputDir(path, command, existing=True)


def check_checkpoint_dir(path: Path, files: frozenset[str]) -> None:
    """A training checkpoint folder (`OUT.checkpoint`) is replaced every epoch and deleted
    at the end: refuse, up front, a folder of that name holding anything else."""
    real = resolve_target(path)
    if os.path.lexists(real) and not real.is_dir():
        raise OutputError(f"{path} (the training checkpoint) is a file, not a folder")
    if real.is_dir():
        foreign = sorted(p.name for p in real.iterdir() if p.name not in files)
        if foreign:
            raise OutputError(f"{path} is not a pixeldefend training checkpoint (it holds "
                              f"{', '.join(foreign[:5])}): move it or choose another output folder")


def clear_dir(out: OutputDir) -> None:
    """Empty a folder `prepare_dir` proved to be ours (marker), before rewriting it."""
    if out.existing and owner(resolve_target(out.path)) == "marker":
        for child in resolve_target(out.path).iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


# ------------------------------------------------------------------- purify --out


@dataclass
class PurifyOutputs:
    """Where each input's purified copy goes (`purify --out`), and the array files being
    collected: a file keeps its name, a folder its layout, and no two inputs may share a
    target."""

    out: Path
    levels: int
    image_targets: dict[str, Path] = field(default_factory=dict)
    arrays: dict[str, dict[str, Any]] = field(default_factory=dict)  # source -> collected

    @classmethod
    def plan(cls, paths: list[str], out: Path, levels: int) -> PurifyOutputs:
        """Map every input file to a path under `out`: a file keeps its name, a folder's
        files keep their path relative to the folder; lossy formats become .png."""
        plan = cls(out, levels)
        seen: dict[Path, str] = {}

        def claim(target: Path, source: str) -> Path:
            if target in seen and seen[target] != source:
                raise UsageError(f"{seen[target]} and {source} would both be written to "
                                 f"{target}: purify them into separate output folders")
            seen[target] = source
            return target

        for raw in paths:
            if parse_builtin(raw) is not None:
                stem = re.sub(r"[^\w.-]+", "_", raw).strip("_")
                claim(out / f"{stem}.npz", raw)
                plan.arrays[raw] = {"target": out / f"{stem}.npz", "kind": "builtin",
                                    "images": [], "labels": []}
                continue
            path = Path(raw).expanduser()
            files = [(f, f.relative_to(path)) for f in list_image_files(path)] \
                if path.is_dir() else [(path, Path(path.name))]
            for file, rel in files:
                suffix = file.suffix.lower()
                if suffix in ARRAY_EXTENSIONS:
                    target = claim(out / rel, str(file))
                    plan.arrays[str(file)] = {"target": target, "kind": suffix, "images": [],
                                              "labels": []}
                else:
                    target = out / rel if suffix in LOSSLESS else (out / rel).with_suffix(".png")
                    plan.image_targets[str(file)] = claim(target, str(file))
        return plan

    def source_of(self, name: str) -> str | None:
        """'x.npz[3]' -> 'x.npz'; 'digits:test:17' -> the spec it came from."""
        if name in self.image_targets:
            return name
        base = name.rsplit("[", 1)[0] if name.endswith("]") else None
        if base is not None and base in self.arrays:
            return base
        for spec, entry in self.arrays.items():
            if entry["kind"] == "builtin" and name.startswith(_builtin_prefix(spec)):
                return spec
        return None

    def add(self, name: str, image: torch.Tensor, label: int | None) -> str | None:
        """Write an image file now, or collect an array item; returns the output path."""
        source = self.source_of(name)
        if source is None:
            return None
        if source in self.image_targets:
            target = self.image_targets[source]
            save_image(target, image, self.levels)
            return str(target)
        entry = self.arrays[source]
        entry["images"].append(image)
        entry["labels"].append(label)
        return f"{entry['target']}[{len(entry['images']) - 1}]"

    def flush(self) -> None:
        """Write the collected array files (.npz keeps levels and labels; .npy is 8-bit)."""
        for source, entry in self.arrays.items():
            if not entry["images"]:
                continue
            images = torch.stack(entry["images"])
            labels = entry["labels"]
            label_tensor = torch.tensor(labels) if all(v is not None for v in labels) else None
            if label_tensor is None and entry["kind"] == ".npz":
                label_tensor = _stored_labels(Path(source), len(labels))
            if entry["kind"] == ".npy":
                with atomic_path(entry["target"], suffix=".npy") as tmp:
                    with open(tmp, "wb") as fh:
                        np.save(fh, to_8bit(images, self.levels))
            else:
                save_npz(entry["target"], images, self.levels, label_tensor)


def _stored_labels(path: Path, n: int) -> torch.Tensor | None:
    """The labels of an .npz input (a batch mixing sources carries no labels)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "labels" in archive and len(archive["labels"]) == n:
                return torch.from_numpy(np.asarray(archive["labels"]).astype(np.int64))
    except (OSError, ValueError):
        pass
    return None


def _builtin_prefix(spec: str) -> str:
    name, split = parse_builtin(spec) or ("", "")
    return f"{name}:{split}:"
