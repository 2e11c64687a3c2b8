"""Every input format -> uint8 images (N, C, H, W) in [0, levels-1], plus optional labels.

Sources (a *spec* is one string):

- ``digits[:train|:val|:calib|:test|:all]`` scikit-learn's built-in 8x8 digits, 17 levels
- ``fashion-mnist[:train|:test]`` / ``mnist[...]`` original IDX ``.gz`` files
- ``cifar10[:train|:test]`` through torchvision
- a folder of images (recursive; one sub-folder per class gives labels), an image file,
  or an ``.npz`` / ``.npy`` array of uint8 images

Files are decoded with Pillow (torchvision's own decoders lack BMP and TIFF, and Pillow
tells us the bit depth, which we must check). Every file problem becomes a per-file
error string, never an exception that stops a batch.

Every file is checked before it is decoded: an image's declared size against a pixel
budget (from its header), an array's declared shape x item size against a byte budget
(from the .npy header, and for .npz from the zip directory), so a 1 KB file cannot make
us allocate gigabytes. Folder scans report what they do not read: hidden entries are
ignored but counted, and unreadable folders, dangling links, special files and unknown
extensions become error items.
"""

from __future__ import annotations

import gzip
import os
import re
import stat
import struct
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .pixels import from_8bit as from_8bit
from .pixels import to_8bit as to_8bit

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
ARRAY_EXTENSIONS = {".npz", ".npy"}
DIGITS_LEVELS = 17
DEBIAN_DATASET_DIRS = {
    "fashion-mnist": [Path("/usr/share/datasets/fashion-mnist")],
    "mnist": [Path("/usr/share/datasets/mnist")],
}
FASHION_CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle-boot",
]
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]
BUILTIN = ("digits", "fashion-mnist", "mnist", "cifar10")
# Largest image we decode: width x height from the header, checked before decoding.
MAX_IMAGE_PIXELS = 4096 * 4096
# Largest array we load from an .npy / .npz (all members together): shape x item size
# from the headers / the zip directory. 512 MiB holds CIFAR-10's 50,000 training images
# three times over; raise it with $PIXELDEFEND_MAX_ARRAY_BYTES for bigger arrays.
MAX_ARRAY_BYTES = int(os.environ.get("PIXELDEFEND_MAX_ARRAY_BYTES", 512 << 20))


