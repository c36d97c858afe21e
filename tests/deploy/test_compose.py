"""docker/docker-compose.yml, proven without Docker.

The static tests read the compose model (after `.env.example` interpolation) and hold it
against the parts' settings. The end-to-end test starts every Saxplane service's command as a
local process with that service's environment, in `depends_on` order (compose host names ->
127.0.0.1, container ports -> free local ports, container paths -> temporary folders; the local
PostgreSQL and gcp-storage-emulator stand in for the `postgres` and `gcs` services), then
follows the Saxml HTTP tutorial and the OpenAI SDK through the frontend, the way an operator
does after `docker compose up`.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import psycopg
import pytest
import requests

from tests.cluster import (PG_ADMIN_URL, TINY_OVERRIDES, Proc, create_bucket, free_port, gcs_emulator,
                           postgres_database, wait_until)
from tests.deploy import deploylib as dl

INFRA = {"postgres", "gcs"}
MONITORING = {"prometheus", "grafana"}  # profile `monitoring`
MODEL = "/sax/test/tiny"


@pytest.fixture(scope="module")
def dotenv() -> dict[str, str]:
    return dl.read_env_file(dl.ENV_EXAMPLE)


@pytest.fixture(scope="module")
def compose(dotenv: dict[str, str]) -> dict[str, Any]:
    return dl.load_compose(dotenv)


def _part_of(service: dict[str, Any]) -> str:
    """The part a Saxplane service runs: the entrypoint's first argument."""
    entry = service.get("entrypoint") or [dl.IMAGE_ENTRYPOINT]
    argv = list(entry) + list(service.get("command") or [])
    assert argv[0] == dl.IMAGE_ENTRYPOINT, argv
    return argv[1]


def _saxplane_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if n not in INFRA | MONITORING}


def _listen_port(part: str, env: dict[str, str]) -> int:
    p = dl.part(part)
    assert p.port_env and p.default_port
    return int(env.get(p.port_env) or p.default_port)


# -- the compose model, statically ------------------------------------------------------------

def test_services_images_and_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "gcs", "migrate", "admin", "model-server-1", "model-server-2",
                             "frontend", "saxutil", "prometheus", "grafana"}
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["gcs"]["image"].startswith("fsouza/fake-gcs-server:")
    for name in INFRA:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} needs a health check"
        assert any(dl.parse_volume(v)[0] for v in services[name].get("volumes", [])), f"{name}: data volume"
    image = {s["image"] for s in _saxplane_services(compose).values()}
    assert len(image) == 1, "one image for every part"
    for name, s in _saxplane_services(compose).items():
        assert s["build"]["dockerfile"] == "docker/Dockerfile"
        assert (dl.DOCKER / s["build"]["context"]).resolve() == dl.REPO
        assert s["build"]["args"]["JAX_FLAVOR"] == "cpu"
        assert _part_of(s) in dl.PARTS, name
    parts = {n: _part_of(s) for n, s in _saxplane_services(compose).items()}
    assert parts == {"migrate": "migrate", "admin": "admin", "model-server-1": "model-server",
                     "model-server-2": "model-server", "frontend": "frontend", "saxutil": "saxutil"}
    dep = {n: dl.depends_on(s) for n, s in services.items()}
    assert dep["migrate"] == {"postgres": "service_healthy"}
    assert dep["admin"] == {"migrate": "service_completed_successfully", "gcs": "service_healthy"}
    for n in ("model-server-1", "model-server-2", "frontend", "saxutil"):
        assert dep[n] == {"admin": "service_healthy"}, n
    assert services["saxutil"].get("profiles") == ["tools"], "saxutil is a tool, not started by `up`"
    assert services["migrate"].get("restart") == "no"
    # Every part that is waited on as healthy has a health check that asks its /healthz.
    for n, s in _saxplane_services(compose).items():
        if _part_of(s) in dl.SERVING_PARTS:
            assert s["healthcheck"]["test"] == ["CMD", dl.IMAGE_ENTRYPOINT, "healthcheck"], n
    dl.start_order(services, services)  # no cycles, nothing unknown


