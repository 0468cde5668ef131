"""Photographs: the photo geometry (random resized crop in training; resize of the shorter side
and centre crop in evaluation), chosen by `--preprocess auto`, the same in the torchvision and
DALI backends, recorded in the export and applied by predict and the REST endpoint; and a
fine-tuning run from torchvision ResNet18 weights on non-square photos, from preparation to a
served answer, typed as a user types it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image, ImageDraw

from resnet18_dist.config import DataConfig
from resnet18_dist.data.loaders import build_loaders, loader_settings
from resnet18_dist.data.manifest import Manifest
from resnet18_dist.data.policy import DataPolicy, resolve_policy
from resnet18_dist.data.prepare import PrepareOptions, prepare_dataset
from resnet18_dist.data.torch_loader import eval_transform, train_transform
from resnet18_dist.model_meta import ExportMeta
from resnet18_dist.models import ModelSpec, build_model
from resnet18_dist.models.model_file import load_model_pt, save_model_pt
from resnet18_dist.preprocessing import centre_box, photo_resize, shorter_side_to
from resnet18_dist.serve.classifier import OnnxClassifier

from .conftest import REPO, make_color_folder, user_env

# Landscape, portrait, odd sides (so that centre offsets round half to even), one very wide,
# and one of a camera's proportions large enough that resizing it must antialias.
PHOTO_SIDES = [(160, 120), (120, 160), (151, 100), (97, 131), (200, 90), (1200, 800)]
COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 230)]


def make_photo_folder(root: Path, num_classes: int = 3, per_class: int = 10) -> Path:
    """Non-square JPEG photos: a textured gradient with a disc of the class's colour somewhere
    in its middle half, so the class survives most crops."""
    rng = np.random.default_rng(7)
    for k in range(num_classes):
        d = root / f"class{k}"
        d.mkdir(parents=True)
        for i in range(per_class):
            w, h = PHOTO_SIDES[(i + k) % len(PHOTO_SIDES)]
            y, x = np.mgrid[0:h, 0:w]
            base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], -1)
            pixels = np.clip(base + rng.integers(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(pixels)
            cx, cy = rng.integers(w // 4, 3 * w // 4), rng.integers(h // 4, 3 * h // 4)
            r = min(w, h) // 3
            ImageDraw.Draw(img).ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLOURS[k])
            img.save(d / f"{i:03d}.jpg", quality=92)
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_photo_folder(tmp_path_factory.mktemp("photos") / "src")


@pytest.fixture(scope="module")
def prepared_photos(photos: Path) -> Manifest:
    out = photos.parent / "prepared"
    prepare_dataset(PrepareOptions(source=str(photos), out=str(out), quiet=True))
    return Manifest.load(out)


def test_auto_picks_the_photo_geometry_for_photos_and_squash_for_small_squares(
    prepared_photos: Manifest, digits_dataset: Path, tmp_path: Path
) -> None:
    assert prepared_photos.all_square is False and prepared_photos.max_side == 1200
    policy = resolve_policy(DataConfig(image_size=64), prepared_photos)
    assert (policy.preprocess, policy.preprocess_reason) == (
        "photo",
        "auto: the images are not all square",
    )
    assert policy.eval_resize == 73 == photo_resize(64)  # floor(64 / 0.875)
    assert photo_resize(224) == 256  # torchvision's reference: 256 then the centre 224
    # The digits (8 px squares at their own size) and squares no larger than the image size.
    digits = Manifest.load(digits_dataset)
    assert digits.all_square
    assert resolve_policy(DataConfig(), digits).preprocess == "squash"
    squares = tmp_path / "squares"
    make_color_folder(squares / "src", num_classes=2, per_class=10, size=96)
    prepare_dataset(PrepareOptions(source=str(squares / "src"), out=str(squares / "p"), quiet=True))
    sq = Manifest.load(squares / "p")
    assert resolve_policy(DataConfig(image_size=96), sq).preprocess == "squash"
    assert resolve_policy(DataConfig(image_size=128), sq).preprocess == "squash"
    smaller = resolve_policy(DataConfig(image_size=64), sq)  # squares larger than the input
    assert (smaller.preprocess, smaller.preprocess_reason) == (
        "photo",
        "auto: images up to 96 px, larger than 64 px",
    )
    # Small squares stay squashed even when downscaled (CIFAR's 32 px at 16 px): a random
    # resized crop of a few pixels, or a centre crop cutting an eighth, would not help them.
    make_color_folder(squares / "src32", num_classes=2, per_class=10, size=32)
    prepare_dataset(
        PrepareOptions(source=str(squares / "src32"), out=str(squares / "32"), quiet=True)
    )
    at_16 = resolve_policy(DataConfig(image_size=16), Manifest.load(squares / "32"))
    assert (at_16.preprocess, at_16.preprocess_reason) == (
        "squash",
        "auto: square images of at most 32 px",
    )
    # The option overrides auto either way.
    assert resolve_policy(DataConfig(image_size=64, preprocess="squash"), prepared_photos) == (
        DataPolicy(64, "cifar", preprocess="squash")
    )
    assert resolve_policy(DataConfig(preprocess="photo"), digits).preprocess == "photo"
    # A manifest written before all_square was recorded: square only if one native size.
    raw = json.loads((squares / "p" / "manifest.json").read_text())
    del raw["image"]["all_square"]
    (squares / "p" / "manifest.json").write_text(json.dumps(raw))
    assert Manifest.load(squares / "p").all_square  # native_size 96: all the same square
    with pytest.raises(Exception, match="preprocess"):
        DataConfig(preprocess="crop").validate()


def test_size_arithmetic_is_torchvisions() -> None:
    from torchvision.transforms.v2 import functional as F

    for w, h in [(160, 120), (120, 160), (151, 100), (97, 131), (200, 90), (73, 73)]:
        img = Image.new("RGB", (w, h))
        resized = F.resize(img, 73)
        assert resized.size == shorter_side_to(w, h, 73)
        box = centre_box(*resized.size, 64)
        cropped = F.center_crop(resized, 64)
        assert cropped.size == (64, 64)
        ref = np.asarray(resized)[box[1] : box[3], box[0] : box[2]]
        assert np.array_equal(np.asarray(cropped), ref), (w, h)


@pytest.mark.parametrize("preprocess", ["photo", "squash"])
def test_predict_and_serving_preprocess_exactly_as_evaluation(
    photos: Path, preprocess: str
) -> None:
    """The clients' PIL geometry (serve/classifier.py) against the torchvision eval transform
    that evaluation and the export's accuracy check use, on every photo: the same tensor."""
    size = 57  # odd: the centre offsets of even and odd sides round differently
    policy = DataPolicy(size, "none", preprocess=preprocess)
    meta = ExportMeta.describe(
        classes=["a"],
        image_size=size,
        preprocess=preprocess,
        eval_resize=policy.eval_resize,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        model_spec={},
        source_checkpoint="x",
    )
    clf = OnnxClassifier(None, meta, Path("x"))
    transform = eval_transform(policy)
    files = sorted(photos.rglob("*.jpg"))
    for f in files:
        with Image.open(f) as img:
            ours = clf.preprocess([img])[0]
            ref = transform(img.convert("RGB")).numpy()
        assert ours.shape == (3, size, size)
        np.testing.assert_allclose(ours, ref, atol=1e-5, err_msg=str(f))


