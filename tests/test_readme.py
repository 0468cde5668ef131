"""The README and docs/ against the code: docs/options.md's tables are generated from the options
dataclasses, the scripts and console commands they name exist, and the README's shell commands run
as a user runs them (from an empty working directory, with the README's relative paths) and do
what it says."""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from PIL import Image

from resnet18_dist.cli import options_markdown
from resnet18_dist.commands.benchmark import BenchmarkOptions
from resnet18_dist.commands.compare import CompareOptions
from resnet18_dist.commands.predict import PredictOptions
from resnet18_dist.config import TrainConfig
from resnet18_dist.data.prepare import PrepareOptions
from resnet18_dist.export.pipeline import ExportOptions
from resnet18_dist.serve.options import ServeOptions
from resnet18_dist.tuning.space import SweepOptions

from .conftest import (
    EXPORT_LATENCY_ITERS,
    MAIN_JOB,
    README_EXPORT,
    REPO,
    SHARED_CONSOLES,
    free_port,
    subset_folder,
    user_env,
)
from .test_serve import assert_same, digit_files, predict_cli
from .test_sweep import README_SWEEP, README_SWEEP_WHY

TABLES = {
    "train": TrainConfig,
    "prepare": PrepareOptions,
    "export": ExportOptions,
    "predict": PredictOptions,
    "serve": ServeOptions,
    "compare": CompareOptions,
    "sweep": SweepOptions,
    "benchmark": BenchmarkOptions,
}


@pytest.mark.parametrize("command", list(TABLES))
def test_docs_options_tables_match_the_code(command: str) -> None:
    page = (REPO / "docs" / "options.md").read_text()
    table = re.search(
        rf"<!-- options:{command}:start -->\n(.*?)\n<!-- options:{command}:end -->", page, re.S
    )
    assert table, f"docs/options.md lost its {command} options table markers"
    assert table.group(1) == options_markdown(TABLES[command]), (
        f"regenerate with resnet18_dist.cli.options_markdown({TABLES[command].__name__})"
    )


def test_readme_commands_point_at_files_and_commands_that_exist() -> None:
    from resnet18_dist.commands import COMMANDS

    readme = "\n".join(p.read_text() for p in [REPO / "README.md", *(REPO / "docs").glob("*.md")])
    scripts = set(re.findall(r"python (launch/\w+\.py)", readme))
    assert "launch/train.py" in scripts  # the pattern still finds the main job
    for script in scripts:
        assert (REPO / script).is_file(), script
    subcommands = set(re.findall(r"resnet18-dist ([a-z][a-z-]+)", readme))
    assert "train" in subcommands
    assert subcommands <= set(COMMANDS), subcommands - set(COMMANDS)
    assert "python -m pytest" in (REPO / ".ci" / "run").read_text()


# ============================================================================ the README, run
# The README's shell commands, run the way a user runs them: from an empty working directory
# that holds only the checkout's launch/ (a link), with the relative paths the README writes,
# through bash, with the venv's bin/ first on PATH (the quick start's `. .venv/bin/activate`).
# Each command is parsed out of the README's ```bash / ```console blocks, so changing an
# example changes what runs. The tables below are everything the test changes or leaves out;
# the README's "The README as tests" section is generated from them (and checked, below).

SHELL_BLOCKS = ("bash", "sh", "shell", "console")
RUNNABLE = ("python launch/", "torchrun ", "curl ")  # programs the runner may start
SERVE = "launch/serve.py"
READY = "Ctrl-C stops it."  # what launch/serve.py prints once Serve runs (as in test_serve.py)


@dataclass(frozen=True)
class Command:
    """One simple command of the README: continuations joined, comment dropped, `&&` split."""

    text: str
    line: int  # the line it starts on
    section: str
    output: tuple[str, ...] = ()  # a ```console block's sample output of the command
    file: str = "README.md"  # or a page of docs/


@dataclass(frozen=True)
class Skip:
    what: str
    why: str
    commands: tuple[str, ...]  # exactly as the README writes them (as Command.text)


@dataclass(frozen=True)
class Override:
    prefix: str  # applies to every run command that starts with it
    args: tuple[str, ...]  # appended (argparse keeps the last value of a repeated option)
    why: str


@dataclass(frozen=True)
class Substitution:
    old: str  # as the README writes it
    new: str  # {flowers}, {run} and {port} are filled in by the runner
    why: str


