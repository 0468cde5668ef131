"""Benchmark copying a prepared dataset from a bucket into a node's cache: shards fetched one at
a time against several at once, same dataset, same S3 server, alternating in one run.

    python benchmarks/benchmark_fetch.py                        # digits, 10 images a shard
    python benchmarks/benchmark_fetch.py --source ../shared/data/cifar10-jpeg/train.tar.gz \
        --per-class 1200 --shard-size 100                       # 120 shards of real JPEGs

Without --endpoint it starts moto's S3 server on loopback (``pip install -e '.[dev]'``), the one
the tests use. With --endpoint URL --bucket NAME (an existing bucket you may write to, and the
standard AWS_* credentials) it measures a real store: it uploads the dataset under --prefix and
deletes what it uploaded when it ends.
Every fetch goes into a new, empty cache, and every shard's sha256 is checked on the way in, as
a training worker does. Prints each fetch's time and the median ratio serial / parallel.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MOTO_BUCKET = "r18d-bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(log: Path) -> tuple[subprocess.Popen, str]:
    server = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    if server is None:
        sys.exit("moto_server is not installed: pip install -e '.[dev]', or give --endpoint")
    port = _free_port()
    out = open(log, "w")  # noqa: SIM115 held by the server process
    proc = subprocess.Popen(
        [server, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT
    )
    return proc, f"http://127.0.0.1:{port}"


def subset(source: Path, out: Path, per_class: int) -> Path:
    """The first ``per_class`` images of each class folder (all with 0), from a directory or a
    .tar.gz in ImageFolder layout (``[top/]class/image``), copied into ``out``."""
    import tarfile
    from collections import Counter

    taken: Counter[str] = Counter()

    def wanted(parts: tuple[str, ...]) -> bool:
        if per_class and taken[parts[-2]] >= per_class:
            return False
        taken[parts[-2]] += 1
        return True

    if source.is_dir():
        for p in sorted(source.rglob("*.*")):
            if p.is_file() and wanted(p.parts):
                (out / p.parent.name).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, out / p.parent.name / p.name)
    else:
        with tarfile.open(source) as tar:
            for member in tar:
                parts = tuple(Path(member.name).parts)
                if member.isfile() and len(parts) >= 2 and wanted(parts):
                    (out / parts[-2]).mkdir(parents=True, exist_ok=True)
                    data = tar.extractfile(member)
                    assert data is not None
                    (out / parts[-2] / parts[-1]).write_bytes(data.read())
    return out


def upload(client, local: Path, bucket: str, prefix: str) -> list[str]:
    keys = []
    for p in sorted(p for p in local.rglob("*") if p.is_file()):
        keys.append(f"{prefix}/{p.relative_to(local).as_posix()}")
        client.upload_file(str(p), bucket, keys[-1])
    return keys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--source",
        help="an ImageFolder directory or .tar.gz to prepare (default: the built-in digits)",
    )
    ap.add_argument("--per-class", type=int, default=0, help="the first N images of each class")
    ap.add_argument("--shard-size", type=int, default=10, help="images per shard")
    ap.add_argument("--threads", type=int, default=8, help="shards at once, parallel side")
    ap.add_argument("--repeats", type=int, default=3, help="fetches of each kind, alternating")
    ap.add_argument("--endpoint", help="an S3 endpoint to measure instead of a local moto")
    ap.add_argument("--bucket", help="with --endpoint: an existing bucket to upload into")
    ap.add_argument("--prefix", default="resnet18-dist-bench-fetch", help="where in the bucket")
    args = ap.parse_args()
    if args.endpoint and not args.bucket:
        ap.error("--endpoint needs --bucket (an existing bucket you may write to)")

    import boto3

    from resnet18_dist.data.manifest import Manifest
    from resnet18_dist.data.prepare import PrepareOptions, prepare_dataset
    from resnet18_dist.data.remote import fetch_dataset
    from resnet18_dist.machine import machine_description

    work = Path(tempfile.mkdtemp(prefix="bench-fetch-"))
    server = None
    client, bucket, uploaded = None, args.bucket or MOTO_BUCKET, []
    try:
        if args.endpoint:
            endpoint = args.endpoint
            os.environ["AWS_ENDPOINT_URL"] = endpoint
            client = boto3.client("s3", endpoint_url=endpoint)
        else:
            os.environ.update(
                AWS_ACCESS_KEY_ID="testing",
                AWS_SECRET_ACCESS_KEY="testing",
                AWS_DEFAULT_REGION="us-east-1",
            )
            server, endpoint = start_moto(work / "moto.log")
            os.environ["AWS_ENDPOINT_URL"] = endpoint
            client = boto3.client("s3", endpoint_url=endpoint)
            deadline = time.monotonic() + 60
            while True:  # until the server answers
                try:
                    client.create_bucket(Bucket=bucket)
                    break
                except Exception:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)

        dataset = work / "dataset"
        if args.source:
            images = subset(Path(args.source), work / "images", args.per_class)
            opts = PrepareOptions(
                source=str(images), out=str(dataset), shard_size=args.shard_size, quiet=True
            )
            prepare_dataset(opts)
        else:
            from resnet18_dist.data.digits import prepare_digits

            prepare_digits(dataset, shard_size=args.shard_size)
        manifest = Manifest.load(dataset)
        shards = [s for split in manifest.shards.values() for s in split]
        size = sum(s.bytes for s in shards)
        uploaded = upload(client, dataset, bucket, args.prefix)
        objects = len(uploaded)
        uri = f"s3://{bucket}/{args.prefix}"
        print(f"machine: {machine_description()}")
        print(
            f"dataset: {sum(manifest.counts.values())} images, {len(shards)} shards, "
            f"{size / 1e6:.1f} MB ({objects} objects) at {endpoint}"
        )

        times: dict[int, list[float]] = {1: [], args.threads: []}
        for i in range(args.repeats):
            for threads in (1, args.threads):  # alternating: drift hits both sides alike
                cache = work / f"cache-{threads}-{i}"
                start = time.perf_counter()
                local = fetch_dataset(uri, cache=cache, threads=threads)
                took = time.perf_counter() - start
                assert Manifest.load(local).counts == manifest.counts
                times[threads].append(took)
                print(f"  fetch {i + 1}, {threads} at a time: {took:.2f} s", flush=True)
                shutil.rmtree(cache)
        serial = statistics.median(times[1])
        parallel = statistics.median(times[args.threads])
        print(
            f"median: 1 at a time {serial:.2f} s ({size / 1e6 / serial:.1f} MB/s), "
            f"{args.threads} at a time {parallel:.2f} s ({size / 1e6 / parallel:.1f} MB/s): "
            f"{serial / parallel:.2f}x"
        )
    finally:
        for start in range(0, len(uploaded), 1000):  # a real bucket keeps nothing of ours
            batch = [{"Key": k} for k in uploaded[start : start + 1000]]
            client.delete_objects(Bucket=bucket, Delete={"Objects": batch})
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