def test_environment_names_ports_and_flags(compose: dict[str, Any]) -> None:
    import click

    import admin_server.__main__ as admin_main
    import http_frontend.__main__ as frontend_main
    import model_server.__main__ as model_main
    from saxutil.__main__ import main as saxutil_main

    clis = {"admin": admin_main.main, "model-server": model_main.main, "frontend": frontend_main.main}
    for name, s in _saxplane_services(compose).items():
        part = _part_of(s)
        env = dl.environment(s)
        unknown = set(env) - dl.allowed_env(part)
        assert not unknown, f"{name}: {sorted(unknown)} are read by no {part} setting"
        argv = (list(s.get("entrypoint") or [dl.IMAGE_ENTRYPOINT]) + list(s.get("command") or []))[2:]
        if part in clis:  # the flags after the part word parse as that part's options
            clis[part].make_context(part, argv)
        else:  # saxutil's subcommand exists and takes these arguments
            argv = ["migrate", *argv] if part == "migrate" else argv
            ctx = saxutil_main.make_context("saxutil", list(argv), resilient_parsing=True)
            sub_name, sub, rest = saxutil_main.resolve_command(ctx, list(argv))
            assert isinstance(sub, click.Command), argv
            sub.make_context(sub_name, rest, parent=ctx, resilient_parsing=True)
            if part == "migrate":
                assert env.get("SAX_DB_URL"), "saxutil migrate needs SAX_DB_URL"
        if part in dl.SERVING_PARTS:
            port = _listen_port(part, env)
            assert port == dl.part(part).default_port, f"{name} listens on {port}"
            for spec in s.get("ports", []):
                host, target = dl.parse_port(spec)
                assert target == port, f"{name}: publishes container port {target}, listens on {port}"
    assert [dl.parse_port(p) for p in compose["services"]["frontend"]["ports"]] == [(8888, 8888)]
    # Model servers advertise their own compose name and port; everyone finds the admin by its name.
    admin_port = _listen_port("admin", dl.environment(compose["services"]["admin"]))
    for name in ("model-server-1", "model-server-2"):
        env = dl.environment(compose["services"][name])
        assert env["SAX_ADVERTISE"] == f"{name}:{_listen_port('model-server', env)}"
        assert env["SAX_ADMIN"] == f"admin:{admin_port}"
    for name in ("frontend", "saxutil"):
        assert dl.environment(compose["services"][name])["SAX_ADMIN"] == f"admin:{admin_port}"


