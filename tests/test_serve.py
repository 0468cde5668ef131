"""The REST endpoint, as users run it: `launch/serve.py` in a subprocess (its own private Ray) on
loopback, serving a model trained on the digits default and exported, checked over HTTP against
`launch/predict.py`; then malformed, oversized and unauthenticated requests, back-pressure, the
start-up errors and the Serve config file in cluster/."""

from __future__ import annotations

import contextlib
import io
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
import yaml
from PIL import Image

from resnet18_dist.options import ConfigError

from .conftest import REPO, free_port, launch

TOKEN = "test-token-0123456789abcdef"
MAX_BODY = 200_000
MAX_PIXELS = 10_000
MAX_IMAGES = 8
MAX_ONGOING = 4
MAX_QUEUED = 4
MAX_BATCH = 4


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def exported(digits_export: tuple[Path, dict]) -> Path:
    """The README's main job on the digits, exported (fp32 and int8): made once per session
    (tests/conftest.py) and shared with the export tests."""
    return digits_export[0]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(model: Path, tmp: Path, *extra: str) -> Server:
    port = free_port()
    log = tmp / f"serve-{port}.log"
    # RAY_ADDRESS=local: a private Ray, never another Ray that happens to run on this machine.
    env = {**os.environ, "RAY_ADDRESS": "local"}
    with log.open("w") as f:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "launch" / "serve.py"),
                "--model",
                str(model),
                "--port",
                str(port),
                *extra,
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited {proc.returncode}:\n{server.output()[-3000:]}"
        if "Ctrl-C stops it." in server.output():  # printed once Serve reports it running
            r = requests.get(server.url + "/healthz", timeout=10)
            assert r.status_code == 200 and r.json() == {"status": "ok"}, r.text
            return server
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"server not healthy in time:\n{server.output()[-3000:]}")


def stop_server(server: Server) -> int:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGINT)
        try:
            server.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    return server.proc.returncode


