"""Readers for the deployment files (Dockerfile, .dockerignore, compose, kustomize) and the
facts they are checked against (the parts' settings), shared by the tests/deploy suite.

Docker and a cluster are not available where the tests run, so these read the files the way
the tools do, in the small subset of each format that the repository uses, and refuse what
they do not understand rather than guess.
"""
from __future__ import annotations

import base64
import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
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
K8S = REPO / "deploy" / "k8s"

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


# -- Dockerfile ------------------------------------------------------------------------------

@dataclass
class Instruction:
    cmd: str
    args: str
    flags: dict[str, str] = field(default_factory=dict)

    def exec_form(self) -> list[str] | None:
        text = self.args.strip()
        if text.startswith("["):
            return json.loads(text)
        return None


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, cmd: str) -> list[Instruction]:
        return [i for i in self.instructions if i.cmd == cmd]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for i in self.all("ENV"):
            out.update(parse_env_instruction(i.args))
        return out

    def args_(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for i in self.all("ARG"):
            k, sep, v = i.args.strip().partition("=")
            out[k] = v if sep else None
        return out


def parse_env_instruction(args: str) -> dict[str, str]:
    tokens = shlex.split(args)
    if tokens and "=" not in tokens[0]:  # legacy `ENV KEY value`
        return {tokens[0]: " ".join(tokens[1:])}
    return dict(t.split("=", 1) for t in tokens)


def parse_dockerfile(path: Path = DOCKERFILE) -> tuple[dict[str, str | None], list[Stage]]:
    """(global ARGs, stages). Line continuations and comments as Docker reads them."""
    lines: list[str] = []
    buf = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") and not buf:
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        buf += raw
        if buf.strip():
            lines.append(buf.strip())
        buf = ""
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for line in lines:
        cmd, _, rest = line.partition(" ")
        cmd = cmd.upper()
        flags: dict[str, str] = {}
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            k, _, v = flag[2:].partition("=")
            flags[k] = v
            rest = rest.lstrip()
        if cmd == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?$", rest, re.I)
            assert m, f"FROM: {rest!r}"
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda v: global_args.get(v.group(1) or v.group(2)) or "",
                          m.group(1))
            stages.append(Stage(base, m.group(2)))
        elif not stages:
            assert cmd == "ARG", f"{cmd} before the first FROM"
            k, sep, v = rest.partition("=")
            global_args[k] = v if sep else None
        else:
            stages[-1].instructions.append(Instruction(cmd, rest, flags))
    return global_args, stages


def copy_sources(inst: Instruction) -> tuple[list[str], str]:
    form = inst.exec_form()
    items = form if form is not None else shlex.split(inst.args)
    return items[:-1], items[-1]


# -- .dockerignore ---------------------------------------------------------------------------

def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            j = pattern.index("]", i)
            out += "[" + pattern[i + 1:j].replace("!", "^", 1) + "]"
            i = j
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + "$")


def dockerignore_rules(path: Path = DOCKERIGNORE) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = os.path.normpath(line[1:] if negate else line).lstrip("/")
        rules.append((negate, _pattern_regex(pat)))
    return rules