def test_state_database_blob_store_and_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    pg = dl.environment(services["postgres"])
    for name in ("migrate", "admin"):
        url = urllib.parse.urlsplit(dl.environment(services[name])["SAX_DB_URL"])
        assert url.scheme == "postgresql+psycopg", url
        assert (url.hostname, url.port or 5432, url.username, url.password, url.path.strip("/")) == (
            "postgres", 5432, pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"])
    admin = dl.environment(services["admin"])
    bucket = _gcs_bucket(services["gcs"])
    assert admin["SAX_ROOT"] == f"gs://{bucket}", "the admin's root is the bucket the emulator creates"
    assert admin["STORAGE_EMULATOR_HOST"] == f"http://gcs:{_gcs_port(services['gcs'])}"
    for name in ("model-server-1", "model-server-2"):
        s = services[name]
        env = dl.environment(s)
        vols = [dl.parse_volume(v) for v in s["volumes"]]
        named = {target: src for src, target, _ in vols if src in compose["volumes"]}
        assert env["SAX_COMPILATION_CACHE"] in named, "the XLA cache lives on a volume"
        binds = [(src, target, ro) for src, target, ro in vols if src.startswith((".", "/"))]
        assert binds == [("../checkpoints", "/checkpoints", True)], binds


def test_monitoring_profile_scrapes_every_part_and_provisions_the_dashboard(compose: dict[str, Any]) -> None:
    import json

    import yaml

    services = compose["services"]
    for name in MONITORING:
        assert services[name].get("profiles") == ["monitoring"], f"{name} starts only with --profile monitoring"

    def mounted(service: str, target: str) -> Path:
        (src,) = [src for src, tgt, _ in map(dl.parse_volume, services[service]["volumes"]) if tgt == target]
        path = (dl.DOCKER / src).resolve()
        assert path.exists(), f"{service}: {src} is missing"
        return path

    # Prometheus scrapes each serving part on the port that part listens on in the compose file.
    prom = yaml.safe_load(mounted("prometheus", "/etc/prometheus/prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    expected = {f"{n}:{_listen_port(_part_of(s), dl.environment(s))}"
                for n, s in _saxplane_services(compose).items() if _part_of(s) in dl.SERVING_PARTS}
    assert targets == expected
    prom_port = int(re.search(r"--web.listen-address=:(\d+)", " ".join(services["prometheus"]["command"])).group(1))
    # Grafana: the datasource is that Prometheus, the dashboard is provisioned from its mount.
    prov = mounted("grafana", "/etc/grafana/provisioning")
    (ds,) = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == f"http://prometheus:{prom_port}" and ds["isDefault"]
    (provider,) = yaml.safe_load((prov / "dashboards" / "saxplane.yml").read_text())["providers"]
    dash_target = f"{provider['options']['path']}/saxplane-cell.json"
    dash = json.loads(mounted("grafana", dash_target).read_text())
    assert dash["uid"] == "saxplane-cell" and dash["panels"]
    home = dl.environment(services["grafana"])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == dash_target


def test_env_example_documents_every_variable(dotenv: dict[str, str]) -> None:
    used = dl.referenced_vars(dl.COMPOSE) | dl.referenced_vars(dl.COMPOSE_GPU)  # `$$X` is the shell's
    assert used - set(dotenv) == set(), f"not in .env.example: {sorted(used - set(dotenv))}"
    unused = set(dotenv) - used - {"COMPOSE_PROJECT_NAME"}  # read by compose itself
    assert unused == set(), f"unused in the compose files: {sorted(unused)}"
    # .env.example shows the defaults: the cell is the same with and without it.
    assert dl.load_compose(dotenv) == dl.load_compose({})


def test_gpu_override_only_adds_devices(dotenv: dict[str, str]) -> None:
    import yaml

    over = yaml.safe_load(dl.COMPOSE_GPU.read_text())
    base = dl.load_compose(dotenv)
    assert set(over["services"]) == {"model-server-1", "model-server-2"}
    merged = dl.load_compose(dotenv, dl.COMPOSE, dl.COMPOSE_GPU)
    for name in over["services"]:
        devices = merged["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
        assert {k: v for k, v in merged["services"][name].items() if k != "deploy"} == base["services"][name]


def _gcs_command(gcs: dict[str, Any]) -> str:
    return " ".join(gcs.get("command") if isinstance(gcs.get("command"), list) else [gcs["command"]])


def _gcs_bucket(gcs: dict[str, Any]) -> str:
    cmd = dl.interpolate(_gcs_command(gcs), dl.environment(gcs))  # the shell's expansion
    root = re.search(r"-filesystem-root (\S+)", cmd).group(1)
    assert "-scheme http" in cmd and "-backend filesystem" in cmd, cmd
    m = re.search(r"mkdir -p \"?%s/([a-z0-9][a-z0-9._-]*)\"?" % re.escape(root), cmd)
    assert m, f"the gcs service creates no bucket folder under {root}: {cmd}"
    assert any(dl.parse_volume(v)[1] == root for v in gcs["volumes"]), "objects on a volume"
    return m.group(1)


def _gcs_port(gcs: dict[str, Any]) -> int:
    return int(re.search(r"-port (\d+)", _gcs_command(gcs)).group(1))


# -- the cell, end to end ---------------------------------------------------------------------

def _map_path(value: str, paths: list[tuple[str, str]]) -> str:
    for prefix, local in paths:  # longest prefix first; "/" (the container's filesystem) last
        p = prefix.rstrip("/")
        if value == prefix or value.startswith(p + "/"):
            rest = value[len(p):].lstrip("/")
            return os.path.join(local, rest) if rest else local
    return value


class ServiceProc(Proc):
    """A compose service as a local process: its environment only (no SAX_* leaking in)."""

    def start(self) -> "ServiceProc":
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("SAX_", "STORAGE_EMULATOR_HOST", "POSTGRES_"))}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, env={**base, "PYTHONUNBUFFERED": "1", **self.env},
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=self.cwd,
                                     start_new_session=True)
        return self