@pytest.fixture(scope="module")
def server(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("serve")
    key = tmp / "token.txt"
    key.write_text(TOKEN + "\n")
    s = start_server(
        exported,
        tmp,
        *("--api-key-file", str(key), "--max-body-bytes", str(MAX_BODY)),
        *("--max-pixels", str(MAX_PIXELS), "--max-images", str(MAX_IMAGES)),
        *("--max-batch-size", str(MAX_BATCH), "--batch-wait-ms", "20"),
        *("--max-ongoing-requests", str(MAX_ONGOING), "--max-queued-requests", str(MAX_QUEUED)),
    )
    yield s
    stop_server(s)


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def digit_files(digits_folder: Path, per_class: int = 2) -> list[Path]:
    return [f for d in sorted(digits_folder.iterdir()) for f in sorted(d.iterdir())[:per_class]]


def predict_cli(model: Path, files: list[Path], *extra: str) -> dict[str, list[tuple[str, str]]]:
    """launch/predict.py's answers: file -> [(label, probability as printed)]."""
    proc = launch("predict", "--model", str(model), "--top-k", "3", *extra, *map(str, files))
    assert proc.returncode == 0, proc.stderr
    out = {}
    for line in proc.stdout.splitlines():
        path, _, rest = line.rpartition(": ")
        out[path] = [tuple(item.split(" ")) for item in rest.split(", ")]
    assert len(out) == len(files)
    return out


def assert_same(http_preds: list[dict[str, Any]], cli: list[tuple[str, str]]) -> None:
    assert [p["label"] for p in http_preds] == [label for label, _ in cli]
    for p, (_, printed) in zip(http_preds, cli, strict=True):
        # predict prints 3 decimals; a batch of another size may differ in the last float bits
        assert abs(p["probability"] - float(printed)) <= 0.0005 + 1e-6, (p, printed)


def model_info(server: Server) -> dict[str, Any]:
    r = requests.get(server.url + "/v1/model", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


# ------------------------------------------------------------------------------ 1. answers
@pytest.mark.slow
@pytest.mark.ray
def test_classify_matches_predict(server: Server, exported: Path, digits_folder: Path) -> None:
    files = digit_files(digits_folder)
    cli = predict_cli(exported, files)
    info = model_info(server)
    assert info["classes"] == [str(i) for i in range(10)]
    assert info["artifact"] == "fp32" and info["input_size"] == 8
    assert len(info["mean"]) == 3 and len(info["std"]) == 3
    for f in files:
        raw = requests.post(
            server.url + "/v1/classify?top_k=3",
            data=f.read_bytes(),
            headers={**AUTH, "Content-Type": "image/jpeg"},
            timeout=30,
        )
        assert raw.status_code == 200, raw.text
        body = raw.json()
        assert body["model"] == exported.name and body["artifact"] == "fp32"
        assert re.fullmatch(r"[0-9a-f]{16}", body["version"])
        assert_same(body["predictions"], cli[str(f)])
        form = requests.post(
            server.url + "/v1/classify?top_k=3",
            files={"image": (f.name, f.read_bytes(), "image/jpeg")},
            headers=AUTH,
            timeout=30,
        )
        assert form.status_code == 200, form.text
        assert_same(form.json()["predictions"], cli[str(f)])
    # Most answers are right: the model is a trained one, and so is what the server runs.
    right = sum(cli[str(f)][0][0] == f.parent.name for f in files)
    assert right >= 0.5 * len(files)


@pytest.mark.slow
@pytest.mark.ray
def test_batch_endpoint_matches_predict_and_batches(
    server: Server, exported: Path, digits_folder: Path
) -> None:
    files = digit_files(digits_folder, per_class=1)[:MAX_IMAGES]
    cli = predict_cli(exported, files)
    r = requests.post(
        server.url + "/v1/classify/batch?top_k=3",
        files=[("images", (f.name, f.read_bytes(), "image/jpeg")) for f in files],
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["file"] for x in results] == [f.name for f in files]
    for x, f in zip(results, files, strict=True):
        assert_same(x["predictions"], cli[str(f)])
    # The images of one request enter the replica's batch queue together: ONNX Runtime runs
    # them MAX_BATCH at a time, not one by one.
    assert [x["onnx_batch"] for x in results] == [MAX_BATCH] * len(files)


# The INT8 artifact served (`--int8`): tests/test_readme.py checks the README's own INT8 server
# (`launch/serve.py --model exports/<name> --int8 ...`) against predict --int8 the same way, on
# the same export, instead of starting a third server here.


# ------------------------------------------------------------------------------ 2. bad requests
@pytest.mark.slow  # it asks the module's running server (the main job's export)
@pytest.mark.ray
def test_the_openapi_document_describes_the_routes_and_their_real_answers(
    server: Server, digits_folder: Path
) -> None:
    """/openapi.json lists every route with its request body and answers; real answers of the
    running server (a classification, a batch, the model, an error) validate against the
    schemas it publishes; /docs serves the browsable page; both need no token."""
    import jsonschema

    doc = requests.get(server.url + "/openapi.json", timeout=30)
    assert doc.status_code == 200, doc.text
    spec = doc.json()
    methods = {path: set(ops) for path, ops in spec["paths"].items()}
    assert methods == {
        "/healthz": {"get", "head"},
        "/v1/model": {"get", "head"},
        "/v1/classify": {"post"},
        "/v1/classify/batch": {"post"},
    }
    one = spec["paths"]["/v1/classify"]["post"]
    assert set(one["requestBody"]["content"]) == {"image/jpeg", "image/png", "multipart/form-data"}
    assert [q["name"] for q in one["parameters"]] == ["top_k"]
    assert {"400", "401", "413", "415"} <= set(one["responses"])
    assert "503" not in one["responses"]  # Serve's proxy answers it, in plain text
    assert set(spec["paths"]["/v1/classify/batch"]["post"]["requestBody"]["content"]) == {
        "multipart/form-data"
    }
    assert any("HTTPBearer" in s for s in one["security"][0])

    def answers(path: str, method: str, status: str) -> dict:
        """The published JSON schema of ``path``'s answer with ``status``."""
        content = spec["paths"][path][method]["responses"][status]["content"]
        return {**content["application/json"]["schema"], "components": spec["components"]}

    def check(body: dict, schema: dict) -> None:
        jsonschema.validate(body, schema, cls=jsonschema.Draft202012Validator)

    f = digit_files(digits_folder, per_class=1)[3]
    r = requests.post(
        server.url + "/v1/classify?top_k=2",
        data=f.read_bytes(),
        headers={**AUTH, "Content-Type": "image/jpeg"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    check(r.json(), answers("/v1/classify", "post", "200"))
    files = [("images", (g.name, g.read_bytes(), "image/jpeg")) for g in [f, f]]
    r = requests.post(server.url + "/v1/classify/batch", files=files, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    check(r.json(), answers("/v1/classify/batch", "post", "200"))
    r = requests.get(server.url + "/v1/model", headers=AUTH, timeout=30)
    check(r.json(), answers("/v1/model", "get", "200"))
    check(
        requests.get(server.url + "/healthz", timeout=30).json(), answers("/healthz", "get", "200")
    )
    r = requests.post(server.url + "/v1/classify", data=b"x", timeout=30)  # no token
    assert r.status_code == 401
    check(r.json(), answers("/v1/classify", "post", "401"))
    # The schema can fail: an answer without its predictions does not validate.
    with pytest.raises(jsonschema.ValidationError):
        check(
            {"model": "m", "artifact": "fp32", "version": "v"},
            answers("/v1/classify", "post", "200"),
        )
    for path in ("/healthz", "/v1/model"):  # HEAD, as every GET route answered it before
        assert requests.head(server.url + path, headers=AUTH, timeout=30).status_code == 200
    page = requests.get(server.url + "/docs", timeout=30)
    assert page.status_code == 200 and "swagger" in page.text.lower()


def png_bytes(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(buf, "PNG")  # noise: no tiny IDAT
    return buf.getvalue()


def gif_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "GIF")
    return buf.getvalue()


def bad_requests(jpeg: bytes) -> list[tuple[str, dict[str, Any], int, str, str]]:
    """(name, requests.request kwargs, status, error code, text the detail must contain)."""
    img = {**AUTH, "Content-Type": "image/jpeg"}
    png = png_bytes((32, 32))
    big_png = png_bytes((200, 200))  # 40,000 px > MAX_PIXELS, a few hundred bytes
    C, B = "/v1/classify", "/v1/classify/batch"
    return [
        (
            "no token",
            dict(url=C, data=jpeg, headers={"Content-Type": "image/jpeg"}),
            401,
            "unauthorized",
            "missing bearer token",
        ),
        (
            "wrong token",
            dict(url=C, data=jpeg, headers={**img, "Authorization": "Bearer wrong-token"}),
            401,
            "unauthorized",
            "wrong bearer token",
        ),
        (
            "basic auth",
            dict(url=C, data=jpeg, headers={**img, "Authorization": "Basic dTpw"}),
            401,
            "unauthorized",
            "missing bearer token",
        ),
        ("no token, model", dict(method="GET", url="/v1/model"), 401, "unauthorized", "bearer"),
        (
            "no token, batch",
            dict(url=B, files={"a": ("a.jpg", jpeg, "image/jpeg")}),
            401,
            "unauthorized",
            "bearer",
        ),
        (
            "body over the limit",
            dict(url=C, data=b"\xff" * (MAX_BODY + 1), headers=img),
            413,
            "body_too_large",
            f"{MAX_BODY + 1} bytes (Content-Length)",
        ),
        (
            "chunked body over the limit",
            dict(url=C, data=iter([b"\xff" * 50_000] * 5), headers=img),
            413,
            "body_too_large",
            f"request body is over {MAX_BODY} bytes",  # the streamed cap, not Content-Length
        ),
        (
            "multipart over the limit",
            dict(url=B, files={"a": ("a.jpg", b"\xff" * MAX_BODY, "image/jpeg")}, headers=AUTH),
            413,
            "body_too_large",
            "--max-body-bytes",
        ),
        (
            "too many pixels",
            dict(url=C, data=big_png, headers={**img, "Content-Type": "image/png"}),
            413,
            "image_too_large",
            "40000 pixels",
        ),
        (
            "too many pixels in a batch",
            dict(url=B, files={"a": ("big.png", big_png, "image/png")}, headers=AUTH),
            413,
            "image_too_large",
            "big.png",
        ),
        (
            "text content type",
            dict(url=C, data=b"hello", headers={**img, "Content-Type": "text/plain"}),
            415,
            "unsupported_media_type",
            "text/plain",
        ),
        (
            "no content type",
            dict(url=C, data=jpeg, headers=AUTH),
            415,
            "unsupported_media_type",
            "(none)",
        ),
        (
            "gif content type",
            dict(url=C, data=gif_bytes(), headers={**img, "Content-Type": "image/gif"}),
            415,
            "unsupported_media_type",
            "image/gif",
        ),
        (
            "raw body to batch",
            dict(url=B, data=jpeg, headers=img),
            415,
            "unsupported_media_type",
            "multipart/form-data",
        ),
        (
            "text part",
            dict(url=B, files={"a": ("a.txt", b"hi", "text/plain")}, headers=AUTH),
            415,
            "unsupported_media_type",
            "a.txt",
        ),
        ("empty body", dict(url=C, data=b"", headers=img), 400, "empty_body", "0 bytes"),
        (
            "empty part",
            dict(url=B, files={"a": ("e.jpg", b"", "image/jpeg")}, headers=AUTH),
            400,
            "empty_body",
            "e.jpg",
        ),
        (
            "not an image",
            dict(url=C, data=b"this is not an image" * 10, headers=img),
            400,
            "bad_image",
            "not a JPEG or PNG image",
        ),
        (
            "gif bytes as png",
            dict(url=C, data=gif_bytes(), headers={**img, "Content-Type": "image/png"}),
            400,
            "bad_image",
            "not a JPEG or PNG image",
        ),
        (
            "truncated jpeg",
            dict(url=C, data=jpeg[: len(jpeg) // 2], headers=img),
            400,
            "bad_image",
            "cannot decode",
        ),
        (
            "truncated png",
            dict(url=C, data=png[: len(png) // 2], headers={**img, "Content-Type": "image/png"}),
            400,
            "bad_image",
            "request body",
        ),
        (
            "truncated image in a batch",
            dict(url=B, files={"t": ("t.jpg", jpeg[:40], "image/jpeg")}, headers=AUTH),
            400,
            "bad_image",
            "t.jpg",
        ),
        (
            "two files to classify",
            dict(
                url=C,
                files=[("a", ("a.jpg", jpeg, "image/jpeg")), ("b", ("b.jpg", jpeg, "image/jpeg"))],
                headers=AUTH,
            ),
            400,
            "too_many_files",
            "/v1/classify/batch",
        ),
        (
            "no file in the form",
            dict(url=B, files={"x": (None, "just text")}, headers=AUTH),
            400,
            "bad_request",
            "no image file",
        ),
        (
            "too many files",
            dict(
                url=B,
                files=[("f", (f"{i}.jpg", jpeg, "image/jpeg")) for i in range(MAX_IMAGES + 1)],
                headers=AUTH,
            ),
            400,
            "too_many_files",
            f"more than {MAX_IMAGES} image file(s)",
        ),
        (
            "broken multipart",
            dict(
                url=B,
                data=b"--zzz\r\nnonsense",
                headers={**AUTH, "Content-Type": "multipart/form-data"},
            ),
            400,
            "bad_request",
            "boundary",
        ),
        (
            "top_k zero",
            dict(url=C + "?top_k=0", data=jpeg, headers=img),
            400,
            "bad_request",
            "top_k",
        ),
        (
            "top_k text",
            dict(url=C + "?top_k=abc", data=jpeg, headers=img),
            400,
            "bad_request",
            "top_k",
        ),
        (
            "top_k a non-ASCII digit",
            dict(url=C + "?top_k=%C2%B2", data=jpeg, headers=img),  # "²": isdigit() is True
            400,
            "bad_request",
            "top_k",
        ),
        (
            "top_k too big",
            dict(url=C + "?top_k=11", data=jpeg, headers=img),
            400,
            "bad_request",
            "1 to 10",
        ),
        (
            "unknown path",
            dict(url="/v2/classify", data=jpeg, headers=img),
            404,
            "not_found",
            "Not Found",
        ),
        (
            "wrong method",
            dict(method="GET", url=C, headers=AUTH),
            405,
            "method_not_allowed",
            "Method",
        ),
    ]


@pytest.mark.slow
@pytest.mark.ray
def test_bad_requests_get_json_errors_and_the_server_keeps_serving(
    server: Server, digits_folder: Path
) -> None:
    good = digit_files(digits_folder, per_class=1)[3]
    jpeg = good.read_bytes()
    before = model_info(server)["replica"]
    cases = bad_requests(jpeg)
    sent = 0
    seen_codes: set[int] = set()
    while sent < 100:
        name, kwargs, status, code, text = cases[sent % len(cases)]
        kwargs = dict(kwargs)
        if isinstance(kwargs.get("data"), Iterator):  # a generator is spent after one use
            kwargs["data"] = iter([b"\xff" * 50_000] * 5)
        method = kwargs.pop("method", "POST")
        url = server.url + kwargs.pop("url")
        r = requests.request(method, url, timeout=30, **kwargs)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json"), (name, r.text)
        body = r.json()
        assert body["error"] == code and body["status"] == status, (name, body)
        assert text in body["detail"], (name, body)
        seen_codes.add(status)
        sent += 1
    assert seen_codes == {400, 401, 404, 405, 413, 415}
    # A good request still works, on the same replica (same Serve replica id and process).
    r = requests.post(
        server.url + "/v1/classify",
        data=jpeg,
        headers={**AUTH, "Content-Type": "image/jpeg"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["label"] in [str(i) for i in range(10)]
    assert model_info(server)["replica"] == before
    assert server.proc.poll() is None


def stalled_request(url: str) -> socket.socket:
    """A request whose body never finishes: it holds a place at the replica (or in the proxy's
    queue) until the socket closes."""
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(
        (
            "POST /v1/classify HTTP/1.1\r\n"
            f"Host: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: image/jpeg\r\nContent-Length: 1000\r\n\r\n"
        ).encode()
        + b"\xff\xd8"
    )
    return s


def first_answer(held: list[socket.socket], wait: float) -> tuple[int, bytes] | None:
    """(1-based index, reply) of a held request that got an answer within ``wait`` seconds."""
    readable, _, _ = select.select(held, [], [], wait)
    if not readable:
        return None
    i = min(held.index(s) for s in readable)
    return i + 1, held[i].recv(65536)


@pytest.mark.slow
@pytest.mark.ray
def test_back_pressure_answers_503_then_recovers(server: Server, digits_folder: Path) -> None:
    before = model_info(server)["replica"]
    held: list[socket.socket] = []
    answer = None
    try:
        for _ in range(MAX_ONGOING + MAX_QUEUED + 4):
            held.append(stalled_request(server.url))
            answer = first_answer(held, 1.5)
            if answer:
                break
        assert answer is not None, "no request was refused"
        n, reply = answer
        # MAX_ONGOING requests at the replica, MAX_QUEUED waiting in the proxy: the next is 503.
        assert n == MAX_ONGOING + MAX_QUEUED + 1, reply
        assert reply.startswith(b"HTTP/1.1 503"), reply
        assert b"retry-after: 1" in reply.lower(), reply
    finally:
        for s in held:
            s.close()
    # Once the held requests are gone the server answers again, on the same replica.
    jpeg = digit_files(digits_folder, per_class=1)[0].read_bytes()
    deadline = time.monotonic() + 30
    while True:
        r = requests.post(
            server.url + "/v1/classify",
            data=jpeg,
            headers={**AUTH, "Content-Type": "image/jpeg"},
            timeout=30,
        )
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 200, r.text
    assert model_info(server)["replica"] == before


# ------------------------------------------------------------------------------ metrics
def metrics_port(server: Server) -> int:
    """The Prometheus port of the server's private Ray: Ray writes it into its session
    directory, named on the command lines of the processes it started."""
    import psutil

    for proc in psutil.Process(server.proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            m = re.search(r"--session[-_]dir=(\S+)", " ".join(proc.cmdline()))
            if m:
                (port_file,) = Path(m.group(1)).glob("metrics_export_port_*")
                return int(port_file.read_text())
    raise AssertionError("no Ray session directory found under the server process")


@pytest.mark.slow
@pytest.mark.ray
def test_metrics_are_exported_in_prometheus_format(server: Server) -> None:
    url = f"http://127.0.0.1:{metrics_port(server)}/metrics"
    wanted = [
        r'ray_resnet18_serve_requests_total\{[^}]*route="/v1/classify"[^}]*status="200"',
        r'ray_resnet18_serve_requests_total\{[^}]*route="/v1/classify"[^}]*status="415"',
        r'ray_resnet18_serve_request_latency_ms_bucket\{[^}]*route="/v1/classify"',
        r"ray_resnet18_serve_batch_size_count\{[^}]*deployment=\"ClassifierDeployment\"",
        r"ray_resnet18_serve_images_total\{",
    ]
    deadline = time.monotonic() + 60  # Ray exports every few seconds
    while True:
        text = requests.get(url, timeout=10).text
        missing = [w for w in wanted if not re.search(w, text)]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not missing, missing
    images = sum(float(v) for v in re.findall(r"ray_resnet18_serve_images_total\{.*\} (\S+)", text))
    assert images >= 20  # the images classified by the tests above


# ------------------------------------------------------------------------------ 3. start-up
def test_missing_export_dir_exits_2_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-export"
    proc = launch("serve", "--model", str(missing), "--port", str(free_port()), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"--model: {missing}: no such export directory" in proc.stderr


@pytest.mark.slow
@pytest.mark.ray
def test_incomplete_export_and_bad_options_exit_2(tmp_path: Path, exported: Path) -> None:
    empty = tmp_path / "half-export"
    empty.mkdir()
    (empty / "meta.json").write_text("{}")
    proc = launch("serve", "--model", str(empty), timeout=120)
    assert proc.returncode == 2
    assert f"{empty}: incomplete export, model.onnx is missing" in proc.stderr
    # A truncated model file is refused at start-up too, not by replicas failing to load it.
    broken = tmp_path / "broken-export"
    shutil.copytree(exported, broken)
    onnx = broken / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:1000])
    proc = launch("serve", "--model", str(broken), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--model: " in proc.stderr and str(onnx) in proc.stderr, proc.stderr[-2000:]
    short = tmp_path / "short.txt"
    short.write_text("abc")
    for args, message in [
        (["--api-key-file", str(tmp_path / "nokey")], "--api-key-file: "),
        (["--api-key-file", str(short)], "at least 16 characters"),
        (["--replicas", "2", "--autoscale", "1:3"], "not both"),
        (["--autoscale", "3"], "--autoscale: expected MIN:MAX"),
        (["--max-batch-size", "32", "--max-ongoing-requests", "8"], "--max-ongoing-requests"),
        (["--port", "70000"], "--port"),
    ]:
        proc = launch("serve", "--model", str(exported), *args, timeout=120)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a cluster without GPUs")
def test_device_cuda_without_a_gpu_exits_2_naming_it(exported: Path, tmp_path: Path) -> None:
    """`serve --device cuda` on a Ray cluster without GPUs is refused before any replica
    starts (a replica asking for a GPU would wait forever); `predict --device cuda` with an
    ONNX Runtime that has no CUDA provider (this one) is refused the same way."""
    from resnet18_dist.serve.app import deployment_options
    from resnet18_dist.serve.options import ServeOptions

    proc = launch("serve", "--model", str(exported), "--device", "cuda", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--device: cuda: the Ray cluster has no GPU" in proc.stderr, proc.stderr[-2000:]
    f = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(f)
    proc = launch("predict", "--model", str(exported), "--device", "cuda", str(f), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--device: cuda: this ONNX Runtime has no CUDA provider" in proc.stderr
    # On a GPU cluster each replica asks Ray for one GPU, a cpu replica for none.
    cuda = deployment_options(ServeOptions(model=str(exported), device="cuda"))
    assert cuda["ray_actor_options"]["num_gpus"] == 1
    cpu = deployment_options(ServeOptions(model=str(exported)))
    assert cpu["ray_actor_options"]["num_gpus"] == 0


# ------------------------------------------------------------------------------ config file
@pytest.mark.slow
@pytest.mark.ray
def test_serve_config_matches_ray_serves_schema(exported: Path) -> None:
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from resnet18_dist.serve.options import ServeOptions

    raw = yaml.safe_load((REPO / "cluster" / "serve.yaml").read_text())
    config = ServeDeploySchema.model_validate(raw)
    assert config.http_options.host == "127.0.0.1"  # Serve's own default would be 0.0.0.0
    (app,) = config.applications
    module_name, _, attr = app.import_path.partition(":")
    import importlib

    builder = getattr(importlib.import_module(module_name), attr)
    # The args are the launcher's options, checked by the same rules...
    ServeOptions.from_dict(dict(app.args), "args")
    # ...and the builder turns them into a Serve application for an export that exists.
    built = builder({**app.args, "model": str(exported)})
    assert isinstance(built, Application)
    with pytest.raises(ConfigError, match="no such export directory"):
        builder(dict(app.args))  # /mnt/shared/... does not exist here
    with pytest.raises(ConfigError, match="http_options"):
        builder({**app.args, "model": str(exported), "port": 9000})
    with pytest.raises(ConfigError, match="--max-batch-size"):
        builder({**app.args, "model": str(exported), "max_batch_size": 0})
    from pydantic import ValidationError

    # The schema is not a formality: it refuses a wrong type and an application without code.
    with pytest.raises(ValidationError, match="port"):
        ServeDeploySchema.model_validate({**raw, "http_options": {"port": "eighty"}})
    with pytest.raises(ValidationError, match="import_path"):
        ServeDeploySchema.model_validate({**raw, "applications": [{"name": "resnet18"}]})


# What Ray Train V2's placement-group cleaner does in its actor, in a second Ray started the
# launcher's way: a State API call that names no Ray, asked from a task.
SECOND_RAY = """
import ray
from resnet18_dist.launching.ray_cluster import start_ray

assert start_ray(None)

@ray.remote(num_cpus=0)
class Marker:
    def ping(self):
        return 1

marker = Marker.options(name="second-ray-marker").remote()
ray.get(marker.ping.remote())

@ray.remote(num_cpus=0)
def actors_seen():
    from ray.util.state import list_actors
    return sorted(a.class_name for a in list_actors())

print(ray.get(actors_seen.remote()))
"""


@pytest.mark.slow
@pytest.mark.ray
def test_a_second_private_ray_beside_the_server_reaches_its_own_state_api(
    server: Server,
) -> None:
    """Two Rays side by side on one machine (this server's, and a training run's in another
    terminal): the launcher points Ray's State API at its own Ray; without that, the second
    Ray's calls that name no Ray (Ray Train's cleaner makes them) fail with "Found multiple
    active Ray instances", and its runs never release their workers."""
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(REPO)}
    env.pop("RAY_API_SERVER_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-c", SECOND_RAY], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "['Marker']", proc.stdout  # its own, only
    assert requests.get(server.url + "/healthz", timeout=10).status_code == 200


# Last: it stops the module's server.
@pytest.mark.slow
@pytest.mark.ray
def test_ctrl_c_stops_the_server_cleanly(server: Server) -> None:
    assert stop_server(server) == 0, server.output()[-3000:]
    assert "stopped" in server.output()
    with pytest.raises(requests.ConnectionError):
        requests.get(server.url + "/healthz", timeout=5)
