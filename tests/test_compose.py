"""The production Docker set-up, checked without a Docker engine.

docker-compose.yml and its merge with docker-compose.cpu.yml are validated against the compose
specification (check-jsonschema's vendored `vendor.compose-spec`, offline) and cross-checked: the
services the design names, depends_on targets, declared volumes, migrate gating the long-running
services, GPU reservations (present in the base, gone in the CPU merge), a scalable worker, and
every DENSEALIGN_* name being a setting that core/settings.py actually reads. What an operator's
first `up` relies on is pinned too: worker and trainer report health through `densealign health`,
stop grace periods cover one job (or one optimizer step) at the settings each file ships, the CPU
override runs at the demo's pace for every DenseAlign service, invite links follow APP_PORT, Redis
leaves no anonymous volume behind, and the package index is a build argument. `.env.example` must
document every setting, with defaults that parse back to the real defaults. The Dockerfile must pin
torch==2.13.0 and never install torchvision.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "docker-compose.yml"
CPU = ROOT / "docker-compose.cpu.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

SERVICES = {"db", "redis", "migrate", "app", "worker", "trainer"}
# Started only with `--profile s3`: an object store for the blobs (DENSEALIGN_BLOB_URL) and its bucket.
S3_PROFILE = {"minio", "minio-bucket"}
DENSEALIGN_SERVICES = ("migrate", "app", "worker", "trainer")  # built from the Dockerfile
LONG_RUNNING = ("app", "worker", "trainer")
GPU_SERVICES = ("worker", "trainer")
SHIPPED_MODEL = "/app/models/densealign-shapes"  # WORKDIR /app + the repo's models/ folder
TORCH_PIN = "torch==2.13.0"

# --------------------------------------------------------------------------------------------------
# Loading and merging compose files the way `docker compose -f a -f b` does
# --------------------------------------------------------------------------------------------------


class _Reset:
    def __repr__(self) -> str:
        return "!reset"


RESET = _Reset()


class Override:
    """A value tagged `!override`: replaces the base value instead of merging into it."""

    def __init__(self, value: Any) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    """SafeLoader (anchors, `<<` merge keys) plus compose's `!reset` and `!override` tags."""


def _construct_any(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)  # type: ignore[arg-type]


ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)
ComposeLoader.add_constructor("!override", lambda loader, node: Override(_construct_any(loader, node)))

# Sequences compose replaces rather than merges; any other sequence met on both sides is refused
# (compose merges ports, volumes, env_file... by its own rules, which this helper does not model).
_REPLACED_SEQUENCES = {"command", "entrypoint", "test"}