def safe_name(name: str) -> str:
    """A file name fit for any output: undecodable bytes (surrogate escapes) and control
    characters become visible escapes such as \\x1b, so JSON, CSV, tables and XML stay valid."""
    if name.isprintable():
        return name
    out = []
    for ch in name:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a byte os.fsdecode could not decode
            out.append(f"\\x{code - 0xDC00:02x}")
        elif not ch.isprintable():
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def _require_regular_file(path: Path) -> int:
    """The file's size; DataError for anything but a regular file (a FIFO would block)."""
    try:
        info = path.stat()
    except FileNotFoundError as exc:
        if path.is_symlink():
            raise DataError("dangling symbolic link") from exc
        raise DataError("no such file or directory") from exc
    except OSError as exc:
        raise DataError(f"cannot read file: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(info.st_mode):
        raise DataError("is a folder")
    if not stat.S_ISREG(info.st_mode):
        raise DataError("not a regular file (device, pipe or socket)")
    return info.st_size


@dataclass(frozen=True)
class ImageSpec:
    """What a model expects: channels, height, width and number of pixel levels."""

    channels: int
    height: int
    width: int
    levels: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def describe(self) -> str:
        return f"{self.channels}x{self.height}x{self.width} with {self.levels} levels"


@dataclass
class ImageSet:
    """Images held in memory, with one name per image and any per-file errors."""

    images: torch.Tensor  # uint8 (N, C, H, W), values in [0, levels-1]
    levels: int
    names: list[str]
    labels: torch.Tensor | None = None  # int64 (N,)
    classes: list[str] | None = None
    errors: list[tuple[str, str]] = field(default_factory=list)  # (name, message)
    source: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def spec(self) -> ImageSpec:
        c, h, w = self.images.shape[1:]
        return ImageSpec(int(c), int(h), int(w), self.levels)

    def subset(self, index: Sequence[int] | torch.Tensor) -> ImageSet:
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageSet(
            images=self.images[index],
            levels=self.levels,
            names=[self.names[i] for i in index.tolist()],
            labels=None if self.labels is None else self.labels[index],
            classes=self.classes,
            source=self.source,
        )

    def head(self, n: int | None) -> ImageSet:
        """The first n images; the source records the narrower slice when it can."""
        if n is None or n >= len(self):
            return self
        part = self.subset(range(n))
        base, piece = split_slice(self.source)
        start = 0 if piece is None or piece.start is None else piece.start
        if parse_builtin(base) is not None and start >= 0:
            part.source = f"{base}[{start or ''}:{start + n}]"
        return part

    def summary(self) -> dict:
        return {"source": self.source, "n": len(self), "shape": list(self.spec.shape),
                "levels": self.levels}


@dataclass
class Batch:
    """A slice of a stream: every item's name and error, and the images that were read."""

    names: list[str]
    errors: list[str | None]
    images: torch.Tensor  # uint8 (n_ok, C, H, W), the items whose error is None, in order
    labels: torch.Tensor | None = None  # int64 (n_ok,)


# ----------------------------------------------------------------------- single files


def decode_image_file(
    path: Path, expect: ImageSpec | None, resize: bool = False, grayscale: bool = False
) -> np.ndarray:
    """Read one image file as uint8 (C, H, W) in the expected levels, or raise DataError."""
    from PIL import Image, UnidentifiedImageError

    if _require_regular_file(path) == 0:
        raise DataError("empty file (0 bytes)")
    try:
        with Image.open(path) as img:
            _check_header(img, expect, resize)
            img.load()
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                raise DataError(
                    f"{'16-bit' if mode.startswith('I;16') else mode + '-mode'} image: "
                    "expected an 8-bit image"
                )
            if mode == "RGBA" or mode == "LA" or (mode == "P" and "transparency" in img.info):
                img = img.convert("RGBA" if mode != "LA" else "LA")
                alpha = np.asarray(img)[..., -1]
                if alpha.min() < 255:
                    raise DataError("image has transparent pixels: expected an opaque image")
                img = img.convert("RGB" if img.mode == "RGBA" else "L")
            elif mode in ("P", "CMYK", "YCbCr", "HSV"):
                img = img.convert("RGB")
            elif mode == "1":
                img = img.convert("L")
            channels = 1 if img.mode == "L" else 3
            if expect is not None:
                if grayscale and expect.channels == 1 and channels == 3:
                    img, channels = img.convert("L"), 1
                elif grayscale and expect.channels == 3 and channels == 1:
                    img, channels = img.convert("RGB"), 3
                if channels != expect.channels:
                    raise DataError(
                        f"image has {channels} channel(s) ({img.mode}), model expects "
                        f"{expect.channels}; pass grayscale=True to convert", param="grayscale"
                    )
                if (img.height, img.width) != (expect.height, expect.width):
                    img = img.resize((expect.width, expect.height), Image.Resampling.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except DataError:
        raise
    except UnidentifiedImageError as exc:
        kind = _sniff(path)
        if kind:
            raise DataError(f"corrupt or truncated {kind} file") from exc
        raise DataError("not an image file Pillow can decode") from exc
    except Image.DecompressionBombError as exc:
        raise DataError(f"image declares more pixels than the budget; refused before "
                        f"decoding ({exc})") from exc
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, struct.error,
            zlib.error, IndexError, TypeError) as exc:
        raise DataError(f"corrupt or truncated image: {exc}") from exc
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    levels = expect.levels if expect is not None else 256
    return from_8bit(array, levels)


def _check_header(img, expect: ImageSpec | None, resize: bool) -> None:
    """Refuse before decoding: multi-frame files, sizes over the pixel budget, and (without
    `resize`) any size other than the model's."""
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        raise DataError(f"has {frames} frames (multi-page or animated): only single-frame "
                        "images are scored; extract the frame you mean")
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(f"image declares {width}x{height} pixels, more than the budget of "
                        f"{MAX_IMAGE_PIXELS:,} pixels; refused before decoding")
    if expect is not None and not resize and (height, width) != (expect.height, expect.width):
        raise DataError(
            f"image is {width}x{height} (WxH), model expects "
            f"{expect.width}x{expect.height}; pass resize=True to convert", param="resize"
        )


_MAGIC = {b"\x89PNG": "PNG", b"\xff\xd8": "JPEG", b"BM": "BMP", b"GIF8": "GIF",
          b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"RIFF": "WebP"}


def _sniff(path: Path) -> str | None:
    """Name the format from the first bytes, to tell 'truncated PNG' from 'not an image'."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return None
    return next((kind for magic, kind in _MAGIC.items() if head.startswith(magic)), None)


def _normalise_array(images: np.ndarray, name: str) -> np.ndarray:
    """Accept (N,H,W), (N,H,W,C) or (N,C,H,W); return (N,C,H,W)."""
    if images.ndim == 2:
        images = images[None, None]
    elif images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4:
        if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
            images = images.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{name}: array of shape {images.shape} is not a stack of images")
    return np.ascontiguousarray(images)


def _check_npy_header(fh, name: str, available: int) -> None:
    """Read an .npy header from `fh` and refuse, before any data is read, arrays that
    declare more than MAX_ARRAY_BYTES, more bytes than the file holds, or objects."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = reader(fh, max_header_size=10_000)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        raise DataError(f"{name}: not a valid .npy array ({exc})") from exc
    if dtype.hasobject:
        raise DataError(f"{name}: holds Python objects; only numeric arrays are read")
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if nbytes > MAX_ARRAY_BYTES:
        raise DataError(f"{name}: declares {nbytes:,} bytes ({shape} {dtype}), more than the "
                        f"budget of {MAX_ARRAY_BYTES:,}; refused before loading")
    if nbytes > available - fh.tell():
        raise DataError(f"{name}: truncated (declares {nbytes:,} bytes of data, the file "
                        f"holds {max(0, available - fh.tell()):,})")


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npy (under 'images') or .npz file, each checked by its header."""
    size = _require_regular_file(path)
    if path.suffix.lower() == ".npy":
        with open(path, "rb") as fh:
            _check_npy_header(fh, path.name, size)
        return {"images": np.load(path, allow_pickle=False)}
    with zipfile.ZipFile(path) as archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        total = sum(m.file_size for m in members)
        if total > MAX_ARRAY_BYTES:
            raise DataError(f"holds {total:,} bytes uncompressed, more than the budget of "
                            f"{MAX_ARRAY_BYTES:,}; refused before loading")
        arrays: dict[str, np.ndarray] = {}
        for member in members:
            key = member.filename.removesuffix(".npy")
            if key not in ("images", "labels", "levels"):
                continue
            with archive.open(member) as fh:
                _check_npy_header(fh, f"member {member.filename!r}", member.file_size)
            with archive.open(member) as fh:
                arrays[key] = np.lib.format.read_array(fh, allow_pickle=False)
    if "images" not in arrays:
        found = [m.filename for m in members]
        raise DataError(f".npz has no 'images' array (found {found})")
    return arrays


def _array_levels(value: np.ndarray) -> int:
    """The `levels` entry: a single integer from 2 to 256."""
    if value.size != 1 or not (np.issubdtype(value.dtype, np.integer)
                               or value.dtype == np.float64 and float(value.flat[0]).is_integer()):
        raise DataError(f"'levels' must be a single integer, found a {value.dtype} array of "
                        f"shape {value.shape}")
    levels = int(value.flat[0])
    if not 2 <= levels <= 256:
        raise DataError(f"'levels' must be between 2 and 256, found {levels}")
    return levels


def _array_labels(value: np.ndarray, n: int) -> np.ndarray:
    """The `labels` entry: n non-negative integers."""
    if not np.issubdtype(value.dtype, np.integer):
        raise DataError(f"'labels' must be integers, found {value.dtype}")
    if value.ndim != 1 or value.shape[0] != n:
        raise DataError(f"'labels' has shape {value.shape}, expected ({n},) to match the images")
    if value.size and value.min() < 0:
        raise DataError("'labels' must be non-negative")
    return value.astype(np.int64)


def load_array_file(path: Path, expect: ImageSpec | None) -> ImageSet:
    """Read .npz (keys `images`, optional `labels`, `levels`) or .npy of uint8 images.

    Arrays without a `levels` entry are taken as 8-bit and mapped to the model's levels.
    Headers are checked against MAX_ARRAY_BYTES before anything is loaded.
    """
    try:
        arrays = _read_arrays(path)
        images = arrays["images"]
        stored_levels = _array_levels(arrays["levels"]) if "levels" in arrays else None
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from exc
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError,
            TypeError, MemoryError, NotImplementedError, RuntimeError) as exc:
        raise DataError(f"{path}: cannot read array file: {exc}") from exc
    if images.size == 0:
        raise DataError(f"{path}: holds no images (array of shape {images.shape})")
    if images.dtype != np.uint8:
        if (np.issubdtype(images.dtype, np.integer) or images.dtype == np.bool_) \
                and images.min() >= 0 and images.max() <= 255:
            images = images.astype(np.uint8)
        else:
            raise DataError(f"{path}: images must be uint8 integers, found {images.dtype}")
    images = _normalise_array(images, str(path))
    levels = stored_levels if stored_levels is not None else 256
    if expect is not None:
        if images.shape[1:] != expect.shape:
            raise DataError(
                f"{path}: arrays are {tuple(images.shape[1:])} (C,H,W), model expects "
                f"{expect.shape}"
            )
        if levels != expect.levels:
            if levels != 256:
                raise DataError(
                    f"{path}: arrays hold {levels} levels, model expects {expect.levels}")
            images = from_8bit(images, expect.levels)
            levels = expect.levels
    if images.size and int(images.max()) >= levels:
        raise DataError(f"{path}: values up to {int(images.max())} but only {levels} levels")
    labels = None
    if "labels" in arrays:
        try:
            labels = _array_labels(arrays["labels"], images.shape[0])
        except DataError as exc:
            raise DataError(f"{path}: {exc}") from exc
    base = safe_name(str(path))
    names = [f"{base}[{i}]" for i in range(images.shape[0])]
    return ImageSet(
        images=torch.from_numpy(images),
        levels=levels,
        names=names,
        labels=None if labels is None else torch.from_numpy(labels),
        source=base,
    )


# --------------------------------------------------------------------- built-in sets


def _seeded_split(n: int, fractions: dict[str, float], seed: int = 0) -> dict[str, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    out, start = {}, 0
    names = list(fractions)
    for i, key in enumerate(names):
        stop = n if i == len(names) - 1 else start + int(round(fractions[key] * n))
        out[key] = np.sort(order[start:stop])
        start = stop
    return out


DIGITS_SPLITS = {"train": 0.6, "val": 0.1, "calib": 0.1, "test": 0.2}


def load_digits(split: str = "train") -> ImageSet:
    """scikit-learn's 1,797 8x8 digits (values 0..16, so 17 levels), fixed seeded splits."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = bunch.images.astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    labels = bunch.target.astype(np.int64)
    if split == "all":
        index = np.arange(len(images))
    else:
        if split not in DIGITS_SPLITS:
            raise DataError(f"digits has splits {', '.join(DIGITS_SPLITS)} and all, not {split!r}")
        index = _seeded_split(len(images), DIGITS_SPLITS)[split]
    return ImageSet(
        images=torch.from_numpy(images[index].copy()),
        levels=DIGITS_LEVELS,
        names=[f"digits:{split}:{i}" for i in index.tolist()],
        labels=torch.from_numpy(labels[index]),
        classes=[str(d) for d in range(10)],
        source=f"digits:{split}",
    )


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (gzip or plain). Hand-written: 15 lines, and torchvision's reader
    only works inside its own folder layout."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read IDX file: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated IDX file ({body.size} of {int(np.prod(dims))} bytes)")
    return body.reshape(dims)


