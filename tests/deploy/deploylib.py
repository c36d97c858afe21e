"""The deployment files' paths, the facts they are checked against (the parts' settings and
the environment each part reads) and a reader for compose files, shared by the tests/deploy
suite; the image's build files are read in imagelib.py and kustomize's output in kustomize.py.

Docker and a cluster are not available where the tests run, so these read the files the way
the tools do, in the small subset of each format that the repository uses, and refuse what
they do not understand rather than guess.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

REPO = Path(__file__).resolve().parent.parent.parent
DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
ENTRYPOINT = DOCKER / "entrypoint.sh"
COMPOSE = DOCKER / "docker-compose.yml"
COMPOSE_GPU = DOCKER / "docker-compose.gpu.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERIGNORE = REPO / ".dockerignore"

# The parts the image's entrypoint runs, by the word that selects them.
PARTS = ("admin", "model-server", "frontend", "saxutil", "migrate")
SERVING_PARTS = ("admin", "model-server", "frontend")
IMAGE_ENTRYPOINT = "saxplane-entrypoint"


# -- the parts' settings: the facts deployments must agree with ------------------------------

class _Recorder(dict):
    """An empty environment that remembers every name looked up in it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.names.add(key)
        return default

    def __getitem__(self, key: str) -> Any:
        self.names.add(key)
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        self.names.add(str(key))
        return False


@dataclass(frozen=True)
class Part:
    name: str
    env: frozenset[str]               # variables the part reads
    port_env: str | None = None       # the variable that sets its listen port
    default_port: int | None = None   # its port when nothing is set


def _settings_class(part: str) -> Any:
    if part == "admin":
        from admin_server.settings import AdminSettings
        return AdminSettings
    if part == "model-server":
        from model_server.settings import ModelServerSettings
        return ModelServerSettings
    if part == "frontend":
        from http_frontend.settings import FrontendSettings
        return FrontendSettings
    raise KeyError(part)


def _cli_env() -> set[str]:
    """Variables `saxutil` reads: its click options' envvars and the client library's."""
    import click

    from saxutil.__main__ import main

    names: set[str] = set()

    def walk(cmd: click.Command) -> None:
        for p in cmd.params:
            envvar = getattr(p, "envvar", None)
            if envvar:
                names.update([envvar] if isinstance(envvar, str) else envvar)
        for sub in getattr(cmd, "commands", {}).values():
            walk(sub)

    walk(main)
    for src in (REPO / "client").glob("*.py"):
        names.update(re.findall(r"os\.environ\.get\(\s*[\"'](SAX_[A-Z0-9_]+)[\"']", src.read_text()))
    return names


# Variables read by libraries under a part (google-cloud-storage, Hugging Face, JAX), by the
# entrypoint, or used only to build other values in Kubernetes ($(POD_NAME) expansion).
LIBRARY_ENV = {
    "admin": {"STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT", "GOOGLE_APPLICATION_CREDENTIALS"},
    "model-server": {"STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT", "GOOGLE_APPLICATION_CREDENTIALS",
                     "HF_HOME", "HF_HUB_OFFLINE", "JAX_PLATFORMS", "XLA_FLAGS"},
    "frontend": {"PROMETHEUS_MULTIPROC_DIR"},
    "saxutil": set(),
    "migrate": set(),
}
ENTRYPOINT_ENV = {"SAX_HEALTH_FILE", "SAX_HEALTH_TIMEOUT"}
K8S_HELPER_ENV = {"POD_NAME", "POD_NAMESPACE", "POD_IP"}


def part(name: str) -> Part:
    if name in ("saxutil", "migrate"):
        return Part(name, frozenset(_cli_env()))
    cls = _settings_class(name)
    rec = _Recorder()
    cls.from_env(env=rec)
    default_port = cls().port
    port_env = None
    for var in sorted(rec.names):
        try:
            if cls.from_env(env={var: "12345"}).port == 12345:
                port_env = var
        except Exception:  # a variable that does not take a number
            pass
    return Part(name, frozenset(rec.names), port_env, default_port)


def allowed_env(part_name: str) -> set[str]:
    return set(part(part_name).env) | LIBRARY_ENV[part_name] | ENTRYPOINT_ENV


def jax_flavours() -> dict[str, Any]:
    """docker/requirements.py's JAX flavours (the Dockerfile's JAX_FLAVOR values)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_docker_requirements", DOCKER / "requirements.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return dict(mod.FLAVOURS)


def entrypoint_parts() -> dict[str, list[str]]:
    """The entrypoint's `case` patterns: word -> the command line it runs (from the script)."""
    text = ENTRYPOINT.read_text()
    out: dict[str, list[str]] = {}
    for m in re.finditer(r"^\s{2}([a-z|_-]+)\)\s*\n(.*?);;", text, re.M | re.S):
        execs = re.findall(r"^\s*exec (.+)$", m.group(2), re.M)
        try:
            argv = shlex.split(execs[0]) if execs else []
        except ValueError:  # a multi-line argument (the healthcheck's script)
            argv = execs[0].split()
        for word in m.group(1).split("|"):
            out[word] = argv
    return out