def is_ignored(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents decides."""
    parts = rel.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for negate, rx in rules:
        if any(rx.match(c) for c in candidates):
            ignored = not negate
    return ignored


def build_context(dest: Path) -> list[str]:
    """Copies the repository into `dest` as `docker build .` would send it; returns the files."""
    rules = dockerignore_rules()
    files = []
    for root, dirs, names in os.walk(REPO):
        rel_root = os.path.relpath(root, REPO)
        dirs[:] = [d for d in dirs if d != ".git"]
        for n in names:
            rel = os.path.normpath(os.path.join(rel_root, n))
            if is_ignored(rel, rules):
                continue
            files.append(rel)
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    return sorted(files)


# -- kustomize -------------------------------------------------------------------------------

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                  "PriorityClass", "CustomResourceDefinition"}
# Strategic merge keys of the lists the overlays may touch.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "volumeClaimTemplates": None}
_SUPPORTED = {"apiVersion", "kind", "namespace", "resources", "patches", "secretGenerator",
              "generatorOptions", "images"}


def kubectl_available() -> bool:
    return shutil.which("kubectl") is not None or shutil.which("kustomize") is not None


def render_kubectl(kdir: Path) -> list[dict[str, Any]]:
    if shutil.which("kubectl"):
        args = ["kubectl", "kustomize", str(kdir)]
    else:
        args = ["kustomize", "build", str(kdir)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _smerge(base: dict[str, Any], patch: dict[str, Any]) -> None:
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _smerge(base[k], v)
        elif isinstance(v, list) and MERGE_KEYS.get(k) and isinstance(base.get(k), list):
            key = MERGE_KEYS[k]
            for item in v:
                match = next((b for b in base[k] if b.get(key) == item.get(key)), None)
                if match is None:
                    base[k].append(copy.deepcopy(item))
                else:
                    _smerge(match, item)
        else:
            base[k] = copy.deepcopy(v)


def render_fallback(kdir: Path) -> list[dict[str, Any]]:
    """kustomize's result for the features used here: resources (files, bases), namespace,
    secretGenerator from env files without a hash suffix, and strategic-merge patches."""
    k = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    unknown = set(k) - _SUPPORTED
    assert not unknown, f"{kdir}: the fallback renderer does not know {sorted(unknown)}"
    docs: list[dict[str, Any]] = []
    for res in k.get("resources", []):
        p = kdir / res
        if p.is_dir():
            docs += render_fallback(p)
        else:
            docs += [d for d in yaml.safe_load_all(p.read_text()) if d]
    if k.get("secretGenerator"):
        assert (k.get("generatorOptions") or {}).get("disableNameSuffixHash"), "hash suffixes not supported"
    for gen in k.get("secretGenerator", []):
        data: dict[str, str] = {}
        for f in gen.get("envs", []):
            data.update(read_env_file(kdir / f))
        for lit in gen.get("literals", []):
            key, _, value = lit.partition("=")
            data[key] = value
        docs.append({"apiVersion": "v1", "kind": "Secret", "type": gen.get("type", "Opaque"),
                     "metadata": {"name": gen["name"]},
                     "data": {key: base64.b64encode(v.encode()).decode() for key, v in data.items()}})
    for patch in k.get("patches", []):
        assert set(patch) == {"path"}, f"only file patches are supported: {patch}"
        pdoc = yaml.safe_load((kdir / patch["path"]).read_text())
        targets = [d for d in docs if d["kind"] == pdoc["kind"]
                   and d["metadata"]["name"] == pdoc["metadata"]["name"]]
        assert len(targets) == 1, f"patch {patch['path']} matches {len(targets)} resources"
        if pdoc.get("$patch") == "delete":  # the whole resource goes
            docs.remove(targets[0])
            continue
        _smerge(targets[0], {key: v for key, v in pdoc.items() if key not in ("apiVersion", "kind")})
    for img in k.get("images", []):  # `kustomize edit set image NAME=NEW_NAME[:TAG]`
        for d in docs:
            spec = pod_spec(d)
            for c in (spec.get("initContainers", []) + spec["containers"]) if spec else []:
                name, _, tag = c["image"].partition(":")
                if name == img["name"]:
                    c["image"] = img.get("newName", name) + (f":{img.get('newTag', tag)}" if img.get("newTag", tag)
                                                             else "")
    if k.get("namespace"):
        for d in docs:
            if d["kind"] not in CLUSTER_SCOPED:
                d["metadata"]["namespace"] = k["namespace"]
    return docs


def render(kdir: Path) -> list[dict[str, Any]]:
    return render_kubectl(kdir) if kubectl_available() else render_fallback(kdir)


def normalized(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Documents by (kind, name), with Secret data decoded (encodings differ in line wrapping)."""
    out = {}
    for d in docs:
        d = copy.deepcopy(d)
        if d["kind"] == "Secret":
            d["data"] = {k: base64.b64decode("".join(v.split())).decode() for k, v in (d.get("data") or {}).items()}
        out[(d["kind"], d["metadata"]["name"])] = d
    return out


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return doc["spec"]["template"]["spec"]
    return None


def python() -> str:
    return sys.executable
