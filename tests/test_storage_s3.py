"""Runs on object storage, against a real S3 API server on loopback (moto's standalone server):
a 2-worker run writes its checkpoints to the bucket and survives a killed worker (Ray restarts
the group from the bucket) and a killed driver (the same command resumes from the bucket), the
export reads the run from there, and `--fresh --resume` from the run's own checkpoint reads the
copy it moved aside."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from .conftest import REPO, launch, train_args
from .ray_cluster import SNAPSHOT, kill_with_its_ray, registered_in
from .s3_server import BUCKET
from .s3_server import creds as _creds
from .s3_server import get_object as _get
from .s3_server import objects as _objects
from .test_fault_tolerance import _cmdline, _signal


@pytest.mark.slow
@pytest.mark.ray
def test_a_run_on_s3_survives_a_killed_worker_and_driver_and_exports_from_the_bucket(
    s3: dict[str, str], digits_dataset: Path, tmp_path: Path
) -> None:
    """One run on a bucket, two failures. A worker is killed (SIGKILL, as an OOM killer
    would) once epoch 2 is registered: with --max-failures 1 Ray Train restarts the group from
    that checkpoint in the bucket. Then the process running launch/train.py dies with its
    private Ray (a lost laptop session, a killed job): the same command again reads the bucket
    and resumes from the newest complete checkpoint there, no flag needed. Every epoch is
    trained and logged once across the three worker groups; nothing is written to a local
    disk but the dataset's verified cache copy."""
    env = {**os.environ, **s3, "RESNET18_DIST_CACHE": str(tmp_path / "cache")}
    runs = f"s3://{BUCKET}/runs"
    data = f"s3://{BUCKET}/datasets/digits"  # the data comes from the bucket too
    _upload(s3, digits_dataset, "datasets/digits")
    cmd = [
        sys.executable,
        str(REPO / "launch/train.py"),
        # Storage, failures, resume and export, not learning: a ResNet18 at a quarter of the
        # width, eight short epochs, so that both kills land well before the last one.
        *("--data-dir", data, "--epochs", "8", "--width", "0.25"),
        *train_args(Path("unused"), "s3run", 2, "--cpus-per-worker", "1", "--max-failures", "1"),
        "--output-dir",
        runs,  # the last --output-dir wins
    ]
    prefix = "runs/s3run/"

    def registered() -> int:
        from botocore.exceptions import ClientError

        try:
            return registered_in(_get(s3, prefix + SNAPSHOT))
        except ClientError as err:  # not in the bucket yet; any other failure is the test's
            if err.response["Error"]["Code"] != "NoSuchKey":
                raise
            return 0

    first_log = tmp_path / "first.log"

    def wait_for(what: str, ready) -> None:
        deadline = time.monotonic() + 600
        while not ready():
            assert first.poll() is None, f"ended waiting for {what}:\n" + first_log.read_text()
            assert time.monotonic() < deadline, what
            time.sleep(0.3)

    with open(first_log, "w") as log:
        first = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        # Epoch 2 registered by Ray: a worker dies early in epoch 3.
        wait_for("epoch 2", lambda: registered() >= 2)
        workers = [
            p
            for p in psutil.Process(first.pid).children(recursive=True)
            if "RayTrainWorker" in " ".join(_cmdline(p))
        ]
        assert workers, "no Ray Train worker to kill"
        # The workers hold still (as in a long epoch) while one is killed, so that a fast
        # epoch cannot end the run first.
        _signal(workers, signal.SIGSTOP)
        workers[0].send_signal(signal.SIGKILL)
        _signal(workers, signal.SIGCONT)
        # Ray restarts the group from the newest registered checkpoint (epoch 2, or 3 if the
        # first group registered it before it was held); once the new group has checkpointed an
        # epoch of its own, the session is lost: the driver and its private Ray die together.
        restore = r"Ray Train restored checkpoint \S*/runs/s3run/checkpoint_epoch(\d+)"
        wait_for("the group's restart", lambda: re.search(restore, first_log.read_text()))
        restored = int(re.search(restore, first_log.read_text()).group(1))
        assert restored in (2, 3), restored
        wait_for("the restored group's checkpoint", lambda: registered() > restored)
        kill_with_its_ray(first)
    text = first_log.read_text()
    assert len(re.findall(r"epoch 1/8: train loss", text)) == 1, text[-3000:]  # resumed
    # The two ranks on this node made one verified copy of the dataset, byte for byte (the
    # restarted group reused it).
    copies = list((tmp_path / "cache" / "remote-datasets").iterdir())
    assert [c.name.startswith(".") for c in copies].count(False) == 1, copies
    (copy,) = [c for c in copies if not c.name.startswith(".")]
    for shard in sorted(digits_dataset.rglob("*.tar")):
        assert (copy / shard.relative_to(digits_dataset)).read_bytes() == shard.read_bytes()
    objects = _objects(s3, prefix)
    # Checkpoints and the run's files are in the bucket, nothing on a local disk.
    assert f"{prefix}config.yaml" in objects and f"{prefix}metrics.jsonl" in objects, objects
    assert f"{prefix}report.json" not in objects
    assert not Path("unused").exists()
    done = max(
        int(m.group(1))
        for k in objects
        if (m := re.match(rf"{prefix}checkpoint_epoch(\d+)/checkpoint.pt$", k))
    )
    assert 3 <= done < 8, done

    # The same command again: the plan reads the bucket and resumes from its checkpoint.
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert f"resuming unfinished run {runs}/s3run at epoch {done + 1} of 8" in out, out[-3000:]
    # Epochs before the checkpoint are not trained again; the rest are, once each.
    trained = [int(e) for e in re.findall(r"epoch (\d+)/8: train loss", out)]
    assert trained == list(range(done + 1, 9)), trained
    objects = _objects(s3, prefix)
    report = json.loads(_get(s3, f"{prefix}report.json"))
    assert report["epochs_run"] == 8 and report["test_samples"] == 360
    assert report["test_top1"] > 0.5
    assert report["run_dir"] == f"{runs}/s3run"
    assert report["resolved"]["data_dir"] == data, report["resolved"]  # not a node's cache path
    assert report["best_model_path"] == f"{runs}/s3run/model.pt" and f"{prefix}model.pt" in objects
    metrics = [json.loads(x)["epoch"] for x in _get(s3, f"{prefix}metrics.jsonl").splitlines()]
    assert metrics == list(range(8)), metrics  # every epoch once, across both drivers
    kept = sorted(k for k in objects if k.endswith("/checkpoint.pt"))
    assert kept == [
        f"{prefix}checkpoint_epoch0007/checkpoint.pt",
        f"{prefix}checkpoint_epoch0008/checkpoint.pt",
    ]

    # A finished run on S3 is refused like a local one.
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already finished (8 epochs" in again.stderr, again.stderr

    # The export reads the run (its newest checkpoint) straight from the bucket.
    export = launch(
        "export",
        *("--checkpoint", f"{runs}/s3run", "--out", str(tmp_path / "export")),
        *("--latency-iters", "5", "--throughput-seconds", "0.2", "--wandb-mode", "disabled"),
        timeout=600,
        env=env,
    )
    assert export.returncode == 0, export.stderr[-3000:]
    exported = json.loads((tmp_path / "export" / "report.json").read_text())
    assert exported["checks"]["fp32_ok"], exported["checks"]
    assert exported["checkpoint"].startswith(f"{runs}/s3run/checkpoint_epoch0008"), exported
    # Each row is measured in a fresh `python -m` process of its own, not a spawned child that
    # re-imports launch/export.py (and torch) first: ONNX Runtime's rows never hold torch, so
    # their peak memory is a fraction of the PyTorch rows' (about 65 MB against 700 MB).
    peak = {r["kind"]: r["peak_rss_mb"] for r in exported["rows"]}
    assert max(peak["onnx_fp32"], peak["onnx_int8"]) < peak["torch_fp32"] / 2, peak

    # `--fresh --resume` from the run's own checkpoint (issue 21's review, on a bucket): the
    # finished run is copied aside and deleted (an object store has no rename), so the
    # checkpoint is read from the copy; the new run's metrics.jsonl holds its own epoch only,
    # none of the old run's lines that this node's local mirror of s3run still holds.
    fresh = subprocess.run(
        [*cmd, "--epochs", "9", "--fresh", "--resume", f"{runs}/s3run/checkpoint_epoch0008"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = fresh.stdout + fresh.stderr
    assert fresh.returncode == 0, out[-4000:]
    (moved,) = {k.split("/")[1] for k in _objects(s3, "runs/") if k.startswith("runs/s3run.prev-")}
    assert f"--fresh: the previous run is kept in {runs}/{moved}" in fresh.stdout
    assert f"starting from checkpoint {runs}/{moved}/checkpoint_epoch0008" in fresh.stdout
    assert [int(e) for e in re.findall(r"epoch (\d+)/9: train loss", out)] == [9]
    assert json.loads(_get(s3, f"{prefix}report.json"))["epochs_run"] == 9
    metrics = [json.loads(x)["epoch"] for x in _get(s3, f"{prefix}metrics.jsonl").splitlines()]
    assert metrics == [8], metrics  # the new run's own epoch; none of the old run's lines
    old = [json.loads(x)["epoch"] for x in _get(s3, f"runs/{moved}/metrics.jsonl").splitlines()]
    assert old == list(range(8))


def _upload(env: dict[str, str], local: Path, prefix: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], **_creds(env))
    for path in sorted(local.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(local)}")


def test_a_dataset_in_a_bucket_is_copied_once_and_every_shard_checked(
    s3: dict[str, str], digits_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    from resnet18_dist import storage
    from resnet18_dist.data import integrity
    from resnet18_dist.data.manifest import DatasetError, Manifest
    from resnet18_dist.data.remote import fetch_dataset

    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    fetched: list[str] = []
    real_stream = storage.stream_to_file

    def counting(uri: str, local: Path) -> str:
        fetched.append(uri)
        return real_stream(uri, local)

    monkeypatch.setattr(storage, "stream_to_file", counting)
    source = Manifest.load(digits_dataset)
    shards = [s.path for split in ("train", "val", "test") for s in source.shards[split]]
    cache = tmp_path / "cache"
    client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"], **_creds(s3))

    # A shard that changed in the bucket after preparation: refused, naming it; no copy is made.
    _upload(s3, digits_dataset, "data/d")
    bad = shards[-1]
    good_bytes = (digits_dataset / bad).read_bytes()
    broken = bytearray(good_bytes)
    broken[len(broken) // 2] ^= 0xFF
    client.put_object(Bucket=BUCKET, Key=f"data/d/{bad}", Body=bytes(broken))
    uri = f"s3://{BUCKET}/data/d"
    with pytest.raises(DatasetError, match=rf"{uri}/{bad}: sha256 .* differs"):
        fetch_dataset(uri, cache=cache)
    made = (cache / "remote-datasets").iterdir()
    assert [p for p in made if p.is_dir() and not p.name.startswith(".")] == []
    assert not list((cache / "remote-datasets").rglob(Path(bad).name)), "a bad shard was kept"

    # Mended in the bucket: the next call fetches only the shard that was not verified yet.
    client.put_object(Bucket=BUCKET, Key=f"data/d/{bad}", Body=good_bytes)
    fetched.clear()
    local = fetch_dataset(uri, cache=cache)
    assert [u for u in fetched if u.endswith(".tar")] == [f"{uri}/{bad}"], fetched
    copy = Manifest.load(local)
    assert copy.counts == source.counts and copy.classes == source.classes
    for rel in shards:
        assert (local / rel).read_bytes() == (digits_dataset / rel).read_bytes()

    # Hashed on the way in: the DALI guard's check accepts the copy without reading it again.
    hashed: list[Path] = []
    monkeypatch.setattr(integrity, "sha256_file", lambda path: hashed.append(path) or "")
    assert all(integrity.verify_split(copy, split, "on") for split in ("train", "val", "test"))
    assert hashed == []

    # Cached: a second call (another rank, a later run) downloads nothing.
    fetched.clear()
    assert fetch_dataset(uri, cache=cache) == local and fetched == []

    # Not enough room in the cache for the shards: refused before a byte is fetched, naming it.
    from resnet18_dist.data import remote

    other = tmp_path / "small-cache"
    full = shutil.disk_usage(tmp_path)._replace(free=1000)
    with monkeypatch.context() as m:
        m.setattr(remote.shutil, "disk_usage", lambda path: full)  # a disk we cannot fill here
        fetched.clear()
        with pytest.raises(DatasetError, match=rf"into {other}/remote-datasets: its shards need"):
            fetch_dataset(uri, cache=other)
        assert fetched == []

    # A run pins the manifest its driver checked: another version is refused.
    with pytest.raises(DatasetError, match="changed since this run started"):
        fetch_dataset(uri, expect_sha256="0" * 64, cache=cache)
    with pytest.raises(DatasetError, match=rf"s3://{BUCKET}/data/none is not a prepared dataset"):
        fetch_dataset(f"s3://{BUCKET}/data/none", cache=cache)
    # A manifest whose paths leave the dataset is refused before anything is written.
    raw = json.loads((digits_dataset / "manifest.json").read_text())
    raw["shards"]["train"][0]["path"] = "../../escaped.tar"
    client.put_object(Bucket=BUCKET, Key="data/evil/manifest.json", Body=json.dumps(raw))
    with pytest.raises(DatasetError, match="leaves the dataset"):
        fetch_dataset(f"s3://{BUCKET}/data/evil", cache=cache)
    assert not list(tmp_path.rglob("escaped.tar"))


@pytest.mark.slow
def test_a_bucket_dataset_of_many_shards_is_fetched_several_at_a_time(
    s3: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """180 shards of ten digits each: at most --fetch-threads of them in flight at once, more
    than one at a time, and the copy the same as the one fetched one at a time. A bad shard
    among many stops the copy, names the shard and leaves no partial file."""
    import threading

    import boto3

    from resnet18_dist import storage
    from resnet18_dist.data.digits import prepare_digits
    from resnet18_dist.data.manifest import DatasetError, Manifest
    from resnet18_dist.data.remote import fetch_dataset

    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    local = tmp_path / "digits-small-shards"
    prepare_digits(local, shard_size=10)
    source = Manifest.load(local)
    shards = [s.path for split in ("train", "val", "test") for s in source.shards[split]]
    assert len(shards) >= 100
    _upload(s3, local, "data/many")
    uri = f"s3://{BUCKET}/data/many"

    lock = threading.Lock()
    active, peak = [0], [0]
    real_stream = storage.stream_to_file

    def watched(src: str, part: Path) -> str:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.01)  # a slower link: lets transfers overlap if they can
            return real_stream(src, part)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(storage, "stream_to_file", watched)
    parallel = fetch_dataset(uri, cache=tmp_path / "c4", threads=4)
    assert 1 < peak[0] <= 4, peak
    peak[0] = 0
    serial = fetch_dataset(uri, cache=tmp_path / "c1", threads=1)
    assert peak[0] == 1
    for rel in [*shards, *(s.idx for split in source.shards.values() for s in split)]:
        assert (
            (parallel / rel).read_bytes()
            == (serial / rel).read_bytes()
            == (local / rel).read_bytes()
        ), rel
    assert Manifest.load(parallel).counts == source.counts

    # One changed shard among many: refused naming it, no copy, no .part file left behind.
    client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"], **_creds(s3))
    bad = shards[len(shards) // 2]
    client.put_object(Bucket=BUCKET, Key=f"data/many/{bad}", Body=b"not the shard")
    with pytest.raises(DatasetError, match=rf"{uri}/{bad}: sha256 .* differs"):
        fetch_dataset(uri, cache=tmp_path / "c-bad", threads=8)
    made = tmp_path / "c-bad" / "remote-datasets"
    assert [p for p in made.iterdir() if p.is_dir() and not p.name.startswith(".")] == []
    assert not [p for p in made.rglob("*") if ".part" in p.name and p.is_file()]
    # Mended in the bucket, the next fetch finishes the copy; partial files a killed copy left in
    # its staging directory (one a thread) are removed, not carried into the copy.
    stage = next(made.glob(".*.part"))
    (stage / "train").mkdir(exist_ok=True)
    (stage / "train" / "killed.tar.part").write_bytes(b"half a shard")
    (stage / "killed.idx.part-1234").write_bytes(b"half an index")
    client.put_object(Bucket=BUCKET, Key=f"data/many/{bad}", Body=(local / bad).read_bytes())
    copy = fetch_dataset(uri, cache=tmp_path / "c-bad", threads=8)
    assert Manifest.load(copy).counts == source.counts
    assert not [p for p in copy.rglob("*") if ".part" in p.name]


FETCH = """
import sys
from pathlib import Path
from resnet18_dist import storage
from resnet18_dist.data.remote import fetch_dataset
real = storage.stream_to_file
def counting(uri, local):
    with open(sys.argv[3], "a") as log:
        log.write(uri + "\\n")
    return real(uri, local)
storage.stream_to_file = counting
print(fetch_dataset(sys.argv[1], cache=Path(sys.argv[2])))
"""


def test_ranks_on_a_node_share_one_copy_and_a_new_version_replaces_an_unused_one(
    s3: dict[str, str], digits_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes at once (two ranks of a node) make one copy; a re-uploaded dataset is a new
    copy, and the old one is deleted only when no process reads it any more."""
    import boto3

    from resnet18_dist.data import remote
    from resnet18_dist.data.remote import fetch_dataset

    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    uri, cache, log = f"s3://{BUCKET}/data/c", tmp_path / "cache", tmp_path / "gets.log"
    _upload(s3, digits_dataset, "data/c")

    def fetch_in(n: int) -> list[Path]:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", FETCH, uri, str(cache), str(log)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, **s3},
            )
            for _ in range(n)
        ]
        outs = [p.communicate(timeout=300) for p in procs]
        assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
        return [Path(out.strip().splitlines()[-1]) for out, _ in outs]

    first, second = fetch_in(2)
    assert first == second
    tars = [u for u in log.read_text().split() if u.endswith(".tar")]
    n_shards = len(list(digits_dataset.rglob("*.tar")))
    assert len(tars) == len(set(tars)) == n_shards, tars  # each shard fetched once, not twice

    client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"], **_creds(s3))
    raw = json.loads((digits_dataset / "manifest.json").read_text())

    def reupload(version: int) -> None:  # the same shards, a manifest that differs
        client.put_object(
            Bucket=BUCKET, Key="data/c/manifest.json", Body=json.dumps({**raw, "v": version})
        )

    reupload(2)
    held = fetch_dataset(uri, cache=cache)  # this process reads version 2 from now on
    assert held != first and not first.exists()  # version 1 was no longer read by anyone
    reupload(3)
    (third,) = fetch_in(1)
    assert third not in (first, held) and (third / "manifest.json").is_file()
    assert (held / "manifest.json").is_file(), "a copy still in use was deleted"
    remote._IN_USE.pop(held).close()  # as when this process would exit
    assert fetch_dataset(uri, cache=cache) == third and not held.exists()  # the next fetch drops it


@pytest.mark.slow
def test_a_missing_bucket_is_a_clear_error_before_training(
    s3: dict[str, str], digits_dataset: Path
) -> None:
    out = launch(
        "train",
        *("--data-dir", str(digits_dataset), "--epochs", "1"),
        *train_args(Path("unused"), "nobucket", 1),
        *("--output-dir", "s3://no-such-bucket-r18d/runs"),
        env={**os.environ, **s3},
        timeout=300,
    )
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "--output-dir" in out.stderr and "no-such-bucket-r18d" in out.stderr, out.stderr

    # A --data-dir in the bucket that holds no prepared dataset: refused before Ray starts.
    nodata = f"s3://{BUCKET}/no-dataset-here"
    out = launch(
        "train",
        *("--data-dir", nodata, "--epochs", "1"),
        *train_args(Path("unused"), "nodata", 1),
        env={**os.environ, **s3},
        timeout=300,
    )
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "--data-dir" in out.stderr and f"{nodata} is not a prepared dataset" in out.stderr

    # A manifest in the bucket that is not one of ours: refused by the driver, nothing fetched.
    import boto3

    client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"], **_creds(s3))
    client.put_object(Bucket=BUCKET, Key="odd/manifest.json", Body=b'{"format": "other"}')
    out = launch(
        "train",
        *("--data-dir", f"s3://{BUCKET}/odd", "--epochs", "1"),
        *train_args(Path("unused"), "odd", 1),
        env={**os.environ, **s3},
        timeout=300,
    )
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"s3://{BUCKET}/odd/manifest.json: unknown format 'other'" in out.stderr, out.stderr


def test_the_run_rule_on_a_bucket_with_pyarrow_uri_options(
    s3: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The endpoint given in the URI itself (pyarrow's query options) instead of the
    environment: the unfinished run is found, its checkpoint fetched; --fresh copies it aside."""
    import boto3

    from resnet18_dist.checkpoint_file import fetch_remote_checkpoint
    from resnet18_dist.config import RunDirConfig
    from resnet18_dist.engine.rundir import plan_run

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, s3[key])
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    endpoint = s3["AWS_ENDPOINT_URL"].removeprefix("http://")
    client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"], **_creds(s3))
    payload = b"not really a checkpoint, but bytes to fetch"
    for epoch in (1, 2):
        client.put_object(
            Bucket=BUCKET, Key=f"uri/q/checkpoint_epoch000{epoch}/checkpoint.pt", Body=payload
        )
    runs = f"s3://{BUCKET}/uri?endpoint_override={endpoint}&scheme=http"

    plan = plan_run(RunDirConfig(output_dir=runs, name="q"), epochs=4)
    assert plan.action == "resume" and plan.start_epoch == 2
    assert "/uri/q/checkpoint_epoch0002/checkpoint.pt?endpoint_override=" in str(plan.resume_from)
    assert fetch_remote_checkpoint(str(plan.resume_from)).read_bytes() == payload

    fresh = plan_run(RunDirConfig(output_dir=runs, name="q", fresh=True), epochs=4)
    assert fresh.action == "new" and fresh.moved_aside is not None
    keys = _objects(s3, "uri/")
    assert not [k for k in keys if k.startswith("uri/q/")], keys
    moved = [k for k in keys if k.startswith("uri/q.prev-") and k.endswith("/checkpoint.pt")]
    assert len(moved) == 2, keys

    # Two --fresh in the same second keep both old runs (a suffix, as on a local disk: the
    # bucket's copy-aside once had no suffix and would have mixed them), and `compare` reads a
    # run on the bucket as it reads a local one.
    from resnet18_dist.compare import load_run

    # (the module's clock only: botocore signs requests with time.strftime)
    monkeypatch.setattr(
        "resnet18_dist.run_location.time", SimpleNamespace(strftime=lambda fmt: "20260101-000000")
    )
    aside = []
    for lr in (0.1, 0.2):
        client.put_object(Bucket=BUCKET, Key="uri/r/metrics.jsonl", Body=b'{"epoch": 0}\n')
        client.put_object(Bucket=BUCKET, Key="uri/r/config.yaml", Body=f"optim: {{lr: {lr}}}\n")
        plan = plan_run(RunDirConfig(output_dir=runs, name="r", fresh=True), epochs=4)
        aside.append(str(plan.moved_aside))
    assert [a.split("?")[0].rsplit("/", 1)[1] for a in aside] == [
        "r.prev-20260101-000000",
        "r.prev-20260101-000000-2",
    ]
    records = [load_run(a) for a in aside]
    assert [r.config["optim.lr"] for r in records] == [0.1, 0.2]
    assert records[0].name == "r.prev-20260101-000000" and records[0].epochs == [{"epoch": 0}]
