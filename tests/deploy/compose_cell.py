"""The compose project mapped onto this machine: each Saxplane service's command as a local
process with that service's environment (compose host names -> 127.0.0.1, container ports ->
free local ports, container paths -> temporary folders), started in `depends_on` order."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.cluster import Proc, free_port, wait_until
from tests.deploy import deploylib as dl


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
        self.ports[("gcs", dl.gcs_port(gcs))] = int(self.gcs_host.rsplit(":", 1)[1])
        self.ports[("postgres", 5432)] = 5432
        for name, s in dl.saxplane_services(self.compose).items():
            part = dl.part_of(s)
            if part in dl.SERVING_PARTS:
                self.ports[(name, dl.listen_port(part, dl.environment(s)))] = free_port()

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
        part = dl.part_of(s)
        if part in dl.SERVING_PARTS:
            port_env = dl.part(part).port_env
            env[port_env] = str(self.ports[(service, dl.listen_port(part, dl.environment(s)))])
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
            if name in dl.INFRA:
                continue  # stand-ins run already
            for dep, cond in dl.depends_on(services[name]).items():
                if dep in dl.INFRA:
                    continue
                if cond == "service_completed_successfully":
                    self.wait_completed(dep)
                elif cond == "service_healthy":
                    self.wait_healthy(dep)
            self.start(name)

    def stop(self) -> None:
        for p in reversed(list(self.procs.values())):
            p.stop()
