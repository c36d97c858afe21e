"""docker/docker-compose.yml run for real: images built, all seven services as containers.

No registry is reachable here, so the test makes its own base: a Debian 12 minbase with
python3 and python3-venv from `debootstrap`, `docker import`ed; on it it builds the project's
image (docker/Dockerfile with PYTHON_IMAGE pointing at that base, pip trusting this machine's
CA through the `pip-ca` build secret) and the `postgres` and `gcs` services' images
(tests/deploy/images/). Everything runs under a dockerd of its own (its own socket, data and
exec roots; no bridge, no iptables) that the test starts and removes with all it holds. Every
container uses the host's network on its own 127.0.0.1 port (an override file written here,
used only by this test). Then deploy/README.md: its tutorial curls and its OpenAI SDK snippet against
the frontend, the admin stopped and started (the state stays in the postgres volume),
`docker-compose down -v`.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import yaml

from tests.cluster import free_port, wait_until
from tests.deploy import deploylib as dl

pytestmark = pytest.mark.slow

TOOLS = {"docker": "/usr/bin/docker", "dockerd": "/usr/sbin/dockerd", "docker-compose": "/usr/bin/docker-compose",
         "debootstrap": "/usr/sbin/debootstrap"}
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
MIRROR = os.environ.get("SAX_DEBIAN_MIRROR", "http://deb.debian.org/debian")
IMAGES = Path(__file__).resolve().parent / "images"
MODEL = "/sax/test/tiny"  # deploy/README.md tutorial's model


class Dockerd:
    """A private Docker daemon: stop() removes its containers, then the daemon, then its roots
    (every image layer, volume and build cache it held is under them)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="saxd-", dir="/tmp"))  # short: unix socket paths
        self.sock = self.root / "docker.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.sock}", "DOCKER_BUILDKIT": "1",
                    "COMPOSE_DOCKER_CLI_BUILD": "1"}
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Dockerd":
        self._log = open(self.root / "dockerd.log", "ab")
        self.proc = subprocess.Popen(
            [TOOLS["dockerd"], "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
             "-H", f"unix://{self.sock}", "--pidfile", str(self.root / "docker.pid"), "--bridge=none",
             "--iptables=false", "--ip-masq=false", "--ip-forward=false", "--userland-proxy=false"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: self.proc.poll() is None and self.docker("version", check=False).returncode == 0,  # type: ignore[union-attr]
                   timeout=60, interval=0.5, what=f"dockerd up (log: {self.root / 'dockerd.log'})")
        return self

    def docker(self, *args: str, check: bool = True, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess:
        out = subprocess.run([TOOLS["docker"], *args], env=self.env, capture_output=True, text=True,
                             timeout=timeout, **kw)
        if check and out.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):  # no container outlives its daemon
                ids = self.docker("ps", "-aq", check=False).stdout.split()
                if ids:
                    self.docker("rm", "-f", "-v", *ids, check=False, timeout=120)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # its containerd and shims, if any are left
        if hasattr(self, "_log"):
            self._log.close()
        # Mounts the daemon left (overlay layers, its netns and shm), innermost first, then the roots.
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1].startswith(str(self.root))]
        for m in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def dockerd() -> Iterator[Dockerd]:
    missing = [path for path in TOOLS.values() if not os.access(path, os.X_OK)]
    if missing:
        pytest.skip(f"{', '.join(missing)} missing: apt-get install docker.io docker-compose debootstrap "
                    "(.ci/run installs them)")
    if os.geteuid() != 0:
        pytest.skip("dockerd and debootstrap need root")
    d = Dockerd()
    try:
        yield d.start()
    finally:
        d.stop()


@dataclass
class Images:
    base: str
    saxplane: str
    postgres: str
    gcs: str
    xla_cache: Path
    seconds: dict[str, float]


WARM_TINY = ("from model_server.__main__ import enable_compilation_cache; "
             "enable_compilation_cache('/var/cache/saxplane/xla'); "
             "from model_server.manager import default_loader; "
             "m, e = default_loader('test.tiny', None, {}, None); e.stop()")


