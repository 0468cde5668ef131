"""Image sources that data preparation reads: an ImageFolder tree (``root/<class>/<image>``, or
split as ImageNet is, ``root/train|val|test/<class>/<image>``) and CIFAR-10's python batches.

A source lists lightweight :class:`Item` records (so millions of images never sit in memory) and
turns one item into JPEG bytes on demand. ``inspect`` decodes the image fully, which is how
preparation finds undecodable, truncated and non-image files.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from resnet18_dist.errors import UserError
from resnet18_dist.imaging import BadImage, decode_upright, orientation
from resnet18_dist.options import ConfigError

JPEG_QUALITY = 95
CIFAR_DIR = "cifar-10-batches-py"
# Top-level folders that make an ImageFolder tree a pre-split one (the layout torchvision's and
# timm's ImageNet readers take); as class names they would be taken for splits, so refused.
SPLIT_DIRS = ("train", "val", "test")


class SourceError(ValueError, UserError):
    """The source as a whole is unusable (missing, empty, a class with no images...)."""


class Reject(Exception):
    """One item cannot be used; ``str(exc)`` is the reason recorded in rejects.json."""


@dataclass(frozen=True)
class Item:
    ref: str  # file path, or "<batch file>[row]" for CIFAR arrays; shown in rejects and errors
    label: int
    # The split the source puts it in (CIFAR's test_batch, an ImageNet-style root/val/), else
    # None. "train" items are the pool the splits the source lacks are divided off.
    split: str | None = None
    row: int = -1  # row in the in-memory array for array sources


@dataclass(frozen=True)
class Inspection:
    ok: bool
    reason: str = ""
    width: int = 0
    height: int = 0


def encode_jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 chroma: sub-sampling would smear the colours of 8-32 px images.
    img.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def _decode(data: bytes) -> Image.Image:
    """Full decode, upright; a truncated or foreign file fails here, not at training time."""
    try:
        return decode_upright(data)
    except BadImage as exc:
        raise Reject(str(exc)) from exc


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files(class_dir: Path) -> list[Path]:
    return sorted(p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith("."))


class ImageFolderSource:
    """``root/<class>/<file>``; class names are the sorted sub-directory names. Or pre-split,
    ``root/train/<class>/<file>`` with ``root/val/...`` and ``root/test/...`` if the source has
    them: the classes are train's, and each item keeps the split of its folder. A tree that
    mixes the two (``root/train/`` beside ``root/cat/``) is refused naming the folders, as is
    ``val/`` or ``test/`` without ``train/``, so that no split is read as a class."""

    kind = "imagefolder"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise SourceError(f"--source {self.root}: no such directory")
        top = _subdirs(self.root)
        if not top:
            raise SourceError(
                f"--source {self.root}: no class sub-directories (expected root/<class>/<image>)"
            )
        self.ignored = sorted(str(p) for p in self.root.iterdir() if p.is_file())
        splits = [p for p in top if p.name in SPLIT_DIRS]
        items = self._split_items(splits, top) if splits else self._class_items(top)
        if not items:
            raise SourceError(f"--source {self.root}: the class directories hold no files")
        self._items = items

    def _class_items(self, class_dirs: list[Path]) -> list[Item]:
        self.classes = [p.name for p in class_dirs]
        return [Item(str(f), label) for label, d in enumerate(class_dirs) for f in _files(d)]

    def _split_items(self, split_dirs: list[Path], top: list[Path]) -> list[Item]:
        names = [p.name for p in split_dirs]
        others = [p.name for p in top if p.name not in SPLIT_DIRS]
        layouts = (
            "root/<class>/<image>, or split as root/train/<class>/<image> with val/ and test/ "
            "beside it if the source has them; a class may not be named train, val or test"
        )
        if others:
            raise ConfigError(
                "--source",
                f"{self.root} holds split folder(s) {', '.join(names)} beside class folder(s) "
                f"{', '.join(others[:5])}{' ...' if len(others) > 5 else ''}: expected {layouts}",
            )
        if "train" not in names:
            raise ConfigError(
                "--source",
                f"{self.root}: folder(s) {', '.join(names)} but no train/: expected {layouts}",
            )
        self.kind = "imagefolder-split"
        by_name = {p.name: p for p in split_dirs}
        class_dirs = _subdirs(by_name["train"])
        if not class_dirs:
            # root/train/*.jpg, root/val/*.jpg: classes named like splits, which would read
            # as a 2-class dataset of "train" and "val" images; refused as the layout says.
            raise ConfigError(
                "--source",
                f"{by_name['train']} holds no class folders: class folders may not be named "
                f"{', '.join(SPLIT_DIRS)}; expected {layouts}",
            )
        self.classes = [p.name for p in class_dirs]
        label = {name: i for i, name in enumerate(self.classes)}
        items = []
        for split in SPLIT_DIRS:  # train, val, test: the order of the manifest's splits
            if split not in by_name:
                continue
            self.ignored += sorted(str(p) for p in by_name[split].iterdir() if p.is_file())
            for d in _subdirs(by_name[split]):
                if d.name not in label:
                    raise ConfigError(
                        "--source",
                        f"{d}: class {d.name!r} is not in {by_name['train']} (a split's "
                        "classes must be train's)",
                    )
                items += [Item(str(f), label[d.name], split) for f in _files(d)]
        return items

    def items(self) -> list[Item]:
        return self._items

    def inspect(self, item: Item) -> Inspection:
        try:
            img = _decode(Path(item.ref).read_bytes())
        except Reject as exc:
            return Inspection(False, str(exc))
        except OSError as exc:
            return Inspection(False, f"cannot read: {exc.strerror or exc}")
        return Inspection(True, width=img.width, height=img.height)

    def jpeg_bytes(self, item: Item) -> bytes:
        data = Path(item.ref).read_bytes()
        # Keep upright RGB/greyscale JPEGs byte for byte (no generation loss, no decode);
        # everything else (PNG, CMYK, palette, EXIF-rotated...) is re-encoded upright with no
        # orientation tag, so every shard member is a JPEG that PIL and DALI decode alike.
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG" and img.mode in ("RGB", "L") and orientation(img) == 1:
                return data
        return encode_jpeg(_decode(data))


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what CIFAR-10's batch files hold: dicts, lists, bytes and numpy arrays.

    A pickle names the callables it runs; a dataset from elsewhere must not be able to name
    ``os.system``. Python 2 era pickles (the real files) rebuild arrays through
    ``numpy.core.multiarray._reconstruct``; numpy 2 pickles through ``numpy._core``.
    """

    ALLOWED: frozenset[tuple[str, str]] = frozenset(
        {
            (module, name)
            for core in ("numpy.core", "numpy._core")
            for module, name in (
                (f"{core}.multiarray", "_reconstruct"),
                (f"{core}.multiarray", "scalar"),
                (f"{core}.numeric", "_frombuffer"),
            )
        }
        | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"{module}.{name} is not allowed in a CIFAR batch file (only numpy arrays, "
                "lists, dicts and strings are)"
            )
        return super().find_class(module, name)