@dataclass
class LocalCell:
    """The compose project mapped onto this machine."""
    compose: dict[str, Any]
    tmp: Path
    db_url: str
    gcs_host: str
    image_env: dict[str, str]
    ports: dict[tuple[str, int], int] = field(default_factory=dict)
    procs: dict[str, ServiceProc] = field(default_factory=dict)

    def __post_init__(self) -> None:
        gcs = self.compose["services"]["gcs"]
        self.ports[("gcs", _gcs_port(gcs))] = int(self.gcs_host.rsplit(":", 1)[1])
        self.ports[("postgres", 5432)] = 5432
        for name, s in _saxplane_services(self.compose).items():
            part = _part_of(s)
            if part in dl.SERVING_PARTS:
                self.ports[(name, _listen_port(part, dl.environment(s)))] = free_port()

    def url(self, service: str) -> str:
        (port,) = [p for (n, _), p in self.ports.items() if n == service]
        return f"http://127.0.0.1:{port}"

    def _paths(self, service: str, s: dict[str, Any]) -> list[tuple[str, str]]:
        """Container path prefixes -> local folders (longest first)."""
        out = []
        for src, target, _ in (dl.parse_volume(v) for v in s.get("volumes", [])):
            if target == "/var/cache/saxplane/xla":
                local = os.environ["SAX_COMPILATION_CACHE"]  # the session's warm XLA cache
            elif src in (self.compose.get("volumes") or {}):
                local = str(self.tmp / "volumes" / src)
            else:  # a bind mount: its host folder (a stand-in, not the repository's)
                local = str(self.tmp / "binds" / src.strip("./").replace("/", "_"))
            out.append((target, local))
        out.append(("/", str(self.tmp / "fs" / service) + "/"))  # the container's own filesystem
        return sorted(out, key=lambda t: -len(t[0]))

    def env(self, service: str) -> dict[str, str]:
        s = self.compose["services"][service]
        env = {**self.image_env, **dl.environment(s)}
        paths = self._paths(service, s)
        for k, v in list(env.items()):
            # compose host names -> 127.0.0.1 and their container ports -> local ports
            v = re.sub(r"\b([a-z][a-z0-9-]*):(\d+)\b",
                       lambda m: (f"127.0.0.1:{self.ports[(m.group(1), int(m.group(2)))]}"
                                  if (m.group(1), int(m.group(2))) in self.ports else m.group(0)), v)
            if v.startswith("postgresql"):
                v = self.db_url
            elif v.startswith("/") and not v.startswith("/sax/"):  # a container path (not a cell)
                v = _map_path(v, paths)
            env[k] = v
        for _, local in paths:
            Path(local).mkdir(parents=True, exist_ok=True)
        Path(env["SAX_HEALTH_FILE"]).parent.mkdir(parents=True, exist_ok=True)
        part = _part_of(s)
        if part in dl.SERVING_PARTS:
            port_env = dl.part(part).port_env
            env[port_env] = str(self.ports[(service, _listen_port(part, dl.environment(s)))])
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        # The image has the project installed; here the checkout stands in for it (an editable
        # install made before a part existed does not map it).
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(dl.REPO), os.environ.get("PYTHONPATH")]))
        return env

    def argv(self, service: str, command: list[str] | None = None) -> list[str]:
        s = self.compose["services"][service]
        argv = list(s.get("entrypoint") or [dl.IMAGE_ENTRYPOINT]) + list(command or s.get("command") or [])
        return [str(dl.ENTRYPOINT) if a == dl.IMAGE_ENTRYPOINT else a for a in argv]

    def start(self, service: str) -> ServiceProc:
        proc = ServiceProc(self.argv(service), self.env(service), self.tmp / f"{service}.log",
                           cwd=self.tmp / "fs" / service)
        self.procs[service] = proc.start()
        return proc

    def run(self, service: str, command: list[str] | None = None, timeout: float = 120) -> str:
        """`docker compose run --rm SERVICE [COMMAND]`: exits 0, returns its output."""
        out = subprocess.run(self.argv(service, command), env=self.env(service), cwd=self.tmp / "fs" / service,
                             capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, f"{service} exited {out.returncode}: {out.stdout}{out.stderr}"
        return out.stdout

    def healthy(self, service: str) -> bool:
        test = self.compose["services"][service]["healthcheck"]["test"]
        assert test[0] == "CMD"
        argv = [str(dl.ENTRYPOINT) if a == dl.IMAGE_ENTRYPOINT else a for a in test[1:]]
        return subprocess.run(argv, env=self.env(service), capture_output=True, timeout=30).returncode == 0

    def wait_healthy(self, service: str, timeout: float = 240) -> None:
        proc = self.procs[service]

        def ok() -> bool:
            assert proc.proc and proc.proc.poll() is None, f"{service} exited:\n{proc.log()[-3000:]}"
            return self.healthy(service)
        wait_until(ok, timeout=timeout, interval=0.5, what=f"{service} healthy")

    def wait_completed(self, service: str, timeout: float = 120) -> None:
        proc = self.procs[service]
        assert proc.proc is not None
        rc = proc.proc.wait(timeout)
        assert rc == 0, f"{service} exited {rc}:\n{proc.log()[-3000:]}"

    def up(self) -> None:
        """`docker compose up`: every service without a profile, honouring depends_on."""
        services = self.compose["services"]
        names = [n for n, s in services.items() if not s.get("profiles")]
        for name in dl.start_order(services, names):
            if name in INFRA:
                continue  # stand-ins run already
            for dep, cond in dl.depends_on(services[name]).items():
                if dep in INFRA:
                    continue
                if cond == "service_completed_successfully":
                    self.wait_completed(dep)
                elif cond == "service_healthy":
                    self.wait_healthy(dep)
            self.start(name)

    def stop(self) -> None:
        for p in reversed(list(self.procs.values())):
            p.stop()


@pytest.fixture
def cell(compose: dict[str, Any], tmp_path: Path, tiny_compiled: None) -> Iterator[LocalCell]:
    _, stages = dl.parse_dockerfile()
    image_env = {k: v for k, v in stages[-1].env().items()
                 if k not in ("PATH", "HOME", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE")}
    with postgres_database() as db_url, gcs_emulator() as gcs_host:
        create_bucket(gcs_host, _gcs_bucket(compose["services"]["gcs"]))
        local = LocalCell(compose, tmp_path, db_url, gcs_host, image_env)
        try:
            yield local
        finally:
            local.stop()


def _recreate_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as c:
        c.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        c.execute(f'CREATE DATABASE "{name}"')


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compose_cell_serves_the_tutorial_and_the_openai_sdk(cell: LocalCell) -> None:
    t0 = time.monotonic()
    cell.up()
    assert cell.procs["migrate"].proc.returncode == 0  # type: ignore[union-attr]
    for name in ("admin", "model-server-1", "model-server-2", "frontend"):
        cell.wait_healthy(name)
    fe = cell.url("frontend")
    started = time.monotonic() - t0

    # The Saxml HTTP tutorial (shared/reference/004), against the frontend's published port.
    assert requests.get(fe, timeout=10).json() == {"message": "HTTP Server for SAX Client"}
    r = requests.post(f"{fe}/publish", timeout=30, json={
        "model": MODEL, "model_path": "test.tiny", "checkpoint": "None", "replicas": 2,
        "overrides": TINY_OVERRIDES})
    assert r.status_code == 200, r.text
    assert {k: r.json()[k] for k in ("model", "checkpoint", "replicas")} == {
        "model": MODEL, "checkpoint": "None", "replicas": 2}

    def listcell() -> dict[str, Any]:
        r = requests.get(f"{fe}/listcell", json={"model": MODEL}, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()
    wait_until(lambda: listcell()["active_replicas"] == 2, timeout=240, interval=0.5,
               what="both model servers serving")
    assert listcell() == {"model": MODEL, "model_path": "test.tiny", "checkpoint": "None", "max_replicas": 2,
                          "active_replicas": 2, "min_replicas": 2, "state": "READY", "reason": None}
    gen = requests.post(f"{fe}/generate", timeout=60, json={
        "model": MODEL, "query": "Q: Who is Harry Potter's mom? A: ",
        "extra_inputs": {"temperature": 0.0, "per_example_max_decode_steps": 8}})
    assert gen.status_code == 200, gen.text
    (text, score), *_ = gen.json()
    assert isinstance(text, str) and isinstance(score, float)
    assert requests.get(f"{fe}/listall", json={"sax_cell": "/sax/test"}, timeout=10).json() == [MODEL]

    # The OpenAI SDK, as from the host.
    from openai import OpenAI

    client = OpenAI(base_url=f"{fe}/v1", api_key="unused", max_retries=0, timeout=60)
    assert MODEL in [m.id for m in client.models.list().data]
    done = client.completions.create(model=MODEL, prompt="The quick brown", max_tokens=8, temperature=0)
    assert done.choices[0].text and done.usage.completion_tokens <= 8

    # The model servers advertise their compose names, mapped here: both hold a replica.
    detail = requests.get(f"{cell.url('admin')}/models{MODEL}", timeout=10).json()
    assert sorted(r["address"] for r in detail["replicas"] if r["status"] == "LOADED") == sorted(
        cell.url(n).removeprefix("http://") for n in ("model-server-1", "model-server-2"))

    # `docker compose run --rm saxutil ls /sax/test`
    assert MODEL in cell.run("saxutil", ["ls", "/sax/test"])

    # Backup: the leader's snapshot in the bucket. Restore: an admin on an empty database.
    bucket = _gcs_bucket(cell.compose["services"]["gcs"])
    snap_url = f"{cell.gcs_host}/storage/v1/b/{bucket}/o/{urllib.parse.quote('sax/test/state.json', safe='')}"
    wait_until(lambda: MODEL in requests.get(snap_url, params={"alt": "media"}, timeout=5).text, timeout=30,
               what="snapshot in the bucket")
    cell.procs["admin"].stop()
    _recreate_database(cell.db_url)
    cell.start("migrate")
    cell.wait_completed("migrate")
    cell.start("admin")
    cell.wait_healthy("admin")
    assert requests.get(f"{fe}/listall", json={"sax_cell": "/sax/test"}, timeout=10).json() == [MODEL]
    wait_until(lambda: listcell()["active_replicas"] == 2, timeout=120, interval=0.5, what="replicas again")

    r = requests.post(f"{fe}/unpublish", json={"model": MODEL}, timeout=30)
    assert r.status_code == 200 and r.json() == {"model": MODEL}, r.text
    wait_until(lambda: requests.get(f"{fe}/listall", json={"sax_cell": "/sax/test"}, timeout=10).json() == [],
               timeout=30, what="unpublished")
    print(f"cell up and healthy in {started:.1f}s; whole flow {time.monotonic() - t0:.1f}s")