def _build(d: Dockerd, tag: str, context: Path, *args: str) -> subprocess.Popen:
    secret = ["--secret", f"id=pip-ca,src={CA_BUNDLE}"] if CA_BUNDLE.exists() else []
    log = open(d.root / f"build-{tag.replace('/', '_').replace(':', '_')}.log", "wb")
    return subprocess.Popen([TOOLS["docker"], "build", "--network", "host", "--progress", "plain", *secret,
                             "-t", tag, *args, str(context)], env=d.env, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def images(dockerd: Dockerd) -> Images:
    """The bootstrapped base and the three images built on it (kept for this module only)."""
    run = uuid.uuid4().hex[:8]
    seconds: dict[str, float] = {}
    t0 = time.monotonic()
    rootfs = dockerd.root / "rootfs"
    out = subprocess.run([TOOLS["debootstrap"], "--variant=minbase", "--include=python3,python3-venv", "bookworm",
                          str(rootfs), MIRROR], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"debootstrap failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    base = f"saxplane-test/debian-python:{run}"
    with subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE) as tar:
        dockerd.docker("import", "-", base, stdin=tar.stdout, timeout=300)
    shutil.rmtree(rootfs)
    seconds["base"] = time.monotonic() - t0

    t0 = time.monotonic()
    xla_cache = dockerd.root / "xla-cache"
    tags = Images(base, f"saxplane-test/saxplane:{run}", f"saxplane-test/postgres:{run}",
                  f"saxplane-test/gcs:{run}", xla_cache, seconds)
    builds = {
        tags.saxplane: _build(dockerd, tags.saxplane, dl.REPO, "-f", str(dl.DOCKERFILE),
                              "--build-arg", f"PYTHON_IMAGE={base}"),
        tags.postgres: _build(dockerd, tags.postgres, IMAGES / "postgres", "--build-arg", f"BASE_IMAGE={base}"),
        tags.gcs: _build(dockerd, tags.gcs, IMAGES / "gcs", "--build-arg", f"BASE_IMAGE={base}"),
    }
    for tag, proc in builds.items():
        rc = proc.wait(1500)
        log = dockerd.root / f"build-{tag.replace('/', '_').replace(':', '_')}.log"
        assert rc == 0, f"docker build {tag} exited {rc}:\n{log.read_text(errors='replace')[-5000:]}"
    seconds["images"] = time.monotonic() - t0
    # test.tiny's programs at the tutorial's shapes, compiled once in a container of the image
    # into a folder that both model servers then mount as their XLA cache (instead of each
    # compiling them for minutes on a loaded machine).
    t0 = time.monotonic()
    xla_cache.mkdir()
    xla_cache.chmod(0o777)
    dockerd.docker("run", "--rm", "--network", "host", "-v", f"{xla_cache}:/var/cache/saxplane/xla",
                   "--entrypoint", "python", tags.saxplane, "-c", WARM_TINY, timeout=900)
    seconds["compile"] = time.monotonic() - t0
    return tags


# -- the compose project ---------------------------------------------------------------------

def _host_network_override(ports: dict[str, int], images: Images, db: str) -> dict[str, Any]:
    """Every service on the host's network, each on its own 127.0.0.1 port (SAX_* variables,
    --host flags); the infrastructure services run the images built here."""
    admin, gcs = f"127.0.0.1:{ports['admin']}", f"http://127.0.0.1:{ports['gcs']}"
    host = {"network_mode": "host"}
    bucket = "saxplane"
    services: dict[str, Any] = {
        "postgres": {**host, "image": images.postgres,
                     "environment": {"PGPORT": str(ports["postgres"]), "POSTGRES_LISTEN": "127.0.0.1"},
                     "healthcheck": {"test": ["CMD", "pg_isready", "-h", "127.0.0.1", "-p", str(ports["postgres"]),
                                              "-U", "sax", "-d", "sax"]}},
        "gcs": {**host, "image": images.gcs, "entrypoint": ["gcp-storage-emulator", "start"],
                "command": ["--host", "127.0.0.1", "--port", str(ports["gcs"]), "--default-bucket", bucket],
                "healthcheck": {"test": ["CMD", "python3", "-c", "import urllib.request; urllib.request.urlopen("
                                         f"'{gcs}/storage/v1/b/{bucket}', timeout=2)"]}},
        "migrate": {**host, "environment": {"SAX_DB_URL": db}},
        "admin": {**host, "command": ["admin", "--host", "127.0.0.1"],
                  "environment": {"SAX_ADMIN_PORT": str(ports["admin"]), "SAX_DB_URL": db,
                                  "STORAGE_EMULATOR_HOST": gcs}},
        "frontend": {**host, "command": ["frontend", "--host", "127.0.0.1"],
                     "environment": {"SAX_ADMIN": admin, "SAX_FRONTEND_PORT": str(ports["frontend"])}},
    }
    for n in ("model-server-1", "model-server-2"):
        services[n] = {**host, "command": ["model-server", "--host", "127.0.0.1"],
                       "environment": {"SAX_ADMIN": admin, "SAX_MODEL_SERVER_PORT": str(ports[n]),
                                       "SAX_ADVERTISE": f"127.0.0.1:{ports[n]}", "STORAGE_EMULATOR_HOST": gcs},
                       # in place of the xla-cache volume: the programs compiled after the build
                       "volumes": [f"{images.xla_cache}:/var/cache/saxplane/xla"]}
    return {"services": services}


@dataclass
class Project:
    d: Dockerd
    argv: list[str]
    env: dict[str, str]
    ports: dict[str, int]

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run([*self.argv, *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                             cwd=dl.REPO)
        if check and out.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)} exited {out.returncode}:\n"
                                 f"{out.stdout[-4000:]}\n{out.stderr[-6000:]}\n{self.logs()}")
        return out

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def state(self, service: str) -> dict[str, Any]:
        import json

        return json.loads(self.d.docker("inspect", "--format", "{{json .State}}", self.container(service)).stdout)

    def healthy(self, service: str) -> bool:
        return (self.state(service).get("Health") or {}).get("Status") == "healthy"

    def logs(self, *services: str) -> str:
        out = subprocess.run([*self.argv, "logs", "--no-color", "--tail", "40", *services], env=self.env,
                             capture_output=True, text=True, timeout=60, cwd=dl.REPO)
        return out.stdout[-8000:]

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"


