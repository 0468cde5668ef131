"""Serve an exported model over HTTP with Ray Serve (ONNX Runtime replicas, dynamic batching).

    resnet18-dist serve --model exports/<name>
    resnet18-dist serve --model exports/<name> --int8 --autoscale 1:4 --api-key-file key.txt

Joins the cluster in RAY_ADDRESS / --address, or a running local one, else starts Ray in this
process; binds 127.0.0.1 unless --host says otherwise; runs until Ctrl-C (or SIGTERM), then
removes the application and exits 0. A missing or incomplete export directory, an unreadable
key file or a port in use is refused with exit code 2 before anything starts.
"""

from __future__ import annotations

import signal
import socket
import sys
import threading

from resnet18_dist.cli import build_parser, parse_options
from resnet18_dist.options import ConfigError
from resnet18_dist.serve.options import ServeOptions

APP_NAME = "resnet18"


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def main(argv: list[str] | None = None, prog: str = "resnet18-dist serve") -> int:
    parser = build_parser(ServeOptions, __doc__, prog=prog, config_file=False)
    opts = parse_options(ServeOptions, parser, argv)
    root = opts.check_files()  # a ConfigError: exit code 2 (commands.run)
    from resnet18_dist.serve.classifier import (
        DeviceError,
        OnnxClassifier,
        PredictError,
        providers_for,
    )

    try:  # a truncated or foreign model file is refused here, not by replicas failing to start
        OnnxClassifier.load(opts.model_file(root))
    except PredictError as exc:
        raise ConfigError("--model", str(exc)) from exc

    from resnet18_dist.launching.ray_cluster import start_ray

    private = start_ray(opts.address, verbose=opts.verbose)
    if opts.device == "cuda":
        # The replicas' nodes, not this one, need the GPU (and onnxruntime-gpu, which each
        # replica checks as it loads the model).
        from resnet18_dist.launching.ray_cluster import cluster_capacity

        _, _, gpus = cluster_capacity()
        if gpus < 1:
            raise ConfigError(
                "--device", "cuda: the Ray cluster has no GPU; serve with --device cpu"
            )
        # One GPU a replica: more replicas than GPUs would wait for them without end.
        needed = opts.autoscale_range()[0] if opts.autoscale else (opts.replicas or 1)
        if needed > gpus:
            raise ConfigError(
                "--device",
                f"cuda: {needed} replica(s) need a GPU each, the Ray cluster has {gpus:g}",
            )
        if private:  # the replicas run here: this ONNX Runtime must have CUDA
            try:
                providers_for("cuda")
            except DeviceError as exc:
                raise ConfigError("--device", str(exc)) from exc
    if private and not port_free(opts.host, opts.port):
        # The proxy of a Ray started here runs on this machine: a taken port would only show
        # as a proxy that never becomes healthy.
        raise ConfigError("--port", f"{opts.host}:{opts.port} is already in use")

    import logging

    from ray import serve

    from resnet18_dist.serve.app import build_app

    if not opts.verbose:  # Serve's client INFO lines ("Started Serve", "Application ... ready")
        logging.getLogger("ray.serve").setLevel(logging.WARNING)

    logging_config = {
        "log_level": "INFO" if opts.verbose else "WARNING",
        "enable_access_log": opts.verbose,
    }
    serve.start(
        proxy_location="HeadOnly",
        http_options={
            "host": opts.host,
            "port": opts.port,
            "request_timeout_s": opts.request_timeout_s,
        },
        logging_config=logging_config,
    )
    try:
        serve.run(build_app(opts), name=APP_NAME, route_prefix="/", logging_config=logging_config)
    except KeyboardInterrupt:  # serve.run waits without a timeout for replicas that may never fit
        print("interrupted before the application was running; removing it", flush=True)
        serve.delete(APP_NAME)
        return 130
    # Ctrl-C or SIGTERM from here on ends in a clean stop.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    url = f"http://{opts.host}:{opts.port}"
    scaling = (
        f"autoscale {opts.autoscale}" if opts.autoscale else f"{opts.replicas or 1} replica(s)"
    )
    batching = (
        f"batches of up to {opts.max_batch_size}, {opts.batch_wait_ms:g} ms wait"
        if opts.max_batch_size > 1
        else "batching off"
    )
    print(
        f"serving {str(opts.model).rstrip('/')}/{opts.model_file(root).name} "
        f"({opts.artifact}; {scaling}; {batching}"
        f"{'; bearer token required' if opts.api_key_file else ''})\n"
        f"  POST {url}/v1/classify   POST {url}/v1/classify/batch   "
        f"GET {url}/v1/model   GET {url}/healthz\n"
        "Ctrl-C stops it.",
        flush=True,
    )

    while not stop.wait(0.5):
        pass
    print("stopping...", flush=True)
    # Replicas finish the requests they hold, then go; a private Ray (proxy and controller
    # included) ends with this process. serve.shutdown() would add the proxy's 30 s minimum
    # draining period, and on a shared cluster would stop other people's applications too.
    serve.delete(APP_NAME)
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