@pytest.mark.parametrize("augment", ["seed", "cifar", "trivialaugment", "autoaugment", "none"])
def test_photo_training_is_one_random_resized_crop_and_one_flip_then_the_policy(
    augment: str,
) -> None:
    from torchvision.transforms import v2

    steps = train_transform(DataPolicy(96, augment, preprocess="photo")).transforms
    kinds = [type(t) for t in steps]
    if augment == "none":  # the evaluation geometry: no randomness
        assert kinds[:2] == [v2.Resize, v2.CenterCrop] and steps[0].size == [109]
        return
    crop = steps[0]
    assert isinstance(crop, v2.RandomResizedCrop) and crop.size == (96, 96)
    assert (crop.scale, crop.ratio) == ((0.08, 1.0), (3 / 4, 4 / 3))
    assert kinds.count(v2.RandomHorizontalFlip) == 1 and kinds[1] is v2.RandomHorizontalFlip
    assert v2.RandomCrop not in kinds and v2.Resize not in kinds  # no squash, no padded crop
    extra = {
        "seed": [v2.RandomRotation, v2.ColorJitter],
        "cifar": [],
        "trivialaugment": [v2.TrivialAugmentWide],
        "autoaugment": [v2.AutoAugment],
    }[augment]
    assert kinds[2 : 2 + len(extra)] == extra
    # The squashed geometry keeps its own: a resize to the square, the policy's crop and flip.
    squash = [type(t) for t in train_transform(DataPolicy(96, augment)).transforms]
    assert squash[0] is v2.Resize and v2.RandomResizedCrop not in squash


def test_a_checkpoint_from_before_the_geometry_exports_squashed(
    small_run: Path, tmp_path: Path
) -> None:
    from resnet18_dist.checkpoint_file import load_checkpoint
    from resnet18_dist.export.artifact import model_from_checkpoint

    state = load_checkpoint(small_run)
    assert state["resolved"]["preprocess"] == "squash"
    for key in ("preprocess", "preprocess_reason", "eval_resize"):
        del state["resolved"][key]
    old = tmp_path / "old.pt"
    torch.save({k: v for k, v in state.items() if k != "_path"}, old)
    _, _, meta = model_from_checkpoint(old)
    assert (meta.preprocess, meta.eval_resize, meta.image_size) == ("squash", 8, 8)