def _readme_block(after: str, lang: str) -> str:
    text = (dl.REPO / "deploy" / "README.md").read_text()
    start = text.index(after)
    m = re.compile(rf"```{lang}\n(.*?)```", re.S).search(text, start)
    assert m, f"no ```{lang} block after {after!r} in deploy/README.md"
    return m.group(1)


def _tutorial_commands(frontend: str) -> list[str]:
    """deploy/README.md's tutorial curls, one shell command each, pointed at this cell's frontend."""
    block = _readme_block("Publish and query with the Saxml tutorial's curl commands", "bash")
    cmds, buf = [], ""
    for line in block.splitlines():
        buf += line + "\n"
        try:
            shlex.split(buf, comments=True)
        except ValueError:  # a quoted argument goes on on the next line
            continue
        if not line.rstrip().endswith("\\"):
            cmds.append(buf.replace("localhost:8888", frontend.removeprefix("http://")).strip())
            buf = ""
    assert all(c.startswith("curl ") for c in cmds), cmds
    return cmds


def _sh(cmd: str) -> Any:
    import json

    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{cmd}\nexited {out.returncode}: {out.stderr}"
    return json.loads(out.stdout)


@pytest.mark.timeout(2400)
def test_compose_cell_in_docker(dockerd: Dockerd, images: Images, tmp_path: Path) -> None:
    t_start = time.monotonic()
    ports = {n: free_port() for n in ("postgres", "gcs", "admin", "model-server-1", "model-server-2", "frontend")}
    db = f"postgresql+psycopg://sax:sax@127.0.0.1:{ports['postgres']}/sax"
    # Published ports mean nothing on the host's network (and Compose v1 refuses them there), and
    # an override cannot remove them: the test runs the compose file without its `ports:`, with
    # the override over it; relative paths stay relative to docker/ (--project-directory).
    base = yaml.safe_load(dl.COMPOSE.read_text())
    for service in base["services"].values():
        service.pop("ports", None)
    compose_file = tmp_path / "docker-compose.yml"
    compose_file.write_text(yaml.safe_dump(base, sort_keys=False))
    override = tmp_path / "docker-compose.host-network.yml"
    override.write_text(yaml.safe_dump(_host_network_override(ports, images, db), sort_keys=False))
    (tmp_path / "checkpoints").mkdir()
    env = {**dockerd.env, "SAX_IMAGE": images.saxplane, "SAX_CHECKPOINTS_DIR": str(tmp_path / "checkpoints")}
    project = Project(dockerd, [TOOLS["docker-compose"], "-p", f"saxtest{uuid.uuid4().hex[:6]}",
                                "--project-directory", str(dl.DOCKER), "-f", str(compose_file), "-f", str(override),
                                "--env-file", str(dl.ENV_EXAMPLE)],
                      env, ports)

    # The image holds no trace of the build secret: none of this machine's CAs that the base
    # image does not have itself (the TLS-intercepting proxy's) is in any file (the Python
    # packages' own cacert.pem bundles aside) or in the image's history.
    if CA_BUNDLE.exists():
        pem = re.compile(r"-----BEGIN CERTIFICATE-----\n(.*?)-----END", re.S)
        in_base = dockerd.docker("run", "--rm", "--network", "host", "--entrypoint", "sh", images.base, "-c",
                                 "find / -xdev -type f \\( -name '*.crt' -o -name '*.pem' \\) -exec cat {} +",
                                 check=False, timeout=120).stdout
        extra = [c for c in pem.findall(CA_BUNDLE.read_text()) if c not in set(pem.findall(in_base))]
        needles = [max(c.splitlines(), key=len) for c in extra]
        if needles:
            found = dockerd.docker("run", "--rm", "--network", "host", "--user", "0", "--entrypoint", "grep",
                                   images.saxplane, "-rlsF", "--exclude-dir=proc", "--exclude-dir=sys",
                                   "--exclude-dir=dev", "--exclude=cacert.pem",
                                   *[a for n in needles for a in ("-e", n)], "/", check=False, timeout=300)
            assert found.returncode == 1 and not found.stdout, f"a CA of the build is in the image: {found.stdout}"
        history = dockerd.docker("history", "--no-trunc", images.saxplane).stdout
        assert "BEGIN CERTIFICATE" not in history and not any(n in history for n in needles)

    try:
        t0 = time.monotonic()
        project.compose("up", "-d", "--no-build", timeout=900)
        for service in ("admin", "model-server-1", "model-server-2", "frontend"):
            wait_until(lambda: project.healthy(service), timeout=300, interval=1,
                       what=f"{service} healthy\n{project.logs(service)}")
        migrate = project.state("migrate")
        assert migrate["Status"] == "exited" and migrate["ExitCode"] == 0, migrate
        up_s = time.monotonic() - t0

        # deploy/README.md's tutorial, curl by curl.
        fe = project.url("frontend")
        hello, publish, listcell, generate, listall, unpublish = _tutorial_commands(fe)
        assert _sh(hello) == {"message": "HTTP Server for SAX Client"}
        assert _sh(publish)["model"] == MODEL
        wait_until(lambda: _sh(listcell)["active_replicas"] == 2, timeout=300, interval=1,
                   what=f"both model servers serving\n{project.logs('model-server-1', 'admin')}")
        (text, score), *_ = _sh(generate)
        assert isinstance(text, str) and isinstance(score, float)
        assert _sh(listall) == [MODEL]

        # deploy/README.md's OpenAI SDK snippet, from the host.
        snippet = _readme_block("The OpenAI SDK (`pip install openai`), from the host:", "python")
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(snippet.replace("http://localhost:8888", fe), {})  # noqa: S102 - deploy/README.md's own code
        lines = printed.getvalue().splitlines()
        assert lines[0] == str([MODEL]) and len(lines) >= 3, lines

        # The two replicas are on the two containers; the admin's status page shows them.
        admin = project.url("admin")
        detail = requests.get(f"{admin}/models{MODEL}", timeout=10).json()
        assert sorted(r["address"] for r in detail["replicas"] if r["status"] == "LOADED") == sorted(
            f"127.0.0.1:{ports[n]}" for n in ("model-server-1", "model-server-2"))
        page = requests.get(admin, headers={"Accept": "text/html"}, timeout=10).text
        assert f'data-model="{MODEL}"' in page and "READY" in page

        # The admin container stops and starts again: the published model comes from PostgreSQL's
        # volume (the same row, not a restore from the snapshot).
        project.compose("stop", "admin")
        assert project.state("admin")["Status"] == "exited"
        project.compose("start", "admin")
        wait_until(lambda: project.healthy("admin"), timeout=180, interval=1, what="admin healthy again")
        again = requests.get(f"{admin}/models{MODEL}", timeout=10).json()
        assert again["uuid"] == detail["uuid"]
        assert "restored" not in project.compose("logs", "--no-color", "admin").stdout
        wait_until(lambda: _sh(listcell)["active_replicas"] == 2, timeout=120, interval=1, what="serving again")

        assert _sh(unpublish) == {"model": MODEL}
        wait_until(lambda: _sh(listall) == [], timeout=60, interval=1, what="unpublished")
    finally:
        down = project.compose("down", "-v", "--remove-orphans", timeout=300, check=False)
    assert down.returncode == 0, down.stderr
    assert dockerd.docker("ps", "-aq").stdout.strip() == ""
    assert not [v for v in dockerd.docker("volume", "ls", "-q").stdout.split() if v.startswith("saxtest")]
    print(f"base {images.seconds['base']:.0f}s, images {images.seconds['images']:.0f}s, compile "
          f"{images.seconds['compile']:.0f}s, up and healthy "
          f"{up_s:.0f}s, whole test {time.monotonic() - t_start:.0f}s")
