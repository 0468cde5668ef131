"""Data preparation: validate every image, split 6:2:2 stratified and seeded, write tar shards.

Two passes so that a dataset of any size streams through: pass 1 decodes every image once and
records rejects and sizes; pass 2 writes each split's shards (JPEG bytes copied as they are,
other formats re-encoded). Everything is written into a staging directory that replaces the
output directory only when complete.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm.auto import tqdm

from resnet18_dist.atomic import atomic_write_text, staged_directory
from resnet18_dist.data.integrity import sha256_file
from resnet18_dist.data.manifest import (
    FORMAT,
    IMAGE_EXT,
    LABEL_EXT,
    MANIFEST,
    REJECTS,
    SPLITS,
    format_label,
)
from resnet18_dist.data.sources import (
    CifarBatchesSource,
    ImageFolderSource,
    Inspection,
    Item,
    SourceError,
    download_cifar10,
    open_source,
)
from resnet18_dist.options import Options, check, opt

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

# Below this many items a process pool costs more than it saves.
POOL_MIN_ITEMS = 4000


@dataclass
class PrepareOptions(Options):
    source: str | None = opt(
        None,
        "An ImageFolder directory (root/<class>/<image>), CIFAR-10's cifar-10-batches-py "
        "directory (or its parent), or `digits` for scikit-learn's bundled digits.",
        required=True,
        path=("digits",),
    )
    out: str | None = opt(None, "Output directory (replaced atomically).", required=True, path=True)
    download: bool = opt(
        False, "Download CIFAR-10 into --source with torchvision first (needs the internet)."
    )
    split: tuple[float, float, float] = opt(
        (0.6, 0.2, 0.2),
        "train,val,test fractions. If the source has its own test split it is kept, and the "
        "rest is divided train:val in the train:val ratio.",
        gt=0,
    )
    seed: int = opt(0, "Split and shuffle seed.")
    shard_size: int = opt(2000, "Max samples per shard.", ge=1)
    min_shards: int = opt(
        8, "Min shards per split (so that up to this many workers read disjoint shards).", ge=1
    )
    workers: int | None = opt(None, "Decode processes. Default: all CPUs.", ge=1)
    quiet: bool = opt(False, "No progress bars.")
    # Recorded in the manifest for --augment auto (the built-in digits set it); not a flag.
    augment_hint: str | None = opt(None, "Augmentation policy hint for --augment auto.", cli=False)

    def validate(self) -> None:
        check(
            math.isclose(sum(self.split), 1.0, abs_tol=1e-6),
            "split",
            f"fractions must sum to 1 (got {sum(self.split):.4f})",
        )

    @property
    def processes(self) -> int:
        return self.workers or os.cpu_count() or 1


@dataclass
class PrepareResult:
    out: Path
    counts: dict[str, int]
    rejects: list[dict[str, str]]
    num_shards: dict[str, int]
    seconds: float


# ---------------------------------------------------------------- process pool plumbing
_SOURCE: Any = None


def _init_worker(source: Any) -> None:
    global _SOURCE
    _SOURCE = source


def _inspect(item: Item) -> Inspection:
    return _SOURCE.inspect(item)


def _jpeg(item: Item) -> bytes:
    return _SOURCE.jpeg_bytes(item)


def _parallel_map(fn: Callable[[T], R], items: list[T], source: Any, workers: int) -> Iterator[R]:
    """Ordered map; a fork pool inherits the source instead of pickling it (CIFAR is 150 MB)."""
    _init_worker(source)
    if workers <= 1 or len(items) < POOL_MIN_ITEMS:
        yield from map(fn, items)
        return
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(source,)) as pool:
        yield from pool.imap(fn, items, chunksize=64)


# ---------------------------------------------------------------- splitting
def stratified_split(
    labels: np.ndarray,
    fixed: list[str | None],
    ratios: tuple[float, float, float],
    seed: int,
) -> dict[str, np.ndarray]:
    """Indices per split. Items the source fixed to a split stay there (CIFAR's test batch); the
    rest is divided train:val in the ratio of the train and val fractions (6:2 -> 3:1)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    fixed_test = np.array([f == "test" for f in fixed], dtype=bool)
    train_r, val_r, test_r = ratios
    try:
        if fixed_test.any():
            test = idx[fixed_test]
            rest = idx[~fixed_test]
        else:
            rest, test = train_test_split(
                idx, test_size=test_r, stratify=labels, random_state=seed, shuffle=True
            )
        train, val = train_test_split(
            rest,
            test_size=val_r / (train_r + val_r),
            stratify=labels[rest],
            random_state=seed + 1,
            shuffle=True,
        )
    except ValueError as exc:  # sklearn: a class too small to appear in every split
        counts = np.bincount(labels)
        raise SourceError(
            f"cannot split {len(labels)} images stratified by class (smallest class has "
            f"{counts[counts > 0].min()} images): {exc}"
        ) from exc
    # A fixed test split keeps the source's order; shuffle it too so shards are class-mixed.
    test = np.random.default_rng(seed + 2).permutation(test)
    return {"train": np.asarray(train), "val": np.asarray(val), "test": test}


def _num_shards(n: int, opts: PrepareOptions) -> int:
    return max(1, min(n, max(opts.min_shards, math.ceil(n / opts.shard_size))))


def _write_index(tar_path: Path, idx_path: Path) -> None:
    """DALI's webdataset index (v1.2): one line per sample, `ext offset size name` per member.

    DALI ships ``wds2idx`` for this, but it shells out to GNU tar and is not installed without
    DALI; the torchvision backend reads the same file for random access.
    """
    samples: dict[str, list[str]] = {}
    with tarfile.open(tar_path) as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, []).append(f"{ext} {m.offset_data} {m.size} {m.name}")
    lines = [f"v1.2 {len(samples)}"] + [" ".join(parts) for parts in samples.values()]
    atomic_write_text(idx_path, "\n".join(lines) + "\n")


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    import io

    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # reproducible shards: the same seed gives byte-identical tar files
    tar.addfile(info, io.BytesIO(data))