def _plain(value: Any) -> Any:
    """Strip merge markers from a value that has no base to merge into."""
    if isinstance(value, Override):
        return _plain(value.value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not RESET}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def merge(base: Any, override: Any, key: str = "") -> Any:
    if isinstance(override, Override):
        return _plain(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            if v is RESET:
                out.pop(k, None)
            elif k in out:
                out[k] = merge(out[k], v, k)
            else:
                out[k] = _plain(v)
        return out
    if isinstance(base, list) and isinstance(override, list) and key not in _REPLACED_SEQUENCES:
        raise NotImplementedError(f"sequence merge of {key!r}: tag it !override or !reset in the override")
    return _plain(override)


def load(path: Path) -> dict[str, Any]:
    data = yaml.load(path.read_text(), Loader=ComposeLoader)
    assert isinstance(data, dict), f"{path.name} is not a mapping"
    return data


def base_config() -> dict[str, Any]:
    return _plain(load(BASE))


def cpu_config() -> dict[str, Any]:
    return merge(load(BASE), load(CPU))


CONFIGS = {"base": base_config, "cpu": cpu_config}


@pytest.fixture(params=sorted(CONFIGS))
def config(request: pytest.FixtureRequest) -> dict[str, Any]:
    return CONFIGS[request.param]()


def check_schema(path: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema against its vendored compose schema (no network)."""
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


# --------------------------------------------------------------------------------------------------
# Settings: the names DenseAlign actually reads
# --------------------------------------------------------------------------------------------------


def setting_names(model: type[BaseModel] = Settings, prefix: str = "DENSEALIGN_") -> set[str]:
    names: set[str] = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            names |= setting_names(ann, f"{prefix}{name.upper()}__")
        else:
            names.add(f"{prefix}{name.upper()}")
    return names


SETTINGS = setting_names()
_ASSIGNMENT = re.compile(r"^(#\s?)?([A-Z][A-Z0-9_]*)=(.*)$")


def env_example_lines() -> Iterator[tuple[bool, str, str]]:
    """(commented, NAME, value) for each `NAME=value` or `# NAME=value` line of .env.example."""
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = _ASSIGNMENT.match(line)
        if m:
            value = m.group(3)
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            yield m.group(1) is not None, m.group(2), value


def interpolated_names(text: str) -> set[str]:
    # `$${NAME}` is compose's escape for a literal `${NAME}` (left to the container's shell)
    return set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", text))


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "use the mapping form of `environment`"
    return {k: str(v) for k, v in env.items()}


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


_DEFAULTED = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?)([-?])((?:[^{}]|\$\{[^{}]*\})*)\}")


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's `${NAME:-default}`, `${NAME:?error}` (and the forms without `:`, nested defaults
    included) against `env`, the variables of .env and the shell."""
    env = env or {}

    def one(m: re.Match[str]) -> str:
        name, colon, kind, default = m.groups()
        if name in env and (env[name] != "" or not colon):
            return env[name]
        if kind == "?":
            raise ValueError(f"compose refuses to start: {name}: {default}")
        return interpolate(default, env)

    out = _DEFAULTED.sub(one, value)
    assert "${" not in out, f"unsupported interpolation in {value!r}"
    return out


def seconds(duration: str) -> float:
    """A compose duration ("1m30s", "5m", "300ms") in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", str(duration))
    assert parts and "".join(n + u for n, u in parts) == str(duration), duration
    return sum(float(n) * units[u] for n, u in parts)


# --------------------------------------------------------------------------------------------------
# The helpers themselves
# --------------------------------------------------------------------------------------------------


def test_setting_names_include_nested_fields() -> None:
    assert {"DENSEALIGN_DATABASE_URL", "DENSEALIGN_MODEL__BASE_MODEL", "DENSEALIGN_DPO__BETA"} <= SETTINGS
    assert "DENSEALIGN_MODEL" not in SETTINGS  # a nested model is not a variable of its own


def test_merge_honours_reset_and_override_tags() -> None:
    base = yaml.load("a: {b: 1, c: [1, 2], d: {e: 1}}\nf: [1]", Loader=ComposeLoader)
    over = yaml.load("a: {b: 2, c: !override [3], d: !reset {}}\nf: !reset []", Loader=ComposeLoader)
    assert merge(base, over) == {"a": {"b": 2, "c": [3]}}
    with pytest.raises(NotImplementedError):
        merge({"ports": ["1:1"]}, {"ports": ["2:2"]})
    assert merge({"command": ["a"]}, {"command": ["b"]}) == {"command": ["b"]}


# --------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------


def test_base_compose_matches_the_compose_schema() -> None:
    result = check_schema(BASE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_merged_cpu_compose_matches_the_compose_schema(tmp_path: Path) -> None:
    merged = tmp_path / "merged.yml"
    merged.write_text(yaml.safe_dump(cpu_config(), sort_keys=False))
    result = check_schema(merged)
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_rejects_a_broken_file(tmp_path: Path) -> None:
    # Guards against a vacuous validator: a misspelt condition and an unknown key must fail.
    broken = base_config()
    broken["services"]["app"]["depends_on"]["migrate"]["condition"] = "service_completed"
    broken["services"]["worker"]["gpu_count"] = 1
    path = tmp_path / "broken.yml"
    path.write_text(yaml.safe_dump(broken))
    result = check_schema(path)
    assert result.returncode != 0
    assert "service_completed" in result.stdout + result.stderr


# --------------------------------------------------------------------------------------------------
# Cross-references
# --------------------------------------------------------------------------------------------------


def test_services_are_the_designed_ones(config: dict[str, Any]) -> None:
    services = config["services"]
    assert {name for name, service in services.items() if "profiles" not in service} == SERVICES
    assert {name for name, service in services.items() if service.get("profiles") == ["s3"]} == S3_PROFILE
    assert services["db"]["image"] == "postgres:16"
    assert services["redis"]["image"].split(":")[0] == "redis"
    for name in DENSEALIGN_SERVICES:
        assert services[name]["build"]["context"] == "."
    images = {services[name]["image"] for name in DENSEALIGN_SERVICES}
    assert len(images) == 1, f"migrate/app/worker/trainer must share one image, got {images}"
    assert [services[n]["command"] for n in DENSEALIGN_SERVICES] == [
        ["migrate"],
        ["serve"],
        ["worker"],
        ["trainer"],
    ]


def test_cpu_variant_builds_a_separate_cpu_image() -> None:
    base, cpu = base_config()["services"], cpu_config()["services"]
    for name in DENSEALIGN_SERVICES:
        assert cpu[name]["image"] != base[name]["image"]
        args = cpu[name]["build"]["args"]
        assert args["BASE_IMAGE"].startswith("python:3.11")
        assert args["TORCH_INDEX_URL"].rstrip("/").endswith("/cpu")
    declared_args = set(re.findall(r"^ARG\s+([A-Z_]+)", DOCKERFILE.read_text(), re.M))
    for name in DENSEALIGN_SERVICES:
        assert set(cpu[name]["build"]["args"]) <= declared_args


def test_depends_on_targets_exist(config: dict[str, Any]) -> None:
    services = config["services"]
    for name, service in services.items():
        for target in service.get("depends_on", {}):
            assert target in services, f"{name} depends on unknown service {target}"
            assert target != name


def test_named_volumes_are_declared_and_used(config: dict[str, Any]) -> None:
    declared = set(config.get("volumes") or {})
    used: set[str] = set()
    for name, service in config["services"].items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0] if isinstance(mount, str) else mount.get("source", "")
            if source and not source.startswith((".", "/", "~", "$")):
                assert source in declared, f"{name} mounts undeclared volume {source}"
                used.add(source)
    assert used == declared, f"declared but unused: {declared - used}"
    assert {"pgdata", "blobs", "hf-cache"} <= declared


def test_migrate_gates_app_worker_and_trainer(config: dict[str, Any]) -> None:
    services = config["services"]
    migrate = services["migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["db"]["condition"] == "service_healthy"
    for name in LONG_RUNNING:
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["db"]["condition"] == "service_healthy", name
        assert deps["redis"]["condition"] == "service_healthy", name


def test_health_checks_and_restart_policies(config: dict[str, Any]) -> None:
    services = config["services"]
    assert "pg_isready" in " ".join(services["db"]["healthcheck"]["test"])
    assert services["redis"]["healthcheck"]["test"][-1] == "ping"
    app = services["app"]
    assert "http://127.0.0.1:8000/api/v1/health" in " ".join(app["healthcheck"]["test"])
    assert app["healthcheck"].get("disable") is not True
    assert [p.rsplit(":", 1)[1] for p in app["ports"]] == ["8000"]
    assert service_env(app)["DENSEALIGN_PORT"] == "8000"
    # The one-shot migration serves no HTTP: the image's app HEALTHCHECK must not mark it unhealthy.
    assert services["migrate"]["healthcheck"] == {"disable": True}
    for name in ("db", "redis", *LONG_RUNNING):
        assert services[name]["restart"] == "unless-stopped", name


def test_worker_and_trainer_report_health_by_heartbeat(config: dict[str, Any]) -> None:
    from core.db.models import PROCESS_ROLES
    from densealign.cli import COMMANDS

    assert COMMANDS["health"][0] == "core.health"
    services = config["services"]
    for role in GPU_SERVICES:
        check = services[role]["healthcheck"]
        assert role in PROCESS_ROLES
        # Default --max-age (60 s): a process that stopped beating for a minute is unhealthy.
        assert check["test"] == ["CMD", "densealign", "health", "--role", role], role
        assert "disable" not in check, role
        assert set(check) >= {"interval", "timeout", "retries", "start_period"}, role
        # Each probe starts a Python process: not too often, with time to import on a busy host.
        assert seconds(check["interval"]) >= 15 and seconds(check["timeout"]) >= 10, role
        assert seconds(check["timeout"]) < seconds(check["interval"]), role
    # Health is a heartbeat at most 60 s old; the default period leaves several beats of slack.
    assert Settings().heartbeat_seconds * 3 <= 60


def test_worker_start_period_covers_loading_the_model() -> None:
    base, cpu = base_config()["services"], cpu_config()["services"]
    # SD 1.5's first download into the hf-cache volume; the shipped CPU model loads in seconds.
    assert seconds(base["worker"]["healthcheck"]["start_period"]) >= 180
    assert seconds(cpu["worker"]["healthcheck"]["start_period"]) >= 30


def test_gpu_reservations_in_base_and_none_on_cpu() -> None:
    base, cpu = base_config()["services"], cpu_config()["services"]
    for name in GPU_SERVICES:
        assert gpu_devices(base[name]) == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}], name
    for name, service in base.items():
        if name not in GPU_SERVICES:
            assert gpu_devices(service) == [], f"{name} should not reserve a GPU"
    for name, service in cpu.items():
        assert gpu_devices(service) == [], f"{name} still reserves a GPU in the CPU variant"
        assert "gpus" not in service and "runtime" not in service
        env = service_env(service) if name in GPU_SERVICES else {}
        if name in GPU_SERVICES:
            assert env["DENSEALIGN_MODEL__DEVICE"] == "cpu"
            assert env["DENSEALIGN_MODEL__BASE_MODEL"] == SHIPPED_MODEL
            assert env["HF_HUB_OFFLINE"] == "1"


def test_shipped_model_path_is_in_the_image() -> None:
    dockerfile = DOCKERFILE.read_text()
    assert re.search(r"^WORKDIR /app$", dockerfile, re.M)
    assert re.search(r"^COPY \. /app$", dockerfile, re.M)
    ignored = [p for p in DOCKERIGNORE.read_text().split() if not p.startswith("#")]
    relative = SHIPPED_MODEL.removeprefix("/app/")
    for needed in (f"{relative}/model_index.json", "alembic.ini", "migrations/env.py", "densealign/cli.py"):
        assert not any(fnmatch(needed, p) or needed.startswith(p.rstrip("/") + "/") for p in ignored), needed
    for secret in (".env", ".git", ".venv"):
        assert secret in ignored
    if not (ROOT / "models").is_dir():
        pytest.skip("models/ is not in this checkout yet")
    assert (ROOT / relative / "model_index.json").is_file()


def test_worker_can_be_scaled(config: dict[str, Any]) -> None:
    worker = config["services"]["worker"]
    for key in ("container_name", "ports", "hostname"):
        assert key not in worker, f"worker.{key} stops `--scale worker=N`"


def test_blob_volume_is_shared_at_one_path(config: dict[str, Any]) -> None:
    services = config["services"]
    for name in LONG_RUNNING:
        blob_dir = service_env(services[name])["DENSEALIGN_BLOB_DIR"]
        assert f"blobs:{blob_dir}" in services[name]["volumes"], name
    dirs = {service_env(services[n])["DENSEALIGN_BLOB_DIR"] for n in LONG_RUNNING}
    assert dirs == {"/data/blobs"}


def test_services_reach_each_other_and_read_dot_env(config: dict[str, Any]) -> None:
    services = config["services"]
    for name in DENSEALIGN_SERVICES:
        env = service_env(services[name])
        assert env["DENSEALIGN_DATABASE_URL"].startswith("postgresql+psycopg://"), name
        assert "@db:5432/" in env["DENSEALIGN_DATABASE_URL"]
        assert env["DENSEALIGN_REDIS_URL"] == "redis://redis:6379/0"
        assert env["DENSEALIGN_HOST"] == "0.0.0.0"
        assert [e["path"] for e in services[name]["env_file"]] == [".env"]


def test_secrets_are_required_not_defaulted() -> None:
    text = BASE.read_text()
    required = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*):\?", text))
    assert required == {"POSTGRES_PASSWORD", "DENSEALIGN_SECRET_KEY"}
    for name in required:
        assert not re.search(rf"\$\{{{name}:?-", text), f"{name} must not get a default"


# --------------------------------------------------------------------------------------------------
# Settings names and .env.example
# --------------------------------------------------------------------------------------------------


def test_every_densealign_name_is_a_real_setting() -> None:
    names: set[str] = set()
    for path in (BASE, CPU, ENV_EXAMPLE, DOCKERFILE):
        # Every mention, comments included; `DENSEALIGN_DPO__<FIELD>` in prose is a pattern, not a name.
        names |= set(re.findall(r"\bDENSEALIGN_[A-Z0-9_]+\b(?!<)", path.read_text()))
    for build in (base_config, cpu_config):
        for service in build()["services"].values():
            names |= {k for k in service_env(service) if k.startswith("DENSEALIGN_")}
    assert names, "no DENSEALIGN_ names found"
    assert names - SETTINGS == set()


def test_env_example_documents_every_setting_once() -> None:
    assigned = [name for _, name, _ in env_example_lines()]
    documented = [name for name in assigned if name.startswith("DENSEALIGN_")]
    assert sorted(set(documented)) == sorted(SETTINGS)
    assert len(documented) == len(set(documented)), "a setting appears twice"
    # Each setting line follows a comment that describes it.
    lines = ENV_EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        m = _ASSIGNMENT.match(line)
        if m and m.group(2) in SETTINGS:
            assert i > 0 and lines[i - 1].startswith("#") and not _ASSIGNMENT.match(lines[i - 1]), line


def test_env_example_defaults_parse_to_the_real_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("DENSEALIGN_"):
            monkeypatch.delenv(name)
    defaults = Settings().model_dump(mode="json")
    for commented, name, value in env_example_lines():
        if name.startswith("DENSEALIGN_") and commented and value != "":
            monkeypatch.setenv(name, value)
    assert Settings().model_dump(mode="json") == defaults
    # A commented-out empty value means "no value" and the default must be None.
    for commented, name, value in env_example_lines():
        if name in SETTINGS and value == "" and commented:
            path = name.removeprefix("DENSEALIGN_").lower().split("__")
            node: Any = defaults
            for part in path:
                node = node[part]
            assert node is None, name


def test_env_example_leaves_required_secrets_empty() -> None:
    uncommented = {name: value for commented, name, value in env_example_lines() if not commented}
    assert uncommented == {"POSTGRES_PASSWORD": "", "DENSEALIGN_SECRET_KEY": ""}


def test_compose_variables_are_documented() -> None:
    documented = {name for _, name, _ in env_example_lines()}
    for path in (BASE, CPU):
        missing = interpolated_names(path.read_text()) - documented
        assert missing == set(), f"{path.name} uses undocumented variables {missing}"


# --------------------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_pins_torch_and_never_installs_torchvision() -> None:
    runs = [args for word, args in dockerfile_instructions() if word == "RUN"]
    installs = [cmd for run in runs for cmd in re.split(r"&&|;", run) if "pip install" in cmd]
    assert any(TORCH_PIN in cmd and "--index-url" in cmd for cmd in installs)
    for cmd in installs:
        assert "torchvision" not in cmd
        for spec in re.findall(r"\btorch\b[^\s\"']*", cmd):
            assert spec == TORCH_PIN, f"unpinned or mispinned torch in: {cmd}"
    # The rest comes from pyproject.toml's pinned lists, constrained to the same torch.
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ml = project["optional-dependencies"]["ml"]
    assert TORCH_PIN in ml
    assert not any(dep.startswith("torchvision") for dep in project["dependencies"] + ml)
    assert 'echo "torch==2.13.0" > /tmp/constraints.txt' in DOCKERFILE.read_text()


def test_dockerfile_defaults_to_cuda_runtime_and_runs_as_a_user() -> None:
    instructions = dockerfile_instructions()
    args = dict(a.split("=", 1) for w, a in instructions if w == "ARG" and "=" in a)
    assert re.fullmatch(r"nvidia/cuda:12\.[\d.]+-cudnn-runtime-ubuntu22\.04", args["BASE_IMAGE"])
    assert re.search(r"/cu12\d$", args["TORCH_INDEX_URL"]), "the CUDA build of torch by default"
    froms = [a for w, a in instructions if w == "FROM"]
    assert froms[0].startswith("${BASE_IMAGE}")
    users = [a for w, a in instructions if w == "USER"]
    assert users and users[-1] not in ("root", "0")
    health = [a for w, a in instructions if w == "HEALTHCHECK"]
    assert len(health) == 1 and "/api/v1/health" in health[0]
    assert ("ENTRYPOINT", '["densealign"]') in instructions
    env = " ".join(a for w, a in instructions if w == "ENV")
    assert "HF_HOME=/cache/huggingface" in env and "HF_HUB_OFFLINE=${HF_HUB_OFFLINE}" in env
    cmd = json.loads(next(a for w, a in instructions if w == "CMD"))
    assert cmd == ["serve"]


# --------------------------------------------------------------------------------------------------
# What an operator's first `up` relies on
# --------------------------------------------------------------------------------------------------

BENCH_SD15 = ROOT / "bench" / "results" / "core-h100-sd15-fp16.json"
# The bench measured SD 1.5 in float16 on an H100; the shipped dtype is float32 (TF32 convolutions
# only), and an A100 is slower still. Conservative factors for one job at the shipped settings:
FP32_SLOWDOWN = 4.0
A100_SLOWDOWN = 2.0
# Measured: the worker container of the CPU override (2 pairs of the shipped model, 20 DDIM steps with
# guidance, one torch thread) on the project's 2-core host at a load of about 8, while the trainer
# trained next to it, took at most this long per job (README "Operating it").
CPU_JOB_PAIRS = 2
CPU_JOB_SECONDS = 12.0
# `densealign demo`'s pace (densealign/demo.py build_settings and its argparse defaults), which the CPU
# override ships for every DenseAlign service.
DEMO_PACE: dict[str, Any] = {
    "model.base_model": SHIPPED_MODEL,
    "model.device": "cpu",
    "model.lora_rank": 4,
    "sampler.num_steps": 20,
    "sampler.guidance_scale": 7.5,
    "pool.target_per_prompt": 2,
    "pool.tick_seconds": 5.0,
    "pool.pairs_per_job": CPU_JOB_PAIRS,
    "dpo.min_new_pairs": 48,
    "dpo.steps_per_round": 60,
    "dpo.lr": 1e-3,
    "dpo.clip": 1e-2,
    "dpo.beta": 3.0,
    "dpo.checkpoint_every": 10,
    "dpo.poll_seconds": 2.0,
}


SECRETS = {"POSTGRES_PASSWORD": "pw", "DENSEALIGN_SECRET_KEY": "k" * 32}


def settings_of(
    service: dict[str, Any], monkeypatch: pytest.MonkeyPatch, dot_env: dict[str, str]
) -> Settings:
    """The Settings a service's container reads, with `dot_env` (plus the two required secrets) as the
    .env file, which compose reads both to interpolate and as the env_file."""
    dot_env = SECRETS | dot_env
    for name in list(os.environ):
        if name.startswith("DENSEALIGN_"):
            monkeypatch.delenv(name)
    for name, value in dot_env.items():
        monkeypatch.setenv(name, value)
    for name, value in service_env(service).items():
        monkeypatch.setenv(name, interpolate(value, dot_env))
    return Settings()


def field(settings: Settings, dotted: str) -> Any:
    node: Any = settings.model_dump(mode="json")
    for part in dotted.split("."):
        node = node[part]
    return node


def test_interpolate_follows_compose() -> None:
    assert interpolate("${A:-x}") == "x"
    assert interpolate("${A:-x}", {"A": ""}) == "x"
    assert interpolate("${A-x}", {"A": ""}) == ""
    assert interpolate("a${A:-${B:-b}}c", {"B": "2"}) == "a2c"
    assert interpolate("${A:?set A}", {"A": "1"}) == "1"
    with pytest.raises(ValueError, match="set A"):
        interpolate("${A:?set A}", {"A": ""})
    assert seconds("1m30s") == 90 and seconds("5m") == 300 and seconds("15s") == 15


def test_cpu_override_runs_every_service_at_the_demo_pace(monkeypatch: pytest.MonkeyPatch) -> None:
    services = cpu_config()["services"]
    envs = [service_env(services[name]) for name in DENSEALIGN_SERVICES]
    # migrate records version 0 for the configured base model, the app tops the pool up: the same
    # settings everywhere, not only in worker and trainer.
    cpu_names = set(load(CPU)["x-cpu-settings"])
    for env in envs:
        assert {k: env[k] for k in cpu_names} == {k: envs[0][k] for k in cpu_names}
    for name in DENSEALIGN_SERVICES:
        settings = settings_of(services[name], monkeypatch, {})
        assert {key: field(settings, key) for key in DEMO_PACE} == DEMO_PACE, name
        assert field(settings, "model.dtype") == "float32"
    # The pace is a default that .env overrides; the model is fixed by the override.
    worker = settings_of(
        services["worker"],
        monkeypatch,
        {"DENSEALIGN_SAMPLER__NUM_STEPS": "30", "DENSEALIGN_MODEL__BASE_MODEL": "some/hub-model"},
    )
    assert worker.sampler.num_steps == 30
    assert worker.model.base_model == SHIPPED_MODEL


def test_cpu_override_gives_torch_one_thread_per_process() -> None:
    # Worker and trainer share the cores; with more busy threads than cores a 2-pair job went from 4 s
    # (1 thread) to 66 s (2 threads) on the 2-core host. .env may raise it.
    services = cpu_config()["services"]
    for name in GPU_SERVICES:
        threads = service_env(services[name])["OMP_NUM_THREADS"]
        assert interpolate(threads) == "1" and interpolate(threads, {"OMP_NUM_THREADS": "8"}) == "8"


def test_worker_grace_outlasts_one_gpu_job_at_the_shipped_settings() -> None:
    defaults = Settings()
    bench = json.loads(BENCH_SD15.read_text())
    assert bench["model"] == "sd15-random" and bench["dtype"] == "float16"
    assert defaults.model.dtype == "float32" and defaults.sampler.guidance_scale > 1  # as estimated
    per_image = bench["sampling"]["capture_s"] / bench["settings"]["batch"]
    per_image *= defaults.sampler.num_steps / bench["settings"]["steps"]
    job = per_image * 2 * defaults.pool.pairs_per_job * FP32_SLOWDOWN * A100_SLOWDOWN
    grace = seconds(base_config()["services"]["worker"]["stop_grace_period"])
    assert grace >= 2 * job, f"stop grace {grace:.0f}s < twice one job ({job:.0f}s)"
    assert grace <= 10 * 60, "a stuck job should not hold `down` for more than minutes"


def test_cpu_worker_grace_outlasts_one_cpu_job(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = cpu_config()["services"]["worker"]
    settings = settings_of(worker, monkeypatch, {})
    assert settings.pool.pairs_per_job == CPU_JOB_PAIRS  # the job that was measured
    grace = seconds(worker["stop_grace_period"])
    assert 2 * CPU_JOB_SECONDS <= grace < seconds(base_config()["services"]["worker"]["stop_grace_period"])


def test_trainer_grace_covers_one_step_and_a_checkpoint() -> None:
    # The trainer finishes the optimizer step in hand on SIGTERM, checkpoints and exits (seconds).
    base = seconds(base_config()["services"]["trainer"]["stop_grace_period"])
    cpu = seconds(cpu_config()["services"]["trainer"]["stop_grace_period"])
    assert 20 <= base <= 60
    assert 10 <= cpu <= base


def test_invite_links_follow_the_app_port(config: dict[str, Any]) -> None:
    services = config["services"]
    host_port = services["app"]["ports"][0].rsplit(":", 1)[0]
    assert interpolate(host_port, {"APP_PORT": "8301"}) == "8301"
    for name in DENSEALIGN_SERVICES:
        url = service_env(services[name])["DENSEALIGN_PUBLIC_BASE_URL"]
        assert interpolate(url) == "http://localhost:8000", name
        assert interpolate(url, {"APP_PORT": "8301"}) == "http://localhost:8301", name
        public = {"APP_PORT": "8301", "DENSEALIGN_PUBLIC_BASE_URL": "https://label.example.org"}
        assert interpolate(url, public) == "https://label.example.org", name


def test_redis_leaves_no_anonymous_volume(config: dict[str, Any]) -> None:
    # The redis image declares VOLUME /data: unless something is mounted there, Docker makes a new
    # anonymous volume for every container. Nothing is persisted (no RDB, no AOF), so a tmpfs.
    redis = config["services"]["redis"]
    mounted = set(redis.get("tmpfs", []))
    for mount in redis.get("volumes", []):
        mounted.add(mount.split(":")[1] if isinstance(mount, str) else mount["target"])
    assert "/data" in mounted
    assert redis["command"][redis["command"].index("--save") + 1] == ""
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "no"


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for word, args in dockerfile_instructions():
        if word == "FROM":
            current = stages.setdefault(args.split()[-1], [])
        current.append((word, args))
    return stages


def test_package_index_is_a_build_argument(config: dict[str, Any]) -> None:
    index_args = {"PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST"}
    stages = dockerfile_stages()
    # deps installs the dependencies; runtime's editable install fetches its build backend.
    for stage in ("deps", "runtime"):
        declared = {a.split("=")[0] for w, a in stages[stage] if w == "ARG"}
        assert index_args <= declared, stage
    # torch comes from TORCH_INDEX_URL alone: no extra index may offer another build of it.
    torch_run = next(a for w, a in stages["deps"] if w == "RUN" and TORCH_PIN in a)
    assert torch_run.startswith("PIP_EXTRA_INDEX_URL= pip install --index-url")
    for name in DENSEALIGN_SERVICES:
        args = config["services"][name]["build"]["args"]
        for arg in index_args:
            assert interpolate(args[arg]) == "", f"{name}: {arg} must default to empty (PyPI)"
            assert (
                interpolate(args[arg], {arg: "https://pypi.example/simple"}) == "https://pypi.example/simple"
            )
    # Nothing depends on the development sandbox.
    for path in (DOCKERFILE, BASE, CPU, ENV_EXAMPLE):
        text = path.read_text()
        assert "compose-sandbox" not in text and "8765" not in text, path.name


def test_the_s3_profile_serves_the_blob_url_the_env_names(config: dict[str, Any]) -> None:
    """`--profile s3`: MinIO with the AWS keys of .env as its root user, not published on the host,
    and a one-shot job that creates DENSEALIGN_BLOB_URL's bucket once MinIO is ready. Without the
    profile nothing changes: the DenseAlign services keep the shared `blobs` volume."""
    services = config["services"]
    minio, bucket = services["minio"], services["minio-bucket"]
    assert "ports" not in minio and minio["command"][0] == "server"
    assert service_env(minio) == {
        "MINIO_ROOT_USER": "${AWS_ACCESS_KEY_ID:-}",
        "MINIO_ROOT_PASSWORD": "${AWS_SECRET_ACCESS_KEY:-}",
    }
    assert "s3data:/data" in minio["volumes"] and minio["healthcheck"]["test"] == [
        "CMD",
        "mc",
        "ready",
        "local",
    ]
    assert bucket["depends_on"] == {"minio": {"condition": "service_healthy"}} and bucket["restart"] == "no"
    assert [e["path"] for e in bucket["env_file"]] == [".env"]
    script = bucket["command"][0]
    assert "http://minio:9000" in script and "mc mb --ignore-existing" in script
    # the shell, not compose, expands these: the bucket of s3://bucket/prefix, and the keys
    assert "$${DENSEALIGN_BLOB_URL#s3://}" in script and '"$$AWS_SECRET_ACCESS_KEY"' in script
    for name in DENSEALIGN_SERVICES:
        assert "minio" not in services[name].get("depends_on", {}), name
    documented = {name for _, name, _ in env_example_lines()}
    assert {
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
    } <= documented