SKIPPED: tuple[Skip, ...] = (
    Skip(
        "the quick start's setup and the whole suite",
        "these tests run inside that environment (`.ci/run` makes it), and are part of the suite",
        (
            "python3 -m venv .venv",
            ". .venv/bin/activate",
            "pip install -e .",
            "pip install -e '.[dali,dev,optuna]'",
            "python -m pytest --durations=10",
        ),
    ),
    Skip(
        "`--download`",
        "needs the internet",
        ("python launch/prepare_data.py --source data/cifar-raw --download --out data/cifar10",),
    ),
    Skip("the README's sweep", README_SWEEP_WHY, (README_SWEEP,)),
    Skip(
        "a started Ray cluster and `ray job submit`",
        "`ray start` leaves a cluster running; tests/test_multinode.py starts one on loopback and "
        "submits real training and sweep jobs to it",
        (
            "ray start --head",
            "export RAY_AUTH_MODE=token",
            "ray job submit --address http://127.0.0.1:8265 --working-dir . -- python "
            "launch/train.py --num-workers 2 --output-dir /shared/runs",
            "ray job submit --address http://127.0.0.1:8265 --working-dir . -- python "
            "launch/sweep.py --num-workers 2 --num-samples 16 --max-epochs 15 "
            "--output-dir /shared/sweeps",
        ),
    ),
    Skip(
        "GPU commands and the Docker images",
        "no GPU and no Docker engine here; tests/test_gpu.py runs on a GPU machine, "
        "tests/test_cluster_configs.py lints the Dockerfiles",
        (
            "python launch/train.py --num-workers 4 --use-gpu on",
            "accelerate launch --multi_gpu --num_processes 4 launch/train_accelerate.py",
            "docker build -f docker/Dockerfile.gpu -t "
            "ghcr.io/resnet18-dist/resnet18-dist:0.1.0-gpu .",
            'docker run --rm --gpus all --shm-size 16g -v "$PWD/runs:/app/runs" '
            "ghcr.io/resnet18-dist/resnet18-dist:0.1.0-gpu python launch/train.py "
            "--num-workers 4 --use-gpu on",
            "accelerate launch --multi_gpu --num_processes 4 launch/train_accelerate.py "
            "--epochs 30",
        ),
    ),
    Skip(
        "the mobile extra and `export --mobile`",
        "its packages (executorch, litert-torch with JAX and transformers) are not in the "
        "quick start's install; tests/test_export.py runs the mobile export where they are",
        (
            "pip install -e '.[mobile]'",
            "python launch/export.py --checkpoint runs/<name> --out exports/<name> --mobile",
        ),
    ),
    Skip(
        "the AWS cluster launcher",
        "needs an AWS account; tests/test_cluster_configs.py checks cluster/aws-gpu.yaml offline",
        (
            'pip install "ray[default]==2.60.0" boto3',
            "mkdir -p ~/.ray/resnet18-dist-auth",
            "chmod 700 ~/.ray/resnet18-dist-auth",
            "ray get-auth-token --generate > ~/.ray/resnet18-dist-auth/auth_token",
            "chmod 600 ~/.ray/resnet18-dist-auth/auth_token",
            "ray up cluster/aws-gpu.yaml",
            "ray dashboard cluster/aws-gpu.yaml &",
            "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=~/.ray/resnet18-dist-auth/auth_token",
            "ray job submit --address http://127.0.0.1:8265 --runtime-env "
            "cluster/runtime_env.yaml -- python launch/train.py --num-workers 2 --use-gpu on "
            "--cpus-per-worker 4 --output-dir s3://YOUR-BUCKET/resnet18-dist/runs --max-failures 2",
            "ray down cluster/aws-gpu.yaml",
        ),
    ),
    Skip(
        "object storage",
        "needs a bucket; tests/test_storage_s3.py and tests/test_export_s3.py run these on a "
        "real S3 API server on loopback",
        (
            "export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... AWS_DEFAULT_REGION=us-east-1",
            "export AWS_ENDPOINT_URL=http://minio.internal:9000",
            "python launch/train.py --num-workers 2 --output-dir "
            "s3://my-bucket/resnet18-dist/runs --name r1",
            "python launch/export.py --checkpoint s3://my-bucket/resnet18-dist/runs/r1 "
            "--out exports/r1",
            "aws s3 sync data/flowers s3://my-bucket/datasets/flowers",
            "python launch/train.py --num-workers 2 --data-dir s3://my-bucket/datasets/flowers",
            "python launch/export.py --checkpoint runs/<name> --out s3://my-bucket/exports/<name>",
            "python launch/predict.py --model s3://my-bucket/exports/<name> cat.jpg",
            "python launch/serve.py --model s3://my-bucket/exports/<name>",
        ),
    ),
    Skip(
        "Kubernetes",
        "needs a Kubernetes cluster with KubeRay; tests/test_cluster_configs.py checks the "
        "manifests against the KubeRay CRDs",
        (
            "kubectl apply -f cluster/kuberay/shared-pvc.yaml",
            "kubectl create secret generic resnet18-dist-ray-auth "
            "--from-literal=auth_token=\"$(python -c 'import secrets; "
            "print(secrets.token_hex(32))')\"",
            "kubectl apply -f cluster/kuberay/raycluster.yaml",
            "kubectl port-forward svc/resnet18-dist-head-svc 8265:8265 &",
            'export RAY_AUTH_TOKEN="$(kubectl get secret resnet18-dist-ray-auth -o '
            "jsonpath='{.data.auth_token}' | base64 -d)\"",
            "ray job submit --address http://127.0.0.1:8265 -- python launch/train.py "
            "--num-workers 2 --use-gpu on --cpus-per-worker 6 --data-dir "
            "/mnt/shared/data/cifar10 --output-dir /mnt/shared/runs",
            "kubectl apply -f cluster/kuberay/rayjob-train.yaml",
            "kubectl apply -f cluster/kuberay/rayjob-sweep.yaml",
            "kubectl logs -f job/resnet18-train",
        ),
    ),
    Skip(
        "the full-size benchmark",
        "needs CIFAR-10 prepared with `--download` (the internet) and compiles for minutes",
        ("python launch/benchmark.py --compile --data-dir data/cifar10 --out bench.json",),
    ),
    Skip(
        "weights from elsewhere",
        "the file (or the ImageNet download) is the user's; tests/test_distill_finetune.py loads "
        "a torchvision teacher's and a torchvision ResNet18's weights from files, and "
        "tests/test_photos.py fine-tunes the latter on photos it makes, with the photo geometry "
        "(through the accelerate launcher: the same training session as launch/train.py's "
        "workers, without a Ray start)",
        (
            "python launch/train.py --teacher resnet50 --teacher-weights "
            "resnet50-on-my-classes.pth",
            "python launch/train.py --data-dir data/flowers --pretrained resnet18.pth "
            "--image-size 224 --preprocess photo",
            "python launch/train.py --data-dir data/flowers --pretrained torchvision "
            "--freeze backbone",
            "python launch/train.py --data-dir data/flowers --pretrained resnet18.pth "
            "--backbone-lr 0.001 --lr 0.1",
        ),
    ),
    Skip(
        "more training runs, for time",
        "each is one more Ray start and run (about 30 s on 2 cores); the quick start runs the "
        "same launcher; tests/test_paths.py runs a relative `--teacher` and `--pretrained` "
        "through Ray workers, tests/test_distill_finetune.py distils and freezes stages, "
        "tests/test_accelerate_wandb.py runs torchrun with 2 ranks, tests/test_model.py builds SE "
        "models, tests/test_speed_options.py runs the tiny benchmark",
        (
            "python launch/train.py",
            "torchrun --nproc_per_node 2 launch/train_accelerate.py --epochs 30",
            "python launch/train_accelerate.py",
            "python launch/train.py --num-workers 2 --epochs 40 --name teacher",
            "python launch/train.py --num-workers 2 --teacher runs/teacher --temperature 4 "
            "--alpha 0.7 --name student",
            "python launch/train.py --se-reduction 16",
            "python launch/train.py --data-dir data/flowers --pretrained runs/teacher "
            "--freeze stages:2",
            "python launch/compare.py runs/teacher runs/student --plot compare.png",
            "python launch/benchmark.py --sizes 16 --batch-size 8 --steps 2 --warmup 1",
        ),
    ),
    Skip(
        "`serve run cluster/serve.yaml`",
        "its model is /mnt/shared/exports/digits and its port 8000 (edit both first); "
        "tests/test_serve.py checks the file against Ray Serve's schema and serves the same app",
        ("serve run cluster/serve.yaml",),
    ),
)