def _idx_candidates(name: str, data_root: str | None) -> list[Path]:
    roots: list[Path] = []
    for base in (data_root, os.environ.get("PIXELDEFEND_DATA")):
        if base:
            base_path = Path(base).expanduser()
            roots += [base_path, base_path / name, base_path / name.replace("-", "_"),
                      base_path / _tv_name(name) / "raw"]
    roots += DEBIAN_DATASET_DIRS.get(name, [])
    return roots


def _tv_name(name: str) -> str:
    return {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}[name]


def load_idx_dataset(
    name: str, split: str, data_root: str | None = None, download: bool = False
) -> ImageSet:
    """Fashion-MNIST or MNIST from the original IDX files, looked for in --data-root,
    $PIXELDEFEND_DATA and the Debian package's folder; torchvision downloads on request."""
    if split not in ("train", "test"):
        raise DataError(f"{name} has splits train and test, not {split!r}")
    prefix = "train" if split == "train" else "t10k"
    files = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    searched = _idx_candidates(name, data_root)
    found: tuple[Path, Path] | None = None
    for root in searched:
        pair = []
        for stem in files:
            for candidate in (root / (stem + ".gz"), root / stem):
                if candidate.is_file():
                    pair.append(candidate)
                    break
        if len(pair) == 2:
            found = (pair[0], pair[1])
            break
    if found is None and download:
        import torchvision

        root = Path(data_root or os.environ.get("PIXELDEFEND_DATA") or "~/.cache/pixeldefend")
        root = root.expanduser()
        cls = torchvision.datasets.FashionMNIST if name == "fashion-mnist" else \
            torchvision.datasets.MNIST
        try:
            cls(str(root), train=split == "train", download=True)
        except Exception as exc:  # network errors come in many types
            raise DataError(f"downloading {name} failed: {exc}") from exc
        return load_idx_dataset(name, split, str(root))
    if found is None:
        hint = "apt-get install dataset-fashion-mnist, " if name == "fashion-mnist" else ""
        raise DataError(
            f"{name} IDX files not found (looked in {', '.join(map(str, searched)) or 'nothing'}); "
            f"{hint}set data_root to their folder, set PIXELDEFEND_DATA, or set download",
            param=("data_root", "download"))
    images = _read_idx(found[0])
    labels = _read_idx(found[1]).astype(np.int64)
    if images.ndim != 3 or labels.shape[0] != images.shape[0]:
        raise DataError(f"{found[0]}: images and labels do not match")
    return ImageSet(
        images=torch.from_numpy(images[:, None].copy()),
        levels=256,
        names=[f"{name}:{split}:{i}" for i in range(images.shape[0])],
        labels=torch.from_numpy(labels),
        classes=FASHION_CLASSES if name == "fashion-mnist" else [str(d) for d in range(10)],
        source=f"{name}:{split}",
    )