def _progress(it: Iterable[T], total: int, desc: str, quiet: bool) -> Iterable[T]:
    return tqdm(it, total=total, desc=desc, unit="img", disable=quiet, mininterval=1.0)


def prepare_dataset(opts: PrepareOptions, source_label: str | None = None) -> PrepareResult:
    """Validate, split and shard ``opts.source`` into ``opts.out``; see the module docstring."""
    start = time.perf_counter()
    src_path = Path(opts.source)
    if opts.download:
        src_path = download_cifar10(src_path)
    source: ImageFolderSource | CifarBatchesSource = open_source(src_path)
    items = source.items()
    if getattr(source, "ignored", None):
        log.warning(
            "ignoring %d file(s) outside class directories: %s",
            len(source.ignored),
            ", ".join(source.ignored[:5]),
        )

    # Pass 1: decode every image once.
    inspections = list(
        _progress(
            _parallel_map(_inspect, items, source, opts.processes),
            len(items),
            "validate",
            opts.quiet,
        )
    )
    rejects = [
        {"path": it.ref, "reason": ins.reason}
        for it, ins in zip(items, inspections, strict=True)
        if not ins.ok
    ]
    for r in rejects:
        log.warning("rejected %s: %s", r["path"], r["reason"])
    good = [i for i, ins in enumerate(inspections) if ins.ok]
    if not good:
        raise SourceError(f"--source {src_path}: no valid images ({len(rejects)} rejected)")
    labels = np.array([items[i].label for i in good])
    counts = np.bincount(labels, minlength=len(source.classes))
    empty = [source.classes[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise SourceError(
            f"--source {src_path}: class(es) with no valid images: {', '.join(empty)}"
        )
    sides = [(inspections[i].width, inspections[i].height) for i in good]
    same = len(set(sides)) == 1 and sides[0][0] == sides[0][1]
    max_side = max(max(s) for s in sides)

    splits = stratified_split(labels, [items[i].split for i in good], opts.split, opts.seed)
    label_digits = len(str(len(source.classes) - 1))

    manifest: dict[str, Any] = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"kind": source.kind, "path": source_label or str(src_path)},
        "classes": source.classes,
        "seed": opts.seed,
        "split_ratios": dict(zip(SPLITS, opts.split, strict=True)),
        "split_rule": (
            "source test split kept; rest divided train:val by the train:val ratio"
            if any(items[i].split == "test" for i in good)
            else "stratified train/val/test by the split ratios"
        ),
        "counts": {s: len(splits[s]) for s in SPLITS},
        "class_counts": {
            s: np.bincount(labels[splits[s]], minlength=len(source.classes)).tolist()
            for s in SPLITS
        },
        "label_digits": label_digits,
        "image": {"native_size": sides[0][0] if same else None, "max_side": max_side},
        "rejects": len(rejects),
        "augment_hint": opts.augment_hint,
        "shards": {},
    }

    with staged_directory(Path(opts.out)) as stage:
        for split in SPLITS:
            order = [good[i] for i in splits[split]]
            n_shards = _num_shards(len(order), opts)
            chunks = np.array_split(np.arange(len(order)), n_shards)
            payloads = _parallel_map(_jpeg, [items[i] for i in order], source, opts.processes)
            bar = tqdm(total=len(order), desc=f"write {split}", unit="img", disable=opts.quiet)
            shard_infos = []
            for s, chunk in enumerate(chunks):
                name = f"{split}-{s:06d}"
                tar_path = stage / f"{name}.tar"
                with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tar:
                    for pos in chunk:
                        key = f"{split}{pos:08d}"
                        _add_member(tar, f"{key}.{IMAGE_EXT}", next(payloads))
                        bar.update(1)
                        label = items[order[pos]].label
                        _add_member(tar, f"{key}.{LABEL_EXT}", format_label(label, label_digits))
                _write_index(tar_path, stage / f"{name}.idx")
                shard_infos.append(
                    {
                        "path": f"{name}.tar",
                        "idx": f"{name}.idx",
                        "count": len(chunk),
                        "sha256": sha256_file(tar_path),
                        "bytes": tar_path.stat().st_size,
                    }
                )
            bar.close()
            manifest["shards"][split] = shard_infos
        atomic_write_text(stage / REJECTS, json.dumps(rejects, indent=1) + "\n")
        atomic_write_text(stage / MANIFEST, json.dumps(manifest, indent=1) + "\n")

    return PrepareResult(
        out=Path(opts.out),
        counts=manifest["counts"],
        rejects=rejects,
        num_shards={s: len(manifest["shards"][s]) for s in SPLITS},
        seconds=time.perf_counter() - start,
    )
