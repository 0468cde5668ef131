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
from resnet18_dist.output_dir import check_output_dir

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

# Below this many items a process pool costs more than it saves.
POOL_MIN_ITEMS = 4000
# What --out may be besides a new or empty directory: a dataset this command wrote.
DATASET_MARK = (MANIFEST, FORMAT, "a prepared dataset")


@dataclass
class PrepareOptions(Options):
    source: str | None = opt(
        None,
        "An ImageFolder directory (root/<class>/<image>), CIFAR-10's cifar-10-batches-py "
        "directory (or its parent), or `digits` for scikit-learn's bundled digits.",
        required=True,
        path=("digits",),
    )
    out: str | None = opt(
        None,
        "Output directory: a new or empty one, or a dataset prepared before (replaced "
        "atomically); any other existing directory is refused.",
        required=True,
        path=True,
    )
    download: bool = opt(
        False, "Download CIFAR-10 into --source with torchvision first (needs the internet)."
    )
    split: tuple[float, float, float] = opt(
        (0.6, 0.2, 0.2),
        "train,val,test fractions. Splits the source has (CIFAR-10's test batch; the train/, "
        "val/ and test/ folders of a pre-split tree) are kept, and each split it lacks is "
        "divided off the rest in its ratio to train.",
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
    """Indices per split. Items the source put in val or test stay there (CIFAR's test batch,
    an ImageNet-style root/val/); the rest (its train, or everything) is the pool, and each
    split the source lacks is divided off it stratified, in its ratio to what remains: no
    test -> the pool's test_r / (train_r + test_r) (all of test_r when val is missing too),
    then no val -> val_r / (train_r + val_r). So a source with its own test split is divided
    train:val 6:2 (CIFAR), one with its own val train:test 6:2, and one with neither 6:2:2."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    where = np.array([f or "" for f in fixed])
    train_r, val_r, test_r = ratios
    parts = {s: idx[where == s] for s in ("val", "test") if (where == s).any()}
    given = set(parts)
    pool = idx[(where != "val") & (where != "test")]
    try:
        if "test" not in parts:
            size = test_r / (train_r + test_r) if "val" in parts else test_r
            pool, parts["test"] = train_test_split(
                pool, test_size=size, stratify=labels[pool], random_state=seed, shuffle=True
            )
        if "val" not in parts:
            pool, parts["val"] = train_test_split(
                pool,
                test_size=val_r / (train_r + val_r),
                stratify=labels[pool],
                random_state=seed + 1,
                shuffle=True,
            )
    except ValueError as exc:  # sklearn: a class too small to appear in every split
        counts = np.bincount(labels[pool])
        raise SourceError(
            f"cannot split {len(pool)} images stratified by class (smallest class has "
            f"{counts[counts > 0].min()} images): {exc}"
        ) from exc
    # A split the source gave keeps its order (class by class); shuffle it too so shards are
    # class-mixed. (test always was shuffled: seed + 2 keeps the existing datasets' bytes.)
    test = np.random.default_rng(seed + 2).permutation(parts["test"])
    val = parts["val"]
    if "val" in given:
        val = np.random.default_rng(seed + 3).permutation(val)
    if given == {"val", "test"}:
        pool = np.random.default_rng(seed + 4).permutation(pool)
    return {"train": np.asarray(pool), "val": np.asarray(val), "test": test}


def split_rule(given: list[str]) -> str:
    """The manifest's words for how the splits were made, ``given`` the source's own splits."""
    if given in ([], ["train"]):
        return "stratified train/val/test by the split ratios"
    kept = f"source {'/'.join(given)} split{'s' if len(given) > 1 else ''} kept"
    missing = [s for s in ("val", "test") if s not in given]
    if not missing:
        return kept
    if len(missing) == 2:
        return f"{kept}; val and test divided off train by the split ratios"
    return f"{kept}; {missing[0]} divided off the rest by the train:{missing[0]} ratio"


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
    # Publishing replaces --out: refuse, before any work, one that holds anything else.
    check_output_dir(str(opts.out), DATASET_MARK, {"--source": src_path})
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

    fixed = [items[i].split for i in good]
    given = [s for s in SPLITS if s in fixed]
    if "train" in given:  # pre-split: the model must see every class in training
        train_counts = np.bincount(
            [lab for lab, f in zip(labels, fixed, strict=True) if f == "train"],
            minlength=len(source.classes),
        )
        missing = [source.classes[c] for c in np.flatnonzero(train_counts == 0)]
        if missing:
            raise SourceError(
                f"--source {src_path}: no valid training image of class(es) "
                f"{', '.join(missing)} in train/"
            )
    splits = stratified_split(labels, fixed, opts.split, opts.seed)
    label_digits = len(str(len(source.classes) - 1))

    manifest: dict[str, Any] = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"kind": source.kind, "path": source_label or str(src_path)},
        "classes": source.classes,
        "seed": opts.seed,
        "split_ratios": dict(zip(SPLITS, opts.split, strict=True)),
        # The splits the source gave (an ImageNet-style tree's folders, CIFAR's test batch).
        "split_given": given,
        "split_rule": split_rule(given),
        "counts": {s: len(splits[s]) for s in SPLITS},
        "class_counts": {
            s: np.bincount(labels[splits[s]], minlength=len(source.classes)).tolist()
            for s in SPLITS
        },
        "label_digits": label_digits,
        "image": {
            "native_size": sides[0][0] if same else None,
            "max_side": max_side,
            "all_square": all(w == h for w, h in sides),
        },
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