def load_cifar10(split: str, data_root: str | None = None, download: bool = False) -> ImageSet:
    """CIFAR-10 through torchvision (it reads the python-pickle batches it downloaded)."""
    import torchvision

    if split not in ("train", "test"):
        raise DataError(f"cifar10 has splits train and test, not {split!r}")
    root = Path(data_root or os.environ.get("PIXELDEFEND_DATA") or "~/.cache/pixeldefend")
    try:
        ds = torchvision.datasets.CIFAR10(
            str(root.expanduser()), train=split == "train", download=download
        )
    except RuntimeError as exc:
        raise DataError(
            f"CIFAR-10 not found under {root}: set data_root to its folder, or set download "
            f"({exc})", param=("data_root", "download")) from exc
    images = np.asarray(ds.data, dtype=np.uint8).transpose(0, 3, 1, 2).copy()
    return ImageSet(
        images=torch.from_numpy(images),
        levels=256,
        names=[f"cifar10:{split}:{i}" for i in range(images.shape[0])],
        labels=torch.as_tensor(ds.targets, dtype=torch.long),
        classes=CIFAR10_CLASSES,
        source=f"cifar10:{split}",
    )


_SLICE = re.compile(r"^(?P<base>[^\[]+)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$")


def split_slice(spec: str) -> tuple[str, slice | None]:
    """'fashion-mnist:test[:1000]' -> ('fashion-mnist:test', slice(None, 1000))."""
    match = _SLICE.match(spec.strip())
    if match is None:
        return spec, None
    start = int(match["start"]) if match["start"] else None
    stop = int(match["stop"]) if match["stop"] else None
    return match["base"], slice(start, stop)