OVERRIDES: tuple[Override, ...] = (
    Override(
        "python launch/train.py --data-dir",
        ("--epochs", "1", "--width", "0.25"),
        "one epoch of a quarter-width ResNet18 (the same code path, 1/16 of the compute): the "
        "own-data run is about paths and files, not accuracy",
    ),
    Override(
        "python launch/train.py --data-dir data/flowers --num-workers 4",
        ("--num-workers", "1"),
        "4 workers do not fit on a 2-CPU machine (refused, exit 2)",
    ),
    Override(
        "python launch/export.py",
        ("--latency-iters", str(EXPORT_LATENCY_ITERS), "--throughput-seconds", "0.5"),
        "measure briefly; the INT8 gate as written (1 point)",
    ),
    Override("python launch/serve.py", ("--port", "{port}"), "a free port"),
)

SUBSTITUTIONS: tuple[Substitution, ...] = (
    Substitution(
        "/data/flowers",
        "{flowers}",
        "the user's ImageFolder (outside the working directory): 20 real digit JPEGs per class",
    ),
    Substitution("<name>", "{run}", "the quick start's run (its name is a timestamp)"),
    Substitution("127.0.0.1:8000", "127.0.0.1:{port}", "the server's free port"),
)

# Commands a session-wide fixture of tests/conftest.py runs once, as this test types them, in the
# working directory the README's other commands then run in; the test reads their console.
SHARED: dict[str, str] = {
    MAIN_JOB: "the quick start's main job, run once per test session as written (the default 15 "
    "epochs of the real ResNet18, 2 DDP workers; `digits_run` in tests/conftest.py): its run "
    "is the one the later commands export and serve, and tests/test_ray_job.py checks its bar",
    README_EXPORT: "the main job's run exported, run once per test session (`digits_export` in "
    "tests/conftest.py): every test of an export (tests/test_export.py, test_serve.py, "
    "test_export_s3.py, test_ray_job.py, test_gpu.py) uses it, and the README's predict and "
    "serve commands use it here",
}