def test_export_metadata_round_trips_the_geometry(tmp_path: Path) -> None:
    meta = ExportMeta.describe(
        classes=["a", "b"],
        image_size=224,
        preprocess="photo",
        eval_resize=256,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        model_spec=ModelSpec(num_classes=2, width=0.25).to_dict(),
        source_checkpoint="runs/r",
    )
    assert (meta.preprocess, meta.eval_resize) == ("photo", 256)
    assert (
        "shorter side resized to 256" in meta.input_layout and "centre 224x224" in meta.input_layout
    )
    props = meta.to_props()
    assert props["preprocess"] == "photo" and props["eval_resize"] == "256"
    assert ExportMeta.from_props(props) == meta
    # The Triton repository's config says it to Triton's clients (the export's --triton).
    from resnet18_dist.export.triton import render_config

    from .test_export import triton_model_config

    config, _ = triton_model_config(render_config(meta, "photos", 8, 100))
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert (params["preprocess"], params["eval_resize"]) == ("photo", "256")
    # model.pt keeps it too (the export's first artifact, and every run's best model).
    model = build_model(ModelSpec(num_classes=2, width=0.25))
    save_model_pt(model, meta, tmp_path / "model.pt")
    assert load_model_pt(tmp_path / "model.pt")[1] == meta
    # An export from before the geometry was recorded reads as squashed.
    old = {k: v for k, v in props.items() if k not in ("preprocess", "eval_resize")}
    assert ExportMeta.from_props(old).preprocess == "squash"


