"""The prepared-dataset manifest and the per-shard sample index.

A prepared dataset directory holds, per split, WebDataset tar shards (``<key>.jpg`` and
``<key>.cls``, the label as zero-padded ASCII decimal) with a DALI-format ``.idx`` file beside
each, plus ``manifest.json`` (classes, counts, shards with sha256, seed, source) and
``rejects.json``. Both loader backends read the same files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from resnet18_dist.errors import UserError

MANIFEST = "manifest.json"
REJECTS = "rejects.json"
FORMAT = "resnet18-dist/webdataset-v1"
SPLITS = ("train", "val", "test")
IMAGE_EXT = "jpg"
LABEL_EXT = "cls"


class DatasetError(ValueError, UserError):
    """A prepared dataset is missing, malformed or inconsistent; the message names the file."""


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the dataset root
    idx: str  # DALI webdataset index, relative to the dataset root
    count: int
    sha256: str
    bytes: int


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's image and label bytes lie inside a shard."""

    shard: int  # position in the split's shard list
    key: str
    image_offset: int
    image_size: int
    label_offset: int
    label_size: int


@dataclass
class Manifest:
    root: Path
    classes: list[str]
    shards: dict[str, list[ShardInfo]]
    counts: dict[str, int]
    class_counts: dict[str, list[int]]
    label_digits: int
    native_size: int | None  # side length when every image is square and the same size
    max_side: int
    raw: dict[str, Any]
    # Every image square (of any size). Manifests from before it was recorded: known only
    # when every image has the same square size.
    all_square: bool | None = None

    def __post_init__(self) -> None:
        if self.all_square is None:
            self.all_square = self.native_size is not None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def shard_paths(self, split: str) -> list[Path]:
        return [self.root / s.path for s in self.shards[split]]

    def index_paths(self, split: str) -> list[Path]:
        return [self.root / s.idx for s in self.shards[split]]

    @classmethod
    def load(cls, root: str | Path) -> Manifest:
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise DatasetError(
                f"{root} is not a prepared dataset: {MANIFEST} is missing "
                "(prepare one with `python launch/prepare_data.py --source SRC --out DIR`)"
            )
        manifest = cls.parse(path.read_bytes(), root, str(path))
        for split in SPLITS:
            for shard in manifest.shards[split]:
                for rel in (shard.path, shard.idx):
                    if not (root / rel).is_file():
                        raise DatasetError(f"{root / rel} listed in {path} is missing")
        return manifest

    @classmethod
    def parse(cls, data: bytes, root: Path, where: str) -> Manifest:
        """A manifest from its bytes, every field checked but no file looked at (``where``
        names it in errors: a path, or a bucket URI read before anything is fetched)."""
        try:
            raw = json.loads(data)
            if raw.get("format") != FORMAT:
                raise DatasetError(
                    f"{where}: unknown format {raw.get('format')!r}, expected {FORMAT}"
                )
            shards = {split: [ShardInfo(**s) for s in raw["shards"][split]] for split in SPLITS}
            manifest = cls(
                root=root,
                classes=list(raw["classes"]),
                shards=shards,
                counts={k: int(v) for k, v in raw["counts"].items()},
                class_counts={k: list(v) for k, v in raw["class_counts"].items()},
                label_digits=int(raw["label_digits"]),
                native_size=raw["image"]["native_size"],
                max_side=int(raw["image"]["max_side"]),
                raw=raw,
                all_square=raw["image"].get("all_square"),
            )
            for split in SPLITS:
                for shard in manifest.shards[split]:
                    int(shard.bytes), int(shard.count)
                    for rel in (shard.path, shard.idx):
                        # Paths stay inside the dataset: a copied manifest cannot write elsewhere.
                        parts = PurePosixPath(rel).parts
                        if PurePosixPath(rel).is_absolute() or not parts or ".." in parts:
                            raise DatasetError(f"{where}: shard path {rel!r} leaves the dataset")
        except DatasetError:
            raise
        except (KeyError, TypeError, AttributeError, ValueError) as exc:  # JSON errors included
            raise DatasetError(f"{where} is malformed: {exc!r}") from exc
        return manifest


def parse_index(path: Path, shard: int) -> list[SampleRef]:
    """Read a DALI webdataset index (format v1.2, as written by DALI's ``wds2idx``)."""
    lines = Path(path).read_text().splitlines()
    try:
        version, count = lines[0].split()
        if version != "v1.2":
            raise DatasetError(f"{path}: unsupported index version {version!r}")
        refs = []
        for line in lines[1:]:
            parts = line.split()
            members = {}
            for i in range(0, len(parts), 4):
                ext, offset, size, name = parts[i : i + 4]
                members[ext] = (int(offset), int(size), name)
            img, lab = members[IMAGE_EXT], members[LABEL_EXT]
            key = img[2].rsplit(".", 1)[0]
            refs.append(SampleRef(shard, key, img[0], img[1], lab[0], lab[1]))
    except (ValueError, KeyError, IndexError) as exc:
        raise DatasetError(f"{path} is not a valid webdataset index: {exc!r}") from exc
    if len(refs) != int(count):
        raise DatasetError(f"{path}: header says {count} samples, found {len(refs)}")
    return refs


def format_label(label: int, digits: int) -> bytes:
    return str(label).zfill(digits).encode("ascii")