# Files the README's commands name as the user's own, made in the working directory first.
USER_FILES = {
    "cat.jpg": "a digit JPEG",
    "dog.png": "a digit PNG",
    "digit3.jpg": "a 3 from the digits",
    "notes.txt": "a text file",
    "token.txt": "a 32-character token",
}


# ------------------------------------------------------------------------------ parsing
def _words_end(line: str) -> int:
    """Where the line's comment starts (a # beginning a word outside quotes), else its length."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return i
    return len(line)


def _split_and(text: str) -> list[str]:
    """A `a && b && c` list as its simple commands (`&&` outside quotes and $(...))."""
    parts, start, quote, depth = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif text.startswith("&&", i) and not depth and (i == 0 or text[i - 1] != "&"):
            parts.append(text[start:i])
            start = i + 2
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def shell_commands(readme: str, file: str = "README.md") -> list[Command]:
    """Every simple command of one page's shell blocks (the README's by default), in order."""
    commands: list[Command] = []
    lines = readme.splitlines()
    section, i = "", 0
    while i < len(lines):
        fence = re.match(r"```(\w*)\s*$", lines[i])
        if not fence:
            if lines[i].startswith("#"):
                section = lines[i].lstrip("#").strip()
            i += 1
            continue
        i += 1
        body: list[tuple[int, str]] = []
        while not lines[i].startswith("```"):
            body.append((i + 1, lines[i]))
            i += 1
        i += 1
        if fence.group(1) == "console":
            for n, (number, line) in enumerate(body):
                if line.startswith("$ "):
                    output = []
                    for _, out in body[n + 1 :]:
                        if out.startswith("$ "):
                            break
                        output.append(out)
                    commands.append(Command(line[2:].strip(), number, section, tuple(output), file))
        elif fence.group(1) in SHELL_BLOCKS:
            pending, first = "", 0
            for number, line in body:
                line = line[: _words_end(line)].rstrip()
                if not line and not pending:
                    continue
                first = first or number
                if line.endswith("\\"):
                    pending += line[:-1].strip() + " "
                    continue
                for part in _split_and(pending + line.strip()):
                    commands.append(Command(part, first, section, file=file))
                pending, first = "", 0
    return commands


def skipped(command: Command) -> Skip | None:
    return next((s for s in SKIPPED if command.text in s.commands), None)


def plan_problems(commands: list[Command]) -> list[str]:
    """Everything that keeps the tables above from describing this README exactly: a command
    neither run nor listed as not run, and table entries that no longer match the README."""
    problems = []
    texts = {c.text for c in commands}
    runnable = [c for c in commands if not skipped(c)]
    for c in runnable:
        if not c.text.startswith(RUNNABLE):
            problems.append(
                f"{c.file} line {c.line} ({c.section}): `{c.text}` is neither run by "
                "tests/test_readme.py nor listed in its SKIPPED table"
            )
    for skip in SKIPPED:
        problems += [
            f"SKIPPED lists `{t}`, which the README and docs no longer have"
            for t in skip.commands
            if t not in texts
        ]
    for o in OVERRIDES:
        if not any(c.text.startswith(o.prefix) for c in runnable):
            problems.append(f"OVERRIDES: no command the test runs starts with `{o.prefix}`")
    for s in SUBSTITUTIONS:
        if not any(s.old in c.text for c in runnable):
            problems.append(f"SUBSTITUTIONS: no command the test runs has `{s.old}`")
    for text in SHARED:
        if text not in {c.text for c in runnable}:
            problems.append(f"SHARED: the README and docs no longer have `{text}`")
    for name in USER_FILES:
        if not any(name in c.text.split() or f"@{name}" in c.text for c in runnable):
            problems.append(f"USER_FILES: no command the test runs names {name}")
    return problems


def readme_tests_markdown() -> str:
    """The README's "The README as tests" lists, generated from the tables above."""

    def code(text: str) -> str:
        return f"`` {text} ``" if "`" in text else f"`{text}`"

    lines = ["Options appended to the commands (argparse keeps the last of a repeated option):", ""]
    lines += [f"- {code(o.prefix)} + {code(' '.join(o.args))}: {o.why}" for o in OVERRIDES]
    lines += ["", "Replaced in the commands:", ""]
    lines += [f"- {code(s.old)}: {s.why}" for s in SUBSTITUTIONS]
    files = ", ".join(f"{code(n)} ({what})" for n, what in USER_FILES.items())
    lines += ["", f"The user's own files, made first: {files}.", ""]
    lines += ["Run once per test session (typed as above), and shared:", ""]
    lines += [f"- {code(c)}: {why}" for c, why in SHARED.items()]
    lines += [""]
    lines += ["What the README-as-tests do not run:", ""]
    for s in SKIPPED:
        lines.append(f"- {s.what}: {s.why}: " + "; ".join(code(c) for c in s.commands) + ".")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ running
