"""Code review of issue 21: image metadata held by the serving path, `--out` directories that
export and prepare would have deleted, the INT8 gate at its exact limit, and the ImageNet
(root/train/<class>, root/val/<class>) layout read as pre-split."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from resnet18_dist.serve.classifier import PredictError, decode_image

CLI = str(Path(sys.executable).with_name("resnet18-dist"))


def resnet18_dist(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``resnet18-dist ARGS`` typed in ``cwd``."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run(
        [CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the sha256 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def image_folder(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """Real 8 px PNGs: ``per_class[name]`` images in ``root/<name>/``."""
    rng = np.random.default_rng(seed)
    for k, (name, n) in enumerate(per_class.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            img[..., 0] = 40 * k
            Image.fromarray(img).save(root / name / f"{i:03d}.png")
    return root


# ------------------------------------------------------------------ 1. PNG text chunks
def png_with_text(chunks: int, chars: int, zip_text: bool = True) -> bytes:
    """An 8x8 PNG carrying ``chunks`` text chunks of ``chars`` characters each: a few kB on the
    wire when compressed (zTXt), ``chunks x chars`` bytes once Pillow decompresses them."""
    info = PngImagePlugin.PngInfo()
    for i in range(chunks):
        info.add_text(f"note{i}", "a" * chars, zip=zip_text)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def test_png_text_bomb_is_refused_naming_the_limit() -> None:
    """40 zTXt chunks of 1 MB each: 40 kB sent, 40 MB held once decoded (before: decoded,
    every byte kept in ``img.info``)."""
    data = png_with_text(40, 1_000_000)
    assert len(data) < 100_000
    with pytest.raises(PredictError, match=r"meta\.png: .*text.* limit .*1048576 bytes"):
        decode_image(data, "meta.png", 16_777_216, ("PNG",))


def test_image_metadata_is_dropped_after_decoding() -> None:
    """Text under the limit decodes, but nothing of it is kept with the pixels: a replica holds
    the image, not its metadata (before: 300 kB of text stayed in ``img.info``)."""
    data = png_with_text(1, 300_000)
    img = decode_image(data, "small-meta.png", 16_777_216, ("PNG",))
    assert img.size == (8, 8) and img.getpixel((0, 0)) == (10, 200, 30)
    assert img.info == {}
    assert not getattr(img, "text", {})


def test_the_endpoint_answers_400_naming_the_text_limit() -> None:
    """The replica's own decode step (no cluster): a JSON 400, not 60 MB held per request."""
    from resnet18_dist.serve.app import ClassifierDeployment
    from resnet18_dist.serve.guard import ApiError
    from resnet18_dist.serve.options import ServeOptions

    replica = SimpleNamespace(opts=ServeOptions(model="unused"))
    decode = ClassifierDeployment.func_or_class.decode
    with pytest.raises(ApiError) as err:
        decode(replica, png_with_text(60, 1_000_000), "upload.png")
    assert err.value.status == 400 and err.value.code == "bad_image"
    assert "upload.png" in err.value.detail and "text" in err.value.detail


def test_the_stated_memory_bound_counts_4_bytes_per_pixel() -> None:
    """Pillow keeps RGB, RGBA and CMYK at 4 bytes per pixel; the help said 3."""
    from resnet18_dist.serve.options import ServeOptions

    help_text = ServeOptions.__dataclass_fields__["max_pixels"].metadata["help"]
    assert "x 4 bytes" in help_text and "x 3 bytes" not in help_text
    rgba = Image.new("RGBA", (4, 4))
    assert len(rgba.tobytes()) == 4 * 16