def parse_builtin(spec: str) -> tuple[str, str] | None:
    """'fashion-mnist:test' -> ('fashion-mnist', 'test'); None when not a built-in name.

    A trailing slice such as '[:1000]' is handled by `load_builtin`."""
    spec, _ = split_slice(spec)
    name, _, split = spec.partition(":")
    name = name.lower().replace("_", "-")
    if name == "fashionmnist":
        name = "fashion-mnist"
    if name not in BUILTIN or Path(spec).exists():
        return None
    return name, (split or ("all" if name == "digits" else "train")).lower()


def load_builtin(name: str, split: str, data_root: str | None = None,
                 download: bool = False, part: slice | None = None) -> ImageSet:
    if name == "digits":
        images = load_digits(split)
    elif name in ("fashion-mnist", "mnist"):
        images = load_idx_dataset(name, split, data_root, download)
    else:
        images = load_cifar10(split, data_root, download)
    if part is not None:
        index = range(len(images))[part]
        if len(index) == 0:
            raise DataError(f"{images.source}[{part.start}:{part.stop}] selects no images")
        images = images.subset(list(index))
        images.source += f"[{'' if part.start is None else part.start}:" \
                         f"{'' if part.stop is None else part.stop}]"
    return images


def load_spec(spec: str, data_root: str | None = None, download: bool = False) -> ImageSet:
    """A built-in spec, with an optional slice: 'fashion-mnist:test[:1000]'."""
    parsed = parse_builtin(spec)
    if parsed is None:
        raise DataError(f"{spec!r} is not a built-in data set ({', '.join(BUILTIN)})")
    return load_builtin(*parsed, data_root=data_root, download=download,
                        part=split_slice(spec)[1])


# ------------------------------------------------------------------ folders and files


@dataclass
class FolderScan:
    """What a recursive folder walk found, in sorted depth-first order.

    `entries` holds a path string for every image or array file and a (name, error) pair
    for everything that cannot be read (unreadable folder, dangling link, special file,
    unknown extension, link loop); hidden entries (names starting with '.') are not
    read but counted in `hidden`.
    """

    entries: list[str | tuple[str, str]] = field(default_factory=list)
    hidden: int = 0

    @property
    def files(self) -> list[str]:
        return [e for e in self.entries if isinstance(e, str)]

    @property
    def problems(self) -> list[tuple[str, str]]:
        return [e for e in self.entries if not isinstance(e, str)]


def scan_folder(root: Path, scan: FolderScan | None = None) -> FolderScan:
    """Walk `root` (following links to folders, once each), without decoding anything."""
    scan = scan if scan is not None else FolderScan()
    wanted = IMAGE_EXTENSIONS | ARRAY_EXTENSIONS
    seen: set[tuple[int, int]] = set()

    def listing(folder: str) -> Iterator[os.DirEntry] | None:
        try:
            info = os.stat(folder)
            key = (info.st_dev, info.st_ino)
            if key in seen:
                scan.entries.append((safe_name(folder), "symbolic link loop: folder already "
                                                        "scanned"))
                return None
            seen.add(key)
            with os.scandir(folder) as it:
                return iter(sorted(it, key=lambda e: e.name))
        except OSError as exc:
            scan.entries.append((safe_name(folder),
                                 f"cannot list folder: {exc.strerror or exc}"))
            return None

    stack = [listing(str(root))]
    while stack:
        top = stack[-1]
        entry = next(top, None) if top is not None else None
        if entry is None:
            stack.pop()
            continue
        if entry.name.startswith("."):
            scan.hidden += 1
            continue
        try:
            is_dir, is_file = entry.is_dir(), entry.is_file()
            is_link = entry.is_symlink()
        except OSError as exc:
            scan.entries.append((safe_name(entry.path), f"cannot read: {exc.strerror or exc}"))
            continue
        if is_dir:
            stack.append(listing(entry.path))
        elif is_link and not os.path.exists(entry.path):
            scan.entries.append((safe_name(entry.path), "dangling symbolic link"))
        elif not is_file:
            scan.entries.append((safe_name(entry.path),
                                 "not a regular file (device, pipe or socket)"))
        elif os.path.splitext(entry.name)[1].lower() in wanted:
            scan.entries.append(entry.path)
        else:
            suffix = os.path.splitext(entry.name)[1] or "(no extension)"
            scan.entries.append((safe_name(entry.path), f"unsupported file type {suffix}: "
                                 "not read (images: " + ", ".join(sorted(IMAGE_EXTENSIONS))
                                 + "; arrays: .npz, .npy)"))
    return scan


def list_image_files(path: Path) -> list[Path]:
    """Every file under a folder (recursive, sorted) that looks like an image or array."""
    return [Path(f) for f in scan_folder(path).files]


def _class_folder(root: str, file: str) -> str | None:
    """The sub-folder of `root` that holds `file` directly, or None (deeper or at the top)."""
    head, sep, tail = os.path.relpath(file, root).partition(os.sep)
    return head if sep and os.sep not in tail else None


def _folder_classes(root: str, files: Sequence[str | tuple[str, str]]) -> list[str] | None:
    """Class names when every image sits exactly one sub-folder below `root` (a streaming
    pass: nothing per file is kept)."""
    names: set[str] = set()
    for f in files:
        if not isinstance(f, str):
            continue
        folder = _class_folder(root, f)
        if folder is None:
            return None
        names.add(folder)
    return sorted(names) or None