class ReadmeCommandFailed(AssertionError):
    pass


@dataclass
class UserShell:
    """A user's terminal: a working directory, the activated venv, private Ray, no W&B."""

    cwd: Path
    flowers: Path
    port: int = field(default_factory=free_port)
    outputs: dict[str, str] = field(default_factory=dict)  # README command -> stdout + stderr
    timings: list[tuple[str, float, float]] = field(default_factory=list)  # wall s, CPU s

    @property
    def env(self) -> dict[str, str]:
        return user_env()

    def values(self) -> dict[str, str]:
        runs = sorted((self.cwd / "runs").glob("*/report.json"), key=lambda p: p.stat().st_mtime)
        return {
            "flowers": str(self.flowers),
            "port": str(self.port),
            "run": runs[0].parent.name if runs else "<no finished run yet>",
        }

    def typed(self, command: Command) -> str:
        """The command as this test types it: substitutions made, overrides appended."""
        values = self.values()
        text = command.text
        for s in SUBSTITUTIONS:
            text = text.replace(s.old, s.new.format(**values))
        extra = [
            a.format(**values)
            for o in OVERRIDES
            if command.text.startswith(o.prefix)
            for a in o.args
        ]
        return " ".join((text, shlex.join(extra))) if extra else text

    def _record(self, typed: str, start: tuple[float, float]) -> None:
        wall, cpu = _clocks()
        self.timings.append((typed, wall - start[0], cpu - start[1]))

    def fail(self, command: Command, typed: str, why: str, output: str) -> ReadmeCommandFailed:
        return ReadmeCommandFailed(
            f"{command.file} line {command.line} ({command.section}): `{command.text}` {why}\n"
            f"  typed: {typed}\n  in: {self.cwd}\n{output[-4000:]}"
        )

    def run(self, command: Command, timeout: float = 600) -> str:
        typed = self.typed(command)
        start = _clocks()
        try:
            proc = subprocess.run(
                ["bash", "-c", typed],
                cwd=self.cwd,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            raise self.fail(command, typed, f"ran past {timeout} s", str(exc.output)) from None
        self._record(typed, start)
        self.outputs[command.text] = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise self.fail(command, typed, f"exited {proc.returncode}", proc.stdout + proc.stderr)
        return proc.stdout

    @contextlib.contextmanager
    def background(self, command: Command) -> Iterator[str]:
        """Start a command that serves until Ctrl-C; yield once it says it serves; Ctrl-C it
        (SIGINT to its process group, as a terminal sends) and expect exit code 0."""
        typed = self.typed(command)
        start = _clocks()
        log = self.cwd / f"background-{command.line}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                ["bash", "-c", typed],
                cwd=self.cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + 300
            while READY not in log.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    why = f"exited {proc.returncode}" if proc.poll() is not None else "never ready"
                    raise self.fail(command, typed, why, log.read_text(errors="replace"))
                time.sleep(0.5)
            yield typed
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        self._record(typed, start)
        if proc.returncode != 0:
            raise self.fail(command, typed, f"exited {proc.returncode} on Ctrl-C", log.read_text())


def _clocks() -> tuple[float, float]:
    """Wall time, and the CPU time of this process's finished children (the commands)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.monotonic(), usage.ru_utime + usage.ru_stime


def make_user_files(cwd: Path, digits_folder: Path) -> None:
    if not (cwd / "launch").exists():
        (cwd / "launch").symlink_to(REPO / "launch")  # a checkout's launch/, and nothing else
    three = sorted((digits_folder / "3").iterdir())
    shutil.copy(three[0], cwd / "digit3.jpg")
    shutil.copy(three[1], cwd / "cat.jpg")
    Image.open(sorted((digits_folder / "7").iterdir())[0]).save(cwd / "dog.png")
    (cwd / "notes.txt").write_text("not an image\n")
    (cwd / "token.txt").write_text("readme-token-" + "0" * 19 + "\n")


def check_answer(client: Command, answer: str, token: str | None) -> None:
    """A curl's answer against the README's sample of it: the same fields (and, for a refusal,
    the same body); with a bearer token required, the README's token-less curl gets a 401."""
    got = json.loads(answer)
    if token:
        assert (got["error"], got["status"]) == ("unauthorized", 401), (client.text, got)
        return
    assert client.output, (
        f"{client.file} line {client.line}: no sample answer below `{client.text}`"
    )
    sample = json.loads(client.output[0])
    if "error" in sample:
        assert got == sample, (client.text, got)
        return
    assert got.keys() == sample.keys(), (client.text, got)
    assert got["artifact"] == sample["artifact"] and got["onnx_batch"] == sample["onnx_batch"]
    assert [p.keys() for p in got["predictions"]] == [p.keys() for p in sample["predictions"]]


ServerCheck = Callable[[str, list[str], "str | None"], None]  # (url, typed words, token)


def run_readme(
    commands: list[Command], shell: UserShell, while_serving: ServerCheck | None = None
) -> None:
    """Run every command of ``readme`` that SKIPPED does not list, in the README's order; the
    curls run against each server the README starts, then ``while_serving`` if given. Raises
    at the first failure."""
    commands = [c for c in commands if not skipped(c)]
    clients = [c for c in commands if c.text.startswith("curl ")]
    done = set(shell.outputs)  # a SHARED command, already run in this working directory
    for command in commands:
        if command in clients or command.text in done:
            continue  # a command written twice (the quick start's, the laptop's) runs once
        done.add(command.text)
        if SERVE not in command.text:
            shell.run(command)
            continue
        with shell.background(command) as typed:
            words = shlex.split(typed)
            token = None
            if "--api-key-file" in words:
                token = (shell.cwd / words[words.index("--api-key-file") + 1]).read_text().strip()
            for client in clients:
                check_answer(client, shell.run(client), token)
            if while_serving is not None:
                while_serving(f"http://127.0.0.1:{shell.port}", words, token)
            url = f"http://127.0.0.1:{shell.port}"
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            info = requests.get(f"{url}/v1/model", headers=headers, timeout=30)
            assert info.status_code == 200, info.text
            assert info.json()["artifact"] == ("int8" if "--int8" in words else "fp32")


def sample_output(readme: str, section: str) -> list[str]:
    """The lines of the first plain (or ```text) block of a README section: sample output."""
    lines = readme.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip("#").strip() == section)
    fences = [i for i in range(start, len(lines)) if lines[i].startswith("```")]
    opening = next(i for i in fences[::2] if lines[i] in ("```", "```text"))
    return lines[opening + 1 : fences[fences.index(opening) + 1]]


