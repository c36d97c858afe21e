"""docker/docker-compose.yml, proven without Docker: the compose model (after `.env.example`
interpolation) held against the parts' settings. test_compose_cell.py runs it end to end."""
from __future__ import annotations

import re
import urllib.parse
from pathlib import Path
from typing import Any

from tests.deploy import deploylib as dl


# -- the compose model, statically ------------------------------------------------------------

def test_services_images_and_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "gcs", "migrate", "admin", "model-server-1", "model-server-2",
                             "frontend", "saxutil", "prometheus", "grafana"}
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["gcs"]["image"].startswith("fsouza/fake-gcs-server:")
    for name in dl.INFRA:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} needs a health check"
        assert any(dl.parse_volume(v)[0] for v in services[name].get("volumes", [])), f"{name}: data volume"
    image = {s["image"] for s in dl.saxplane_services(compose).values()}
    assert len(image) == 1, "one image for every part"
    for name, s in dl.saxplane_services(compose).items():
        assert s["build"]["dockerfile"] == "docker/Dockerfile"
        assert (dl.DOCKER / s["build"]["context"]).resolve() == dl.REPO
        assert s["build"]["args"]["JAX_FLAVOR"] == "cpu"
        assert dl.part_of(s) in dl.PARTS, name
    parts = {n: dl.part_of(s) for n, s in dl.saxplane_services(compose).items()}
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
    for n, s in dl.saxplane_services(compose).items():
        if dl.part_of(s) in dl.SERVING_PARTS:
            assert s["healthcheck"]["test"] == ["CMD", dl.IMAGE_ENTRYPOINT, "healthcheck"], n
    dl.start_order(services, services)  # no cycles, nothing unknown


def test_environment_names_ports_and_flags(compose: dict[str, Any]) -> None:
    import click

    import admin_server.__main__ as admin_main
    import http_frontend.__main__ as frontend_main
    import model_server.__main__ as model_main
    from saxutil.__main__ import main as saxutil_main

    clis = {"admin": admin_main.main, "model-server": model_main.main, "frontend": frontend_main.main}
    for name, s in dl.saxplane_services(compose).items():
        part = dl.part_of(s)
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
            port = dl.listen_port(part, env)
            assert port == dl.part(part).default_port, f"{name} listens on {port}"
            for spec in s.get("ports", []):
                host, target = dl.parse_port(spec)
                assert target == port, f"{name}: publishes container port {target}, listens on {port}"
    assert [dl.parse_port(p) for p in compose["services"]["frontend"]["ports"]] == [(8888, 8888)]
    # Model servers advertise their own compose name and port; everyone finds the admin by its name.
    admin_port = dl.listen_port("admin", dl.environment(compose["services"]["admin"]))
    for name in ("model-server-1", "model-server-2"):
        env = dl.environment(compose["services"][name])
        assert env["SAX_ADVERTISE"] == f"{name}:{dl.listen_port('model-server', env)}"
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
    bucket = dl.gcs_bucket(services["gcs"])
    assert admin["SAX_ROOT"] == f"gs://{bucket}", "the admin's root is the bucket the emulator creates"
    assert admin["STORAGE_EMULATOR_HOST"] == f"http://gcs:{dl.gcs_port(services['gcs'])}"
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
    for name in dl.MONITORING:
        assert services[name].get("profiles") == ["monitoring"], f"{name} starts only with --profile monitoring"

    def mounted(service: str, target: str) -> Path:
        (src,) = [src for src, tgt, _ in map(dl.parse_volume, services[service]["volumes"]) if tgt == target]
        path = (dl.DOCKER / src).resolve()
        assert path.exists(), f"{service}: {src} is missing"
        return path

    # Prometheus scrapes each serving part on the port that part listens on in the compose file.
    prom = yaml.safe_load(mounted("prometheus", "/etc/prometheus/prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    expected = {f"{n}:{dl.listen_port(dl.part_of(s), dl.environment(s))}"
                for n, s in dl.saxplane_services(compose).items() if dl.part_of(s) in dl.SERVING_PARTS}
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


# -- the cell, end to end ---------------------------------------------------------------------