class ImageStream:
    """Reads many files lazily in batches, so memory does not grow with the file count
    (only the file names are listed up front).

    Array files (.npz/.npy) are expanded into their images; unreadable files and folder
    problems yield one error item each, and the stream goes on. Hidden entries of
    scanned folders are skipped and counted in `hidden`.
    """

    def __init__(self, inputs: Sequence[str], expect: ImageSpec,
                 resize: bool = False, grayscale: bool = False,
                 data_root: str | None = None, download: bool = False) -> None:
        self.expect = expect
        self.resize = resize
        self.grayscale = grayscale
        self.builtin: list[ImageSet] = []
        self.entries: list[str | tuple[str, str]] = []
        self.labels: list[int | None] = []
        self.hidden = 0
        self.classes: list[str] | None = None
        for raw in inputs:
            parsed = parse_builtin(raw)
            path = Path(raw).expanduser()
            if parsed is not None:
                self.builtin.append(conform(load_spec(raw, data_root, download), expect))
            elif path.is_dir():
                scan = scan_folder(path)
                self.hidden += scan.hidden
                clean_scan = all(isinstance(e, str) for e in scan.entries)
                classes = _folder_classes(str(path), scan.entries) if clean_scan else None
                if classes:
                    self.classes = classes
                index = {name: k for k, name in enumerate(classes or [])}
                for e in scan.entries:
                    self.entries.append(e)
                    self.labels.append(index[_class_folder(str(path), e)]  # type: ignore[index]
                                       if classes and isinstance(e, str) else None)
                if not scan.entries:
                    self.entries.append((safe_name(raw), "folder holds no image files"
                                         + (f" ({scan.hidden} hidden entries ignored)"
                                            if scan.hidden else "")))
                    self.labels.append(None)
            elif not path.exists() and not path.is_symlink():
                self.entries.append((safe_name(raw), "no such file or directory"))
                self.labels.append(None)
            else:
                self.entries.append(str(path))
                self.labels.append(None)
        for s in self.builtin:
            self.classes = self.classes or s.classes

    @property
    def files(self) -> list[str]:
        return [e for e in self.entries if isinstance(e, str)]

    def __len__(self) -> int:
        """Number of items, counting an array file as one until it is opened."""
        return sum(len(s) for s in self.builtin) + len(self.entries)

    def items(self) -> Iterator[tuple[str, np.ndarray | None, int | None, str | None]]:
        for s in self.builtin:
            for i in range(len(s)):
                label = None if s.labels is None else int(s.labels[i])
                yield s.names[i], s.images[i].numpy(), label, None
        for entry, label in zip(self.entries, self.labels, strict=True):
            if not isinstance(entry, str):
                yield entry[0], None, None, entry[1]
                continue
            path = Path(entry)
            name = safe_name(entry)
            if path.suffix.lower() in ARRAY_EXTENSIONS:
                try:
                    arrays = load_array_file(path, self.expect)
                except DataError as exc:
                    yield name, None, None, str(exc).removeprefix(f"{name}: ")
                    continue
                for i in range(len(arrays)):
                    lab = None if arrays.labels is None else int(arrays.labels[i])
                    yield arrays.names[i], arrays.images[i].numpy(), lab, None
                continue
            try:
                yield name, decode_image_file(path, self.expect, self.resize, self.grayscale), \
                    label, None
            except DataError as exc:
                yield name, None, None, str(exc)

    def batches(self, batch_size: int) -> Iterator[Batch]:
        names: list[str] = []
        errors: list[str | None] = []
        arrays: list[np.ndarray] = []
        labels: list[int | None] = []
        for name, array, label, error in self.items():
            names.append(name)
            errors.append(error)
            if array is not None:
                arrays.append(array)
                labels.append(label)
            if len(names) >= batch_size:
                yield _make_batch(names, errors, arrays, labels, self.expect)
                names, errors, arrays, labels = [], [], [], []
        if names:
            yield _make_batch(names, errors, arrays, labels, self.expect)


def _make_batch(names, errors, arrays, labels, expect: ImageSpec) -> Batch:
    if arrays:
        images = torch.from_numpy(np.stack(arrays))
    else:
        images = torch.zeros((0, *expect.shape), dtype=torch.uint8)
    has_labels = bool(labels) and all(lab is not None for lab in labels)
    return Batch(
        names=list(names), errors=list(errors), images=images,
        labels=torch.tensor(labels, dtype=torch.long) if has_labels else None,
    )


def conform(images: ImageSet, expect: ImageSpec | None) -> ImageSet:
    """Check an in-memory set against the model's shape; map 8-bit data to fewer levels."""
    if expect is None:
        return images
    if images.spec.shape != expect.shape:
        raise DataError(
            f"{images.source}: images are {images.spec.shape} (C,H,W), model expects "
            f"{expect.shape} ({expect.describe()})"
        )
    if images.levels != expect.levels:
        if images.levels != 256:
            raise DataError(
                f"{images.source}: images have {images.levels} levels, "
                f"model expects {expect.levels}"
            )
        images = ImageSet(
            images=torch.from_numpy(from_8bit(images.images.numpy(), expect.levels)),
            levels=expect.levels, names=images.names, labels=images.labels,
            classes=images.classes, errors=images.errors, source=images.source,
        )
    return images