def _eval_and_train(
    manifest: Manifest, backend: str, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = DataConfig(
        data_dir=str(manifest.root),
        image_size=size,
        batch_size=4,
        eval_batch_size=64,
        data_backend=backend,
    )
    policy = resolve_policy(cfg, manifest)
    assert policy.preprocess == "photo"
    settings = loader_settings(
        cfg,
        rank=0,
        world_size=1,
        seed=3,
        device=torch.device("cpu"),
        channels_last=False,
        cpus_per_worker=1,
    )
    loaders = build_loaders(cfg, manifest, policy, settings)
    try:
        evaluated = torch.cat([x for x, _ in loaders.val])
        trained = torch.cat([x for x, _ in loaders.train])
    finally:
        loaders.close()
    return evaluated, trained


@pytest.mark.dali
@pytest.mark.parametrize("size", [64, 57])
def test_dali_and_torchvision_evaluate_photos_alike(prepared_photos: Manifest, size: int) -> None:
    """DALI's CPU pipeline (the GPU's graph on the CPU) and torchvision, on the same photos.

    Tolerance: mean |diff| <= 0.01 and max <= 0.1 after normalisation (measured: 0.002 and
    0.018, as close as the squashed geometry's 0.0023 and 0.07). DALI's own resize_shorter +
    centre crop, half a pixel off torchvision's, measured 0.075 mean (and fails here)."""
    tv_eval, tv_train = _eval_and_train(prepared_photos, "torchvision", size)
    dali_eval, dali_train = _eval_and_train(prepared_photos, "dali", size)
    assert tv_eval.shape == dali_eval.shape == (prepared_photos.counts["val"], 3, size, size)
    diff = (tv_eval - dali_eval).abs()
    assert diff.mean() <= 0.01 and diff.max() <= 0.1, (diff.mean(), diff.max())
    # Training crops at random (and flips): no training tensor of either backend is any
    # training image as evaluation would see it.
    n = prepared_photos.counts["train"]
    assert tv_train.shape == dali_train.shape == (n, 3, size, size)
    plain = evaluation_view(prepared_photos, "train", size)
    for train in (tv_train, dali_train):
        nearest = torch.cdist(train.flatten(1), plain.flatten(1)).min(dim=1).values
        assert (nearest / (size * size * 3) ** 0.5 > 0.05).all(), nearest


def evaluation_view(manifest: Manifest, split: str, size: int) -> torch.Tensor:
    """A split through the photo evaluation geometry, in stored order."""
    from resnet18_dist.data.torch_loader import ShardDataset

    policy = DataPolicy(size, "none", preprocess="photo")
    ds = ShardDataset(manifest, split, eval_transform(policy), size)
    return torch.stack([ds[i][0] for i in range(len(ds))])


# ----------------------------------------------------------------------- end to end, as typed
def _sh(cwd: Path, command: str, timeout: float = 600) -> str:
    proc = subprocess.run(
        ["bash", "-c", command],
        cwd=cwd,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{command} exited {proc.returncode}:\n{out[-4000:]}"
    return out


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.dali
def test_fine_tune_torchvision_weights_on_photos_then_export_and_serve(
    tmp_path: Path,
) -> None:
    """Photos a user brings (non-square JPEGs), prepared, fine-tuned from a torchvision
    ResNet18 weights file (torchvision's format; its ImageNet download needs the internet) with
    DALI through the accelerate launcher; the run (trained on DALI's crops, served through
    PIL's geometry) exported and served, and
    the served answer for a non-square photo compared with predict's and with the ONNX model
    fed the evaluation tensor."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / "launch").symlink_to(REPO / "launch")
    make_photo_folder(cwd / "photos", per_class=8)
    torch.manual_seed(0)
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), cwd / "resnet18.pth")

    _sh(cwd, "python launch/prepare_data.py --source photos --out data/photos")
    # A small lr keeps the answers unsaturated (ImageNet-sized random logits otherwise).
    common = (
        "--data-dir data/photos --pretrained resnet18.pth --image-size 72 --batch-size 4 --lr 0.001"
    )
    # One epoch with DALI through the accelerate launcher (no Ray start). The torchvision
    # loader's photo crop is test_photo_training_is_one_random_resized_crop_and_one_flip_then_
    # the_policy above; that a relative --pretrained reaches Ray workers as an absolute path,
    # tests/test_paths.py (test_every_path_option_is_declared_and_made_absolute; its Ray run
    # passes one, but resumes, so it does not load it).
    log = _sh(
        cwd,
        f"python launch/train_accelerate.py {common} --epochs 1 --data-backend dali "
        "--output-dir runs --name dali --wandb-mode disabled",
    )
    assert "preprocess photo (auto: the images are not all square)" in log, log[-3000:]
    assert "stem imagenet" in log  # 72 px > 64: torchvision's 7x7 stem, its weights loaded
    assert f"pretrained weights from {cwd / 'resnet18.pth'}; fresh: fc.bias, fc.weight" in log
    info = json.loads((cwd / "runs" / "dali" / "run_info.json").read_text())["resolved"]
    assert (info["preprocess"], info["eval_resize"], info["data_backend"]) == (
        "photo",
        82,
        "dali",
    ), log[-3000:]

    _sh(
        cwd,
        "python launch/export.py --checkpoint runs/dali --out exports/dali "
        "--latency-iters 2 --throughput-seconds 0.1 --max-int8-drop 100",
    )
    meta = json.loads((cwd / "exports" / "dali" / "meta.json").read_text())
    assert (meta["preprocess"], meta["eval_resize"], meta["image_size"]) == ("photo", 82, 72)
    clf = OnnxClassifier.load(cwd / "exports" / "dali")  # the ONNX model's own metadata_props
    assert (clf.meta.preprocess, clf.meta.eval_resize) == ("photo", 82)

    photo = "photos/class1/004.jpg"  # relative, as a user types it
    with Image.open(cwd / photo) as img:
        assert img.size[0] != img.size[1]
        expected = clf.probabilities([img])[0]
        squashed = np.asarray(img.convert("RGB").resize((72, 72), Image.Resampling.BILINEAR))
    x = (squashed.transpose(2, 0, 1)[None] / 255.0 - clf.mean) / clf.std
    wrong = clf.session.run(None, {"input": x.astype(np.float32)})[0][0]
    with Image.open(cwd / photo) as img:
        right = clf.session.run(None, {"input": clf.preprocess([img])})[0][0]
    # The photo's geometry matters to this model: squashing the photo gives other logits.
    assert np.abs(wrong - right).max() > 1e-3, (wrong, right)
    assert expected.max() < 0.999, expected  # not saturated: the comparisons below can fail

    printed = _sh(cwd, f"python launch/predict.py --model exports/dali --top-k 3 {photo}")
    from .test_serve import start_server, stop_server

    server = start_server(cwd / "exports" / "dali", tmp_path)
    try:
        info = requests.get(server.url + "/v1/model", timeout=30).json()
        assert (info["preprocess"], info["eval_resize"], info["input_size"]) == ("photo", 82, 72)
        r = requests.post(
            server.url + "/v1/classify?top_k=3",
            data=(cwd / photo).read_bytes(),
            headers={"Content-Type": "image/jpeg"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        served = r.json()["predictions"]
    finally:
        assert stop_server(server) == 0
    top = np.argsort(-expected)[:3]
    assert [p["label"] for p in served] == [clf.meta.classes[j] for j in top]
    for p, j in zip(served, top, strict=True):
        assert abs(p["probability"] - float(expected[j])) <= 1e-5
    (line,) = [ln for ln in printed.splitlines() if ln.startswith(f"{cwd / photo}: ")]
    pairs = [item.split(" ") for item in line.rpartition(": ")[2].split(", ")]
    assert [label for label, _ in pairs] == [p["label"] for p in served]
    for (_, prob), p in zip(pairs, served, strict=True):
        assert abs(float(prob) - p["probability"]) <= 0.0005 + 1e-6