# ------------------------------------------------------------------ 2. --out is not rm -rf
@pytest.mark.slow
def test_prepare_refuses_an_out_it_did_not_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--out .`, an --out holding the source, an existing directory of other files: exit 2
    naming --out, nothing touched; a dataset prepare wrote is replaced."""
    from resnet18_dist.data.prepare import PrepareOptions, prepare_dataset
    from resnet18_dist.options import ConfigError

    image_folder(tmp_path / "data" / "x" / "raw", {"cat": 10, "dog": 10})
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    before = snapshot(tmp_path)
    for out in (".", "data/x"):
        r = resnet18_dist(tmp_path, "prepare", "--source", "data/x/raw", "--out", out)
        assert r.returncode == 2, (out, r.stdout, r.stderr)
        assert "error: --out: " in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert snapshot(tmp_path) == before, out
    monkeypatch.chdir(tmp_path)
    for out, reason in [("data/x/raw", "is --source"), ("notes", "not a prepared dataset")]:
        with pytest.raises(ConfigError, match=f"--out: {out} .*{reason}"):
            prepare_dataset(PrepareOptions(source="data/x/raw", out=out, quiet=True))
        assert snapshot(tmp_path) == before, out
    for _ in range(2):  # a new directory, then the dataset it holds is replaced
        r = resnet18_dist(tmp_path, "prepare", "--source", "data/x/raw", "--out", "data/y")
        assert r.returncode == 0, r.stderr
        assert json.loads((tmp_path / "data" / "y" / "manifest.json").read_text())["counts"]
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("data/y")} == before


@pytest.mark.slow
def test_export_refuses_a_run_directory_the_cwd_and_other_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`export --out runs/r1` would have wiped the run's checkpoints: exit 2 naming --out. One
    case as typed (the command imports torch), the rest through the same function."""
    from resnet18_dist.export.pipeline import ExportOptions, export_artifacts
    from resnet18_dist.options import ConfigError

    run = tmp_path / "runs" / "r1"
    (run / "checkpoint_epoch0001").mkdir(parents=True)
    (run / "checkpoint_epoch0001" / "checkpoint.pt").write_bytes(b"weights")
    (run / "report.json").write_text("{}")  # a finished run has one too: not an export's mark
    (tmp_path / "data" / "x").mkdir(parents=True)
    (tmp_path / "data" / "x" / "manifest.json").write_text("{}")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    before = snapshot(tmp_path)
    checkpoint = "runs/r1/checkpoint_epoch0001"
    r = resnet18_dist(tmp_path, "export", "--checkpoint", checkpoint, "--out", "runs/r1")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "error: --out: " in r.stderr and "contains --checkpoint" in r.stderr, r.stderr
    assert snapshot(tmp_path) == before
    monkeypatch.chdir(tmp_path)
    cases = [
        ("runs/r1", ".", None, "is the current directory"),
        ("runs/r1", "runs/r1", None, "is --checkpoint"),
        ("runs/r1", "runs", None, "contains --checkpoint"),
        ("runs/r1", "notes", None, "not an export"),
        ("runs/r1", "data", "data/x", "contains --data-dir"),
        ("runs/r1", "data/x", "data/x", "is --data-dir"),
    ]
    for checkpoint, out, data_dir, reason in cases:
        opts = ExportOptions(checkpoint=checkpoint, out=out, data_dir=data_dir)
        with pytest.raises(ConfigError, match=f"--out: {out} .*{reason}"):
            export_artifacts(opts)
        assert snapshot(tmp_path) == before, out


def test_out_checks_accept_a_previous_export_and_an_empty_directory(tmp_path: Path) -> None:
    """What may be replaced: an export (its meta.json), a prepared dataset (its manifest.json),
    an empty directory, nothing; checked without running an export."""
    from resnet18_dist.data.manifest import FORMAT as DATASET_FORMAT
    from resnet18_dist.model_meta import FORMAT as EXPORT_FORMAT
    from resnet18_dist.options import ConfigError
    from resnet18_dist.output_dir import check_output_dir

    (tmp_path / "old-export").mkdir()
    (tmp_path / "old-export" / "meta.json").write_text(json.dumps({"format": EXPORT_FORMAT}))
    (tmp_path / "old-data").mkdir()
    (tmp_path / "old-data" / "manifest.json").write_text(json.dumps({"format": DATASET_FORMAT}))
    (tmp_path / "empty").mkdir()
    export_mark = ("meta.json", EXPORT_FORMAT, "an export")
    data_mark = ("manifest.json", DATASET_FORMAT, "a prepared dataset")
    check_output_dir(tmp_path / "old-export", export_mark, {})
    check_output_dir(tmp_path / "old-data", data_mark, {})
    check_output_dir(tmp_path / "empty", export_mark, {})
    check_output_dir(tmp_path / "new", data_mark, {})
    with pytest.raises(ConfigError, match="--out: .*old-data.* not an export"):
        check_output_dir(tmp_path / "old-data", export_mark, {})
    with pytest.raises(ConfigError, match="--out: .*old-export.* contains --checkpoint"):
        check_output_dir(
            tmp_path / "old-export", export_mark, {"--checkpoint": tmp_path / "old-export" / "c"}
        )


# ------------------------------------------------------------------ 7. the INT8 gate
def test_int8_gate_passes_a_drop_exactly_at_the_limit() -> None:
    """90 -> 89 correct of 100 is a drop of exactly 1 point; 100 * (0.9 - 0.89) > 1.0 in floats
    failed it."""
    from resnet18_dist.export.pipeline import int8_gate

    assert 100 * (0.9 - 0.89) > 1.0  # the float trap the gate must not fall into
    assert int8_gate(fp32_correct=90, int8_correct=89, images=100, max_drop=1.0) == (True, 1.0)
    assert int8_gate(fp32_correct=90, int8_correct=88, images=100, max_drop=1.0)[0] is False
    assert int8_gate(fp32_correct=1000, int8_correct=997, images=1000, max_drop=0.3)[0] is True
    assert int8_gate(fp32_correct=1000, int8_correct=996, images=1000, max_drop=0.3)[0] is False
    assert int8_gate(fp32_correct=50, int8_correct=51, images=100, max_drop=0.0) == (True, -1.0)


# ------------------------------------------------------------------ 12. ImageNet layout
def _split_counts(out: Path) -> tuple[dict, dict]:
    m = json.loads((out / "manifest.json").read_text())
    return m, {s: dict(zip(m["classes"], m["class_counts"][s], strict=True)) for s in m["counts"]}


def test_imagenet_layout_is_read_as_pre_split(tmp_path: Path) -> None:
    """root/train/<class> and root/val/<class>: the classes are cat and dog (before: train and
    val), val is kept as given, the test split is divided off train in the train:test ratio."""
    from resnet18_dist.data.prepare import PrepareOptions, prepare_dataset

    src = tmp_path / "imagenet"
    image_folder(src / "train", {"cat": 12, "dog": 16})
    image_folder(src / "val", {"cat": 4, "dog": 3}, seed=1)
    prepare_dataset(PrepareOptions(source=str(src), out=str(tmp_path / "a"), quiet=True))
    m, counts = _split_counts(tmp_path / "a")
    assert m["classes"] == ["cat", "dog"]
    assert counts["val"] == {"cat": 4, "dog": 3}
    assert counts["test"] == {"cat": 3, "dog": 4}  # 6:2 of train -> a quarter
    assert counts["train"] == {"cat": 9, "dog": 12}
    assert m["split_given"] == ["train", "val"]

    image_folder(src / "test", {"cat": 2, "dog": 5}, seed=2)
    prepare_dataset(PrepareOptions(source=str(src), out=str(tmp_path / "b"), quiet=True))
    m, counts = _split_counts(tmp_path / "b")
    assert counts["train"] == {"cat": 12, "dog": 16}
    assert counts["val"] == {"cat": 4, "dog": 3} and counts["test"] == {"cat": 2, "dog": 5}
    assert m["split_given"] == ["train", "val", "test"]


def test_split_named_class_folders_are_refused(tmp_path: Path) -> None:
    """root/train/<class> beside root/cat/: neither layout; exit 2 naming the folder."""
    image_folder(tmp_path / "src" / "train", {"cat": 4, "dog": 4})
    image_folder(tmp_path / "src", {"cat": 4})
    r = resnet18_dist(tmp_path, "prepare", "--source", "src", "--out", "data", "--quiet")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "--source" in r.stderr and "train" in r.stderr and "cat" in r.stderr, r.stderr
    assert not (tmp_path / "data").exists()


def test_classes_named_train_and_val_are_refused_not_read_as_two_classes(tmp_path: Path) -> None:
    """root/train/*.png and root/val/*.png: the issue's own case, a 2-class dataset named
    train and val before; now exit 2 saying class folders may not be named so."""
    for name in ("train", "val"):
        image_folder(tmp_path / "flat", {name: 4})
    r = resnet18_dist(tmp_path, "prepare", "--source", "flat", "--out", "data", "--quiet")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "--source" in r.stderr and "may not be named train, val, test" in r.stderr, r.stderr
    assert not (tmp_path / "data").exists()