def load_images(
    spec: str | Sequence[str],
    expect: ImageSpec | None = None,
    *,
    data_root: str | None = None,
    download: bool = False,
    resize: bool = False,
    grayscale: bool = False,
) -> ImageSet:
    """Load a whole source into memory. Unreadable files are listed in `.errors`.

    With `expect=None` (training on a folder), the first readable image fixes the shape
    and files are taken as 8-bit (256 levels).
    """
    inputs = [spec] if isinstance(spec, str) else list(spec)
    if len(inputs) == 1:
        parsed = parse_builtin(inputs[0])
        if parsed is not None:
            return conform(load_spec(inputs[0], data_root, download), expect)
        path = Path(inputs[0]).expanduser()
        if not path.exists():
            raise DataError(
                f"{inputs[0]}: no such file or folder, and not a built-in data set "
                f"({', '.join(BUILTIN)})"
            )
        if path.is_file() and path.suffix.lower() in ARRAY_EXTENSIONS:
            return conform(load_array_file(path, expect), expect)
    if expect is None:
        expect = _infer_spec(inputs)
    stream = ImageStream(inputs, expect, resize=resize, grayscale=grayscale,
                         data_root=data_root, download=download)
    names, arrays, labels, errors = [], [], [], []
    for name, array, label, error in stream.items():
        if array is None:
            errors.append((name, error or "unreadable"))
            continue
        names.append(name)
        arrays.append(array)
        labels.append(label)
    if not arrays:
        detail = f": {errors[0][0]}: {errors[0][1]}" if errors else ""
        raise DataError(f"no readable images in {', '.join(inputs)}{detail}")
    has_labels = all(lab is not None for lab in labels)
    return ImageSet(
        images=torch.from_numpy(np.stack(arrays)),
        levels=expect.levels,
        names=names,
        labels=torch.tensor(labels, dtype=torch.long) if has_labels else None,
        classes=stream.classes if has_labels else None,
        errors=errors,
        source=", ".join(inputs),
    )


def _infer_spec(inputs: Sequence[str]) -> ImageSpec:
    for raw in inputs:
        root = Path(raw).expanduser()
        for file in scan_folder(root).files if root.is_dir() else [raw]:
            path = Path(file)
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                array = decode_image_file(path, None)
            except DataError:
                continue
            return ImageSpec(array.shape[0], array.shape[1], array.shape[2], 256)
    raise DataError(f"no readable image files in {', '.join(inputs)}")


# --------------------------------------------------------------------------- writing


def save_image(path: str | os.PathLike[str], image: torch.Tensor | np.ndarray, levels: int) -> None:
    """Write one (C, H, W) image in `levels` levels as an 8-bit PNG, atomically."""
    from PIL import Image

    from .atomic import atomic_path

    array = to_8bit(image, levels)
    array = array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)
    fmt = Path(path).suffix.lstrip(".").upper() or "PNG"
    fmt = {"JPG": "JPEG", "TIF": "TIFF"}.get(fmt, fmt)
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format=fmt)


def save_npz(path: str | os.PathLike[str], images: torch.Tensor, levels: int,
             labels: torch.Tensor | None = None, **extra: np.ndarray) -> None:
    """Write images (and labels) exactly, with their levels, atomically."""
    from .atomic import atomic_path

    arrays = {"images": images.cpu().numpy().astype(np.uint8), "levels": np.array(levels)}
    if labels is not None:
        arrays["labels"] = labels.cpu().numpy().astype(np.int64)
    arrays.update(extra)
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)


def image_grid(images: torch.Tensor, levels: int, ncol: int | None = None,
               pad: int = 1, scale: int = 1) -> np.ndarray:
    """Tile (N, C, H, W) images into one 8-bit (H', W', C) or (H', W') array for a PNG."""
    n, c, h, w = images.shape
    ncol = ncol or max(1, int(np.ceil(np.sqrt(n))))
    nrow = int(np.ceil(n / ncol))
    grid = np.full((c, nrow * (h + pad) + pad, ncol * (w + pad) + pad), 128, dtype=np.uint8)
    pixels = to_8bit(images, levels)
    for k in range(n):
        r, q = divmod(k, ncol)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[:, y : y + h, x : x + w] = pixels[k]
    if scale > 1:
        grid = grid.repeat(scale, axis=1).repeat(scale, axis=2)
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)