class CifarBatchesSource:
    """CIFAR-10 in torchvision's ``cifar-10-batches-py`` layout (pickled numpy batches).

    It brings its own test split (``test_batch``), which preparation keeps as the test split.
    """

    kind = "cifar10-batches"

    def __init__(self, root: Path) -> None:
        root = Path(root)
        if (root / CIFAR_DIR).is_dir():
            root = root / CIFAR_DIR
        self.root = root
        meta = root / "batches.meta"
        if not meta.is_file():
            raise SourceError(f"--source {root}: batches.meta not found (not {CIFAR_DIR})")
        self.classes = [c for c in self._unpickle(meta)["label_names"]]
        arrays, labels, items = [], [], []
        files = [(f"data_batch_{i}", None) for i in range(1, 6)] + [("test_batch", "test")]
        for name, split in files:
            path = root / name
            if not path.is_file():
                raise SourceError(f"--source {root}: {name} is missing")
            batch = self._unpickle(path)
            data = np.asarray(batch["data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise SourceError(f"{path}: expected rows of 3072 bytes, got {data.shape}")
            for r, lab in enumerate(batch["labels"]):
                items.append(Item(f"{path}[{r}]", int(lab), split, row=len(labels) + r))
            arrays.append(data)
            labels.extend(batch["labels"])
        self._data = np.concatenate(arrays).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        self._items = items

    @staticmethod
    def _unpickle(path: Path) -> dict:
        try:
            with open(path, "rb") as fh:
                raw = _CifarUnpickler(fh, encoding="latin1").load()
        except (OSError, pickle.UnpicklingError, EOFError) as exc:
            raise SourceError(f"{path}: cannot read CIFAR batch: {exc}") from exc
        if not isinstance(raw, dict):
            raise SourceError(f"{path}: not a CIFAR batch (a {type(raw).__name__}, not a dict)")
        return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}

    def items(self) -> list[Item]:
        return self._items

    def inspect(self, item: Item) -> Inspection:
        return Inspection(True, width=32, height=32)

    def jpeg_bytes(self, item: Item) -> bytes:
        return encode_jpeg(Image.fromarray(self._data[item.row]))


def download_cifar10(root: Path) -> Path:
    """torchvision's real CIFAR-10 download (needs the internet); returns the batches dir."""
    from torchvision.datasets import CIFAR10

    try:
        CIFAR10(root=str(root), train=True, download=True)
    except Exception as exc:  # URLError, socket errors, checksum failures...
        raise SourceError(f"--download: could not download CIFAR-10 into {root}: {exc}") from exc
    return Path(root) / CIFAR_DIR


def open_source(path: str | Path) -> ImageFolderSource | CifarBatchesSource:
    p = Path(path)
    if not p.exists():
        raise SourceError(f"--source {p}: no such file or directory")
    if (p / "batches.meta").is_file() or (p / CIFAR_DIR / "batches.meta").is_file():
        return CifarBatchesSource(p)
    return ImageFolderSource(p)
