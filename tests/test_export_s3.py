"""Exports on object storage, against a real S3 API server on loopback (moto): `export --out
s3://...` publishes the export with its report last, `predict` and `serve --model s3://...` fetch
it once into the cache and check every file against the report's sha256, and an export killed
midway, changed or cut short is refused naming the file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from resnet18_dist.export.bucket import file_hashes

from .conftest import user_env
from .s3_server import BUCKET, creds, objects
from .test_serve import assert_same, digit_files, predict_cli, start_server, stop_server

EXPORT = f"s3://{BUCKET}/exports/digits"
PREFIX = "exports/digits/"
BRIEF = ("--latency-iters", "2", "--throughput-seconds", "0.1", "--max-int8-drop", "100")


def _user(cwd: Path, s3: dict[str, str], cache: Path, *words: str, timeout: float = 600):
    """A command typed in the user's working directory (relative paths, the venv's python)."""
    env = {**user_env(), **s3, "RESNET18_DIST_CACHE": str(cache)}
    return subprocess.run(
        ["python", *words], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
@pytest.mark.ray
def test_an_export_on_s3_is_published_whole_and_served_from_the_bucket(
    s3: dict[str, str],
    digits_run: tuple[Path, str],
    digits_export: tuple[Path, dict],
    digits_folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = digits_run[0]
    cwd = run.parents[1]  # the main job's working directory: runs/<name> is relative to it
    cache = tmp_path / "cache"
    export_cmd = [
        "launch/export.py",
        *("--checkpoint", f"runs/{run.name}", "--out", EXPORT, *BRIEF),
    ]

    # 1. Killed while it uploads: the objects written so far are not an export. The export
    # command's last step, its upload (export/bucket.upload_export, what `--out s3://` runs
    # once the files are written), runs in a process of its own, killed once the first object
    # is in the bucket: the same cut-off publish as a killed `launch/export.py`, without
    # computing an export to be thrown away first (the command itself runs whole in step 2).
    env = {**user_env(), **s3, "RESNET18_DIST_CACHE": str(cache)}
    log = tmp_path / "killed.log"
    publish = (
        "import sys; from pathlib import Path; from resnet18_dist.export.bucket import "
        "upload_export; upload_export(Path(sys.argv[1]), sys.argv[2])"
    )
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", publish, str(digits_export[0]), EXPORT],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 300
    while not objects(s3, PREFIX):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = objects(s3, PREFIX)
    assert partial and f"{PREFIX}report.json" not in partial, partial
    image = str(digit_files(digits_folder, per_class=1)[0])
    refused = _user(cwd, s3, cache, "launch/predict.py", "--model", EXPORT, image)
    assert refused.returncode == 2, refused.stderr
    assert f"--model: {EXPORT}/report.json" in refused.stderr, refused.stderr
    assert "cut off or still being written" in refused.stderr, refused.stderr

    # 2. The same command again publishes the whole export over the partial one.
    done = _user(cwd, s3, cache, *export_cmd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"artifacts in {EXPORT}" in done.stdout, done.stdout[-2000:]
    published = objects(s3, PREFIX)
    report = json.loads(_read(s3, f"{PREFIX}report.json"))
    for name in ("model.onnx", "model.int8.onnx", "model.pt", "meta.json", "report.md"):
        assert f"{PREFIX}{name}" in published and name in report["files"], name
    # The local export of the same run (tests/conftest.py) holds the same model files.
    local = file_hashes(digits_export[0])
    assert report["files"]["model.onnx"] == local["model.onnx"]

    # 3. predict and serve read it from the bucket; their answers are predict's on the local
    # export, for 20 test images (2 per class).
    files = digit_files(digits_folder, per_class=2)
    assert len(files) == 20
    expected = predict_cli(digits_export[0], files)
    got = _user(cwd, s3, cache, "launch/predict.py", "--model", EXPORT, "--top-k", "3",
                *map(str, files))  # fmt: skip
    assert got.returncode == 0, got.stderr
    cached = [p for p in (cache / "exports").iterdir() if not p.name.startswith(".")]
    assert len(cached) == 1 and (cached[0] / "report.json").is_file(), cached
    onnx = cached[0] / "model.onnx"
    fetched = onnx.stat()
    assert sorted(p.name for p in cached[0].iterdir()) == ["model.onnx", "report.json"]
    assert len(got.stdout.splitlines()) == 20, got.stdout
    for line in got.stdout.splitlines():
        path, _, rest = line.rpartition(": ")
        assert [tuple(i.split(" ")) for i in rest.split(", ")] == expected[path], line
    for name, value in {**s3, "RESNET18_DIST_CACHE": str(cache)}.items():
        monkeypatch.setenv(name, value)
    server = start_server(EXPORT, tmp_path)  # type: ignore[arg-type]
    try:
        for f in files:
            r = requests.post(
                server.url + "/v1/classify?top_k=3",
                data=f.read_bytes(),
                headers={"Content-Type": "image/jpeg"},
                timeout=30,
            )
            assert r.status_code == 200, r.text
            assert_same(r.json()["predictions"], expected[str(f)])
        info = requests.get(server.url + "/v1/model", timeout=30).json()
        assert info["model"] == "digits", info
    finally:
        assert stop_server(server) == 0, server.output()[-3000:]
    # The server's replica took the same copy: not downloaded again (same inode and mtime).
    again = onnx.stat()
    assert (again.st_ino, again.st_mtime_ns) == (fetched.st_ino, fetched.st_mtime_ns)


def _read(s3: dict[str, str], key: str) -> bytes:
    import boto3

    client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"], **creds(s3))
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


@pytest.mark.slow
def test_a_changed_or_partial_export_in_the_bucket_is_refused_naming_the_file(
    s3: dict[str, str],
    digits_export: tuple[Path, dict],
    digits_folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import boto3

    from resnet18_dist.export.bucket import (
        BucketExportError,
        check_remote_out,
        fetch_export,
        upload_export,
    )
    from resnet18_dist.options import ConfigError

    for name, value in s3.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RESNET18_DIST_CACHE", str(tmp_path / "cache"))
    client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"], **creds(s3))

    # --out refusals, before any work: the bucket's root, a missing bucket, a prefix holding
    # something else (publishing deletes what is there).
    client.put_object(Bucket=BUCKET, Key="other/data.csv", Body=b"a,b\n")
    for uri, why in (
        (f"s3://{BUCKET}", "give a prefix inside the bucket"),
        ("s3://no-such-bucket/x", "does not exist"),
        (f"s3://{BUCKET}/other", r"holds 1 object\(s\) and is not an export"),
    ):
        with pytest.raises(ConfigError, match=why):
            check_remote_out(uri)
    assert objects(s3, "other/") == {"other/data.csv": 4}  # untouched

    # Republishing over a whole export: stale objects go, the new report pins the new files.
    uri = f"s3://{BUCKET}/refused/again"
    upload_export(digits_export[0], uri)
    client.put_object(Bucket=BUCKET, Key="refused/again/stale.bin", Body=b"old")
    check_remote_out(uri)  # an earlier export may be replaced
    upload_export(digits_export[0], uri)
    assert "refused/again/stale.bin" not in objects(s3, "refused/again/")
    assert (fetch_export(uri) / "model.onnx").read_bytes() == (
        digits_export[0] / "model.onnx"
    ).read_bytes()
    # A server pins the export it checked: a replica started after a republish refuses it.
    with pytest.raises(BucketExportError, match="changed since it was checked"):
        fetch_export(uri, pin="0" * 64)
    image = str(digit_files(digits_folder, per_class=1)[0])
    for case in ("changed", "missing"):
        uri = f"s3://{BUCKET}/refused/{case}"
        upload_export(digits_export[0], uri)
        key = f"refused/{case}/model.onnx"
        if case == "changed":
            client.put_object(Bucket=BUCKET, Key=key, Body=b"not the exported model")
        else:
            client.delete_object(Bucket=BUCKET, Key=key)
        env = {**os.environ, "RESNET18_DIST_CACHE": str(tmp_path / case)}
        proc = subprocess.run(
            [sys.executable, "-m", "resnet18_dist", "predict", "--model", uri, image],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr
        assert f"--model: s3://{BUCKET}/{key}: " in proc.stderr, proc.stderr
        why = "differs from" if case == "changed" else "cannot be read"
        assert why in proc.stderr, proc.stderr
        # Nothing unchecked is left under a name a later call would take.
        assert not list((tmp_path / case / "exports").rglob("model.onnx"))