def shape(line: str) -> str:
    """A console line with what differs from run to run masked: colours, paths, ids, host
    names and numbers."""
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    line = re.sub(r"\S*/\S*", "PATH", line)
    line = re.sub(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{8,}\b", "ID", line)
    line = re.sub(r"host [^,\s]+", "host HOST", line)
    # Whether patience ran out before the last epoch follows from the numbers, as they vary.
    line = line.replace(", stopped early", "")
    line = re.sub(r"\d+(,\d{3})*(\.\d+)?(e-?\d+)?", "0", line)  # 11,689,512 as 701,466
    return " ".join(line.split())


def missing_lines(sample: list[str], output: str, optional: str = "") -> list[str]:
    """The README sample's lines whose shape the real output lacks ("..." and lines matching
    the regular expression ``optional`` aside)."""
    shapes = {shape(line) for line in output.splitlines()}
    return [
        line
        for line in sample
        if line.strip() != "..."
        and not (optional and re.search(optional, line))
        and shape(line) not in shapes
    ]


# ------------------------------------------------------------------------------ tests
README = REPO / "README.md"
# The README, then the pages of docs/: first those whose commands continue the README's (in the
# README's order), then any other page (so a command added to one is run or listed too).
FIRST_PAGES = ("data", "cluster", "sweeps", "export", "serving", "training")
PAGES = (
    "README.md",
    *(f"docs/{p}.md" for p in FIRST_PAGES),
    *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md") if p.stem not in FIRST_PAGES),
)


def read_pages() -> dict[str, str]:
    return {page: (REPO / page).read_text() for page in PAGES}


def page_commands(pages: dict[str, str]) -> list[Command]:
    """Every shell command of ``pages``, page by page."""
    return [c for page, text in pages.items() for c in shell_commands(text, page)]


def test_console_shapes_mask_what_differs_between_runs() -> None:
    sample = [
        "(RayTrainWorker pid=10731) DDP worker rank 0/2 (local rank 0) on cpu, process group "
        "gloo, ray_train, host vm, Ray node 4ec0adb02fe7 (192.0.2.2)",
        "  run directory: /home/you/resnet18-dist/runs/train-20261129-031434",
        "...",
    ]
    output = (
        "\x1b[36m(RayTrainWorker pid=5)\x1b[0m DDP worker rank 1/2 (local rank 1) on cpu, "
        "process group gloo, ray_train, host ci-7, Ray node 0123abcd4567 (10.0.0.1)\n"
        "  run directory: /tmp/x/runs/train-20270101-000000\n"
    )
    assert missing_lines(sample, output) == []
    assert missing_lines(sample, output.replace("gloo", "nccl")) == [sample[0]]


def test_the_parser_joins_continuations_drops_comments_and_splits_and_lists() -> None:
    text = (
        "# Title\n\n```bash\n# a comment\npython3 -m venv .venv && . .venv/bin/activate\n\n"
        "ray job submit --address http://h:8265 -- \\\n"
        "    python launch/train.py --name 'a # b'   # why\n"
        "                                            # more why\n```\n\n## Serve\n\n"
        '```console\n$ curl -s http://127.0.0.1:8000/healthz\n{"status":"ok"}\n```\n'
        "```yaml\nkey: value\n```\n"
    )
    assert shell_commands(text) == [
        Command("python3 -m venv .venv", 5, "Title"),
        Command(". .venv/bin/activate", 5, "Title"),
        Command(
            "ray job submit --address http://h:8265 -- python launch/train.py --name 'a # b'",
            7,
            "Title",
        ),
        Command("curl -s http://127.0.0.1:8000/healthz", 15, "Serve", ('{"status":"ok"}',)),
    ]


def test_every_relative_link_of_the_readme_and_docs_resolves() -> None:
    """A link or picture of README.md or docs/*.md that names a file names one that exists
    (the pages moved out of the README link back to it and to each other)."""
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", (REPO / page).read_text()):
            if re.match(r"https?:|mailto:|#", target):
                continue
            path = (REPO / page).parent / target.split("#", 1)[0]
            if not path.exists():
                broken.append(f"{page}: {target}")
    assert broken == []


def test_every_readme_shell_command_is_run_or_listed() -> None:
    assert plan_problems(page_commands(read_pages())) == []


def test_a_new_or_changed_command_is_neither_run_nor_listed_until_the_tables_say() -> None:
    pages = read_pages()
    changed = {
        page: text.replace(
            "ray up cluster/aws-gpu.yaml\n", "ray up cluster/aws-cpu.yaml\n"
        ).replace("--source /data/flowers", "--source /data/pets")
        for page, text in pages.items()
    }
    changed["docs/cluster.md"] += "\n```bash\nray stop   # frees the machine\n```\n"
    problems = "\n".join(plan_problems(page_commands(changed)))
    assert "`ray up cluster/aws-cpu.yaml` is neither run" in problems
    assert (
        "SKIPPED lists `ray up cluster/aws-gpu.yaml`, which the README and docs no longer have"
        in problems
    )
    assert "docs/cluster.md line " in problems and "`ray stop` is neither run" in problems
    assert "SUBSTITUTIONS: no command the test runs has `/data/flowers`" in problems
    # The main job written another way (both places): the shared run no longer matches it.
    other = {
        page: text.replace("python launch/train.py --num-workers 2", "python launch/train.py -h")
        for page, text in pages.items()
    }
    assert f"SHARED: the README and docs no longer have `{MAIN_JOB}`" in plan_problems(
        page_commands(other)
    )


def test_the_readme_states_what_its_tests_change_and_leave_out() -> None:
    block = re.search(
        r"<!-- readme-tests:start -->\n(.*?)\n<!-- readme-tests:end -->",
        (REPO / "docs" / "development.md").read_text(),
        re.S,
    )
    assert block, "docs/development.md lost its readme-tests markers"
    assert block.group(1) == readme_tests_markdown(), "regenerate with readme_tests_markdown()"


def user_shell(tmp_path: Path, digits_folder: Path) -> UserShell:
    cwd = tmp_path / "work"
    cwd.mkdir()
    make_user_files(cwd, digits_folder)
    flowers = subset_folder(digits_folder, tmp_path / "flowers", per_class=20)
    return UserShell(cwd, flowers)


def test_a_broken_readme_command_fails_naming_it(tmp_path: Path, digits_folder: Path) -> None:
    good = "python launch/train.py --num-workers 2"
    readme = README.read_text().replace(good, good.replace("workers", "workerz"), 1)
    line = next(n for n, text in enumerate(readme.splitlines(), 1) if "--num-workerz" in text)
    with pytest.raises(ReadmeCommandFailed) as failed:
        run_readme(shell_commands(readme), user_shell(tmp_path, digits_folder))
    message = str(failed.value)
    assert message.startswith(
        f"README.md line {line} (Quick start): `python launch/train.py --num-workerz 2` exited 2"
    ), message
    assert "unrecognized arguments: --num-workerz" in message


@pytest.mark.slow
@pytest.mark.ray
def test_readme_commands_run_as_a_user_runs_them(
    tmp_path: Path,
    digits_folder: Path,
    digits_run: tuple[Path, str],
    digits_export: tuple[Path, dict],
) -> None:
    pages = read_pages()
    commands = page_commands(pages)
    # The user's working directory is the main job's: the quick start already ran there.
    cwd = digits_run[0].parents[1]
    make_user_files(cwd, digits_folder)
    shell = UserShell(cwd, subset_folder(digits_folder, tmp_path / "flowers", per_class=20))
    shell.outputs[MAIN_JOB] = digits_run[1]
    shell.outputs.update(SHARED_CONSOLES)  # the export (digits_export), in this directory
    assert README_EXPORT in shell.outputs  # run once, never again into the shared directory
    served_int8 = []

    def int8_matches_predict(url: str, words: list[str], token: str | None) -> None:
        """The README's INT8 server, checked as tests/test_serve.py checks its fp32 server: its
        answers for a real digit of each class are predict --int8's on the same export."""
        if "--int8" not in words:
            return
        export = cwd / words[words.index("--model") + 1]
        files = digit_files(digits_folder, per_class=1)
        cli = predict_cli(export, files, "--int8")
        for f in files:
            r = requests.post(
                url + "/v1/classify?top_k=3",
                data=f.read_bytes(),
                headers={"Content-Type": "image/jpeg", "Authorization": f"Bearer {token}"},
                timeout=30,
            )
            assert r.status_code == 200, r.text
            assert r.json()["artifact"] == "int8", r.json()
            assert_same(r.json()["predictions"], cli[str(f)])
        served_int8.append(export)

    try:
        run_readme(commands, shell, while_serving=int8_matches_predict)
    finally:
        for typed, wall, cpu in shell.timings:
            print(f"{wall:6.1f} s wall {cpu:6.1f} s CPU  {typed}")
    # The quick start's sample console has the shape of today's: W&B is off here (its line
    # aside). (The sweep's console is checked by tests/test_sweep.py, which runs it.)
    quick_start = next(c for c in commands if c.section == "Quick start" and not skipped(c))
    console = shell.outputs[quick_start.text]
    missing = missing_lines(sample_output(pages["README.md"], "Quick start"), console, "W&B")
    assert missing == [], f"Quick start: the console has no line like these: {missing}\n{console}"
    cwd = shell.cwd
    run = cwd / "runs" / shell.values()["run"]
    assert run == digits_run[0]  # the export, predict and serve commands used the main job's run
    for name in ("config.yaml", "run_info.json", "metrics.jsonl", "report.json", "model.pt"):
        assert (run / name).is_file(), name
    assert (run / "checkpoint_epoch0015" / "checkpoint.pt").is_file()  # the default 15 epochs
    assert (cwd / "data" / "flowers" / "manifest.json").is_file()
    for name in ("model.pt", "model.onnx", "model.int8.onnx", "report.json", "report.md"):
        assert (cwd / "exports" / run.name / name).is_file(), name
    assert (cwd / "exports" / run.name / "triton" / "resnet18" / "config.pbtxt").is_file()
    assert (cwd / "compare.png").is_file()
    assert served_int8 == [cwd / "exports" / run.name]  # the INT8 server was checked