# -- .env files and compose-style interpolation ----------------------------------------------

def read_env_file(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not KEY=VALUE: {line!r}"
        out[key.strip()] = value.strip()
    return out


_VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: str, env: Mapping[str, str], used: set[str] | None = None) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?err}`, `$VAR`, `$$`."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        if used is not None:
            used.add(name)
        op, arg = m.group(2), m.group(3)
        have = env.get(name)
        if op == ":-":
            return have if have else interpolate(arg, env, used)
        if op == "-":
            return have if have is not None else interpolate(arg, env, used)
        if op in (":?", "?"):
            if not have:
                raise ValueError(f"required variable {name} is not set: {arg}")
            return have
        return have or ""
    return _VAR.sub(sub, value)


def referenced_vars(path: Path) -> set[str]:
    names: set[str] = set()
    interpolate(path.read_text(), {}, names)
    return names


def _interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate_tree(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate_tree(v, env) for v in node]
    if isinstance(node, str):
        return interpolate(node, env)
    return node


def load_compose(env: Mapping[str, str], *paths: Path) -> dict[str, Any]:
    """The compose model after YAML merge keys, interpolation and merging override files."""
    merged: dict[str, Any] = {}
    for path in paths or (COMPOSE,):
        doc = _interpolate_tree(yaml.safe_load(path.read_text()), env)
        merged = _deep_merge(merged, doc)
    return merged


def _deep_merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _deep_merge(base[k], v) if k in base else v
        return out
    return over


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def depends_on(service: Mapping[str, Any]) -> dict[str, str]:
    dep = service.get("depends_on") or {}
    if isinstance(dep, list):
        return {name: "service_started" for name in dep}
    return {name: (cond or {}).get("condition", "service_started") for name, cond in dep.items()}


def start_order(services: Mapping[str, Any], names: Iterable[str]) -> list[str]:
    """Services in an order where each comes after what it depends on (as `up` starts them)."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        assert name not in visiting, f"dependency cycle through {name}"
        visiting.add(name)
        for dep in depends_on(services[name]):
            assert dep in services, f"{name} depends on unknown service {dep}"
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for name in names:
        visit(name)
    return order


def parse_port(spec: Any) -> tuple[int | None, int]:
    """A compose `ports:` entry -> (host port, container port)."""
    if isinstance(spec, dict):
        return (int(spec["published"]) if spec.get("published") else None), int(spec["target"])
    parts = str(spec).split("/")[0].split(":")
    if len(parts) == 1:
        return None, int(parts[0])
    return int(parts[-2]), int(parts[-1])


def parse_volume(spec: Any) -> tuple[str, str, bool]:
    """A compose `volumes:` entry -> (source, target, read_only)."""
    if isinstance(spec, dict):
        return spec.get("source", ""), spec["target"], bool(spec.get("read_only"))
    parts = str(spec).split(":")
    if len(parts) == 1:
        return "", parts[0], False
    return parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")


# -- the compose project: its services and the parts they run --------------------------------

INFRA = {"postgres", "gcs"}
MONITORING = {"prometheus", "grafana"}  # profile `monitoring`


def part_of(service: dict[str, Any]) -> str:
    """The part a Saxplane service runs: the entrypoint's first argument."""
    entry = service.get("entrypoint") or [IMAGE_ENTRYPOINT]
    argv = list(entry) + list(service.get("command") or [])
    assert argv[0] == IMAGE_ENTRYPOINT, argv
    return argv[1]


def saxplane_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run the image (not the infrastructure or monitoring)."""
    return {n: s for n, s in compose["services"].items() if n not in INFRA | MONITORING}


def listen_port(part_name: str, env: dict[str, str]) -> int:
    """The port a serving part listens on under `env` (its setting, else its default)."""
    p = part(part_name)
    assert p.port_env and p.default_port
    return int(env.get(p.port_env) or p.default_port)


def _gcs_command(gcs: dict[str, Any]) -> str:
    return " ".join(gcs.get("command") if isinstance(gcs.get("command"), list) else [gcs["command"]])


def gcs_bucket(gcs: dict[str, Any]) -> str:
    """The bucket the `gcs` service creates (a folder under its filesystem root, on a volume)."""
    cmd = interpolate(_gcs_command(gcs), environment(gcs))  # the shell's expansion
    root = re.search(r"-filesystem-root (\S+)", cmd).group(1)
    assert "-scheme http" in cmd and "-backend filesystem" in cmd, cmd
    m = re.search(r"mkdir -p \"?%s/([a-z0-9][a-z0-9._-]*)\"?" % re.escape(root), cmd)
    assert m, f"the gcs service creates no bucket folder under {root}: {cmd}"
    assert any(parse_volume(v)[1] == root for v in gcs["volumes"]), "objects on a volume"
    return m.group(1)


def gcs_port(gcs: dict[str, Any]) -> int:
    return int(re.search(r"-port (\d+)", _gcs_command(gcs)).group(1))