def save_grid(path: str | os.PathLike[str], images: torch.Tensor, levels: int,
              scale: int = 0) -> None:
    """Write images tiled into one PNG, atomically; `scale` 0 zooms the grid to ~256 px."""
    from PIL import Image

    from .atomic import atomic_path

    n, _, _, w = images.shape
    scale = scale or max(1, 256 // (int(np.ceil(np.sqrt(n))) * (w + 1)))
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(image_grid(images, levels, scale=scale)).save(tmp, format="PNG")


# ---------------------------------------------------------------------- training splits


def refuse_unreadable(images: ImageSet, what: str, skip_unreadable: bool = False) -> ImageSet:
    """Fail closed on files a whole-set command could not use (wrong size, corrupt, ...):
    a DataError saying how many and which, unless the caller explicitly allows skipping
    them (then they stay listed in `images.errors` for the caller to print)."""
    if images.errors and not skip_unreadable:
        n_bad = len(images.errors)
        shown = "; ".join(f"{name}: {error}" for name, error in images.errors[:3])
        more = f"; and {n_bad - 3} more" if n_bad > 3 else ""
        raise DataError(f"{n_bad} of {n_bad + len(images)} input files cannot be used for "
                        f"{what} ({shown}{more}); fix or remove them, or set "
                        "skip_unreadable to go on without them", param="skip_unreadable")
    return images


def training_splits(spec: str, data_root: str | None = None, download: bool = False,
                    seed: int = 0, skip_unreadable: bool = False
                    ) -> dict[str, str | ImageSet]:
    """Split a training source into train / val / calib (/ test) sets.

    Returns, per split, either a spec string (built-in data, so a bundle can record
    exactly where its calibration images came from) or an ImageSet (folders, arrays).
    - digits (or digits:all / digits:train): the fixed seeded splits digits:train / :val /
      :calib / :test;
    - fashion-mnist, mnist, cifar10 (:train): the last 2 x 2,000 training images (the files
      are already in random order) are validation and calibration; test = the test split;
    - anything else, including an explicitly named other split such as digits:test or a
      slice: a seeded 80 / 10 / 10 split of exactly those images, no test set.
    An unknown split is a DataError listing the valid ones. Unreadable files (e.g. a
    different size than the first image) are an error unless `skip_unreadable`; the
    skipped ones are then listed in the train split's `.errors`.
    """
    base, part = split_slice(spec)
    parsed = parse_builtin(base)
    if parsed is not None and part is None:
        name, split = parsed
        if name == "digits" and split in ("all", "train"):
            return {k: f"digits:{k}" for k in ("train", "val", "calib", "test")}
        if name != "digits" and split == "train":
            n = len(load_builtin(name, "train", data_root, download))
            hold = min(2000, n // 10)
            return {
                "train": f"{name}:train[:{n - 2 * hold}]",
                "val": f"{name}:train[{n - 2 * hold}:{n - hold}]",
                "calib": f"{name}:train[{n - hold}:]",
                "test": f"{name}:test",
            }
    images = refuse_unreadable(load_images(spec, data_root=data_root, download=download),
                               "training", skip_unreadable)
    parts = _seeded_split(len(images), {"train": 0.8, "val": 0.1, "calib": 0.1}, seed)
    if min(len(v) for v in parts.values()) == 0:
        raise DataError(f"{spec}: {len(images)} images are too few to split into "
                        "train / validation / calibration sets (need at least 10)")
    out: dict[str, str | ImageSet] = {k: images.subset(v.tolist()) for k, v in parts.items()}
    out["train"].errors = list(images.errors)  # type: ignore[union-attr]
    return out


def split_holdout(n: int, n_val: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded (train, val) index split with `n_val` validation items."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


CLASSIFIER_HOLDOUT = 5000  # validation images carved from a large built-in training split


def require_labels(images: ImageSet, what: str) -> torch.Tensor:
    if images.labels is None:
        raise DataError(f"{images.source}: {what} images have no labels (use a labelled data "
                        "set, an .npz with 'labels', or one sub-folder per class)")
    return images.labels


def classifier_splits(data: str, val: str | None, test: str | None, seed: int,
                      data_root: str | None, download: bool
                      ) -> tuple[ImageSet, ImageSet, ImageSet | None]:
    """(train, validation, test) for a training spec.

    digits: the fixed digits:train / :val / :test splits. Fashion-MNIST, MNIST, CIFAR-10:
    a seeded 5,000-image validation slice of the training split, test = the test split.
    Anything else: a seeded 10% validation slice, test only when `test` is given.
    (The density model's policy is `training_splits`: it also needs a calibration split.)
    """
    def load(spec: str, expect: ImageSpec | None = None) -> ImageSet:
        return load_images(spec, expect, data_root=data_root, download=download)

    parsed = parse_builtin(data)
    test_spec = test
    if parsed is not None and parsed[0] == "digits" and parsed[1] in ("all", "train"):
        train_set = load("digits:train")
        val_set = load(val or "digits:val")
        test_spec = test or "digits:test"
    else:
        full = load(data)
        if val is not None:
            train_set, val_set = full, load(val, full.spec)
        else:
            big = len(full) >= 10 * CLASSIFIER_HOLDOUT
            n_val = CLASSIFIER_HOLDOUT if big else max(1, len(full) // 10)
            if len(full) < 10:
                raise DataError(f"{data}: {len(full)} images are too few to hold out a "
                                "validation set (need at least 10)")
            train_idx, val_idx = split_holdout(len(full), n_val, seed)
            train_set, val_set = full.subset(train_idx.tolist()), full.subset(val_idx.tolist())
            val_set.source = f"{full.source} (seeded {n_val}-image holdout, seed {seed})"
            train_set.source = f"{full.source} (minus the holdout)"
        if test_spec is None and parsed is not None and parsed[1] == "train":
            test_spec = f"{parsed[0]}:test"
    test_set = load(test_spec, train_set.spec) if test_spec else None
    return train_set, val_set, test_set


def resolve(split: str | ImageSet, expect: ImageSpec | None = None,
            data_root: str | None = None, download: bool = False) -> ImageSet:
    if isinstance(split, ImageSet):
        return conform(split, expect)
    return conform(load_spec(split, data_root, download), expect)
