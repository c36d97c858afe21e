"""deploy/k8s: the kustomize base and the GKE TPU/GPU overlays, rendered (`kubectl kustomize`
where it exists, else a YAML load with a small strategic merge) and held against the parts'
settings, the image and each other: names, ports, probes, environment, secrets, identity."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import postgres_database
from tests.deploy import deploylib as dl
from tests.deploy import imagelib as il
from tests.deploy import kustomize as kz

NS = "saxplane"
OVERLAYS = ("base", "overlays/gpu", "overlays/tpu")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of deploy/k8s with secrets.env made from the example, as an operator does."""
    return kz.operator_tree(tmp_path_factory.mktemp("k8s") / "k8s")


@pytest.fixture(scope="module")
def rendered(tree: Path) -> dict[str, dict[tuple[str, str], dict[str, Any]]]:
    return {name: kz.normalized(kz.render(tree / name)) for name in OVERLAYS}


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


def _part(container: dict[str, Any]) -> str | None:
    args = container.get("args") or []
    assert not container.get("command"), "keep the image's entrypoint; pass the part in args"
    return args[0] if args and args[0] in dl.PARTS else None


def _port(container: dict[str, Any], ref: Any) -> int:
    if isinstance(ref, int):
        return ref
    (p,) = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == ref]
    return p


def _uid() -> int:
    _, stages = il.parse_dockerfile()
    return int(stages[-1].all("USER")[-1].args.split(":")[0])


def _operator_overlay(tree: Path) -> Path:
    """deploy/README.md's own overlay: the images from a registry (tags kept: latest, tpu, cuda12)."""
    mine = tree / "my-cell"
    mine.mkdir(exist_ok=True)
    (mine / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - ../overlays/tpu\n"
        "images:\n  - name: saxplane\n    newName: europe-west4-docker.pkg.dev/my-project/saxplane/saxplane\n")
    return mine


def test_fallback_renderer_agrees_with_kustomize(tree: Path) -> None:
    mine = _operator_overlay(tree)
    images = {c["image"] for d in kz.render_fallback(mine) if kz.pod_spec(d)
              for c in _containers(kz.pod_spec(d))}  # type: ignore[arg-type]
    assert images == {"europe-west4-docker.pkg.dev/my-project/saxplane/saxplane:latest",
                      "europe-west4-docker.pkg.dev/my-project/saxplane/saxplane:tpu"}
    if not kz.kubectl_available():
        pytest.skip("no kubectl/kustomize here: the fallback renders alone")
    for path in [tree / name for name in OVERLAYS] + [mine]:
        assert kz.normalized(kz.render_fallback(path)) == kz.normalized(kz.render_kubectl(path)), path


def test_resources_and_names(rendered: dict[str, Any]) -> None:
    for name, docs in rendered.items():
        kinds = {(k, n) for k, n in docs}
        assert kinds == {
            ("Namespace", NS), ("ServiceAccount", "saxplane"), ("ConfigMap", "saxplane-config"),
            ("Secret", "saxplane-secrets"), ("Job", "saxplane-migrate"),
            ("Deployment", "saxplane-admin"), ("Service", "saxplane-admin"),
            ("StatefulSet", "saxplane-model-server"), ("Service", "saxplane-model-server"),
            ("Deployment", "saxplane-frontend"), ("Service", "saxplane-frontend"),
            ("HorizontalPodAutoscaler", "saxplane-frontend")}, name
        for (kind, _), d in docs.items():
            if kind != "Namespace":
                assert d["metadata"]["namespace"] == NS
        assert docs[("Deployment", "saxplane-admin")]["spec"]["replicas"] == 2
        sts = docs[("StatefulSet", "saxplane-model-server")]
        headless = docs[("Service", sts["spec"]["serviceName"])]
        assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
        hpa = docs[("HorizontalPodAutoscaler", "saxplane-frontend")]
        assert hpa["apiVersion"] == "autoscaling/v2"
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) in docs and target["kind"] == "Deployment"
        assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
        # Requests are what the HPA's utilisation is measured against.
        (fe,) = docs[("Deployment", "saxplane-frontend")]["spec"]["template"]["spec"]["containers"]
        assert fe["resources"]["requests"]["cpu"]
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def test_workloads_ports_probes_and_env(rendered: dict[str, Any]) -> None:
    uid = _uid()
    for name, docs in rendered.items():
        config = docs[("ConfigMap", "saxplane-config")]["data"]
        secret = docs[("Secret", "saxplane-secrets")]["data"]
        seen_parts = set()
        for (kind, wname), d in docs.items():
            spec = kz.pod_spec(d)
            if spec is None:
                continue
            assert ("ServiceAccount", spec["serviceAccountName"]) in docs, wname
            assert spec["securityContext"]["runAsNonRoot"] is True
            assert spec["securityContext"]["runAsUser"] == uid, "the image's user"
            labels = d["spec"]["template"]["metadata"]["labels"]
            if kind != "Job":
                assert all(labels.get(k) == v for k, v in d["spec"]["selector"]["matchLabels"].items())
            for c in _containers(spec):
                assert c["image"].split(":")[0] == "saxplane", c["image"]
                part = _part(c)
                in_init = c in spec.get("initContainers", [])
                if not in_init:
                    assert part, f"{wname}/{c['name']}: args {c.get('args')} name no part"
                    seen_parts.add(part)
                env_names = [e["name"] for e in c.get("env", [])]
                assert len(env_names) == len(set(env_names)), f"{wname}/{c['name']}: duplicate env"
                allowed = dl.allowed_env(part or "admin") | dl.K8S_HELPER_ENV
                assert set(env_names) <= allowed, f"{wname}/{c['name']}: {sorted(set(env_names) - allowed)}"
                for i, e in enumerate(c.get("env", [])):
                    ref = e.get("valueFrom", {})
                    if "secretKeyRef" in ref:
                        assert ref["secretKeyRef"]["name"] == "saxplane-secrets"
                        assert ref["secretKeyRef"]["key"] in secret, e
                    if "configMapKeyRef" in ref:
                        assert ref["configMapKeyRef"]["name"] == "saxplane-config"
                        assert ref["configMapKeyRef"]["key"] in config, e
                    for var in re.findall(r"\$\((\w+)\)", e.get("value", "")):
                        assert var in env_names[:i], f"{e['name']} uses $({var}) before it is defined"
                if part not in dl.SERVING_PARTS:
                    continue
                p = dl.part(part)
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                listen = int(env.get(p.port_env) or p.default_port)
                assert listen == p.default_port, f"{wname}: {part} on {listen}, settings say {p.default_port}"
                assert [x["containerPort"] for x in c["ports"]] == [listen], f"{wname}: container port"
                for probe in ("readinessProbe", "livenessProbe"):
                    get = c[probe]["httpGet"]
                    assert get["path"] == "/healthz" and _port(c, get["port"]) == listen, (wname, probe)
                if "startupProbe" in c:
                    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
        assert seen_parts == {"migrate", "admin", "model-server", "frontend"}, name


def test_services_route_to_the_parts(rendered: dict[str, Any]) -> None:
    for name, docs in rendered.items():
        pods = {wname: d for (kind, wname), d in docs.items() if kz.pod_spec(d) is not None}
        service_port: dict[str, int] = {}
        for (kind, sname), svc in docs.items():
            if kind != "Service":
                continue
            sel = svc["spec"]["selector"]
            matched = [d for d in pods.values()
                       if all(d["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items())]
            assert len(matched) == 1, f"{sname} selects {len(matched)} workloads"
            (c,) = matched[0]["spec"]["template"]["spec"]["containers"]
            (port,) = svc["spec"]["ports"]
            assert _port(c, port["targetPort"]) == c["ports"][0]["containerPort"]
            assert port["port"] == c["ports"][0]["containerPort"], "Service port = the part's port"
            service_port[sname] = port["port"]
        for d in pods.values():
            for c in d["spec"]["template"]["spec"]["containers"]:
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                if "SAX_ADMIN" in env:  # host:port of the admin Service
                    host, port = env["SAX_ADMIN"].rsplit(":", 1)
                    assert host == "saxplane-admin" and int(port) == service_port["saxplane-admin"], env["SAX_ADMIN"]
                if "SAX_ADVERTISE" in env:  # the pod's own name under the headless Service
                    sts = docs[("StatefulSet", "saxplane-model-server")]["spec"]
                    assert env["SAX_ADVERTISE"] == (f"$(POD_NAME).{sts['serviceName']}.$(POD_NAMESPACE)"
                                                    f".svc.cluster.local:{c['ports'][0]['containerPort']}")


def test_secrets_config_and_workload_identity(rendered: dict[str, Any], tree: Path) -> None:
    docs = rendered["base"]
    assert set(docs[("Secret", "saxplane-secrets")]["data"]) == {"db-url", "admin-token", "cluster-token",
                                                                "api-keys"}
    assert docs[("Secret", "saxplane-secrets")]["data"]["db-url"].startswith("postgresql+psycopg://")
    cfg = docs[("ConfigMap", "saxplane-config")]["data"]
    assert cfg["SAX_ROOT"].startswith("gs://") and cfg["SAX_CELL"].startswith("/sax/")
    from admin_server.settings import AdminSettings

    AdminSettings.from_env(env={**cfg, "SAX_DB_URL": "postgresql+psycopg://x/y"})  # parses
    ksa = docs[("ServiceAccount", "saxplane")]
    assert re.fullmatch(r"[a-z][a-z0-9-]+@[A-Za-z0-9_-]+\.iam\.gserviceaccount\.com",
                        ksa["metadata"]["annotations"]["iam.gke.io/gcp-service-account"])
    # The real secrets file is never part of the repository's tree.
    assert "secrets.env" in (kz.K8S / "base" / ".gitignore").read_text().split()
    assert il.is_ignored("deploy/k8s/base/secrets.env", il.dockerignore_rules())


def test_accelerator_overlays(rendered: dict[str, Any]) -> None:
    base = rendered["base"]
    flavours = dl.jax_flavours()

    for name, resource, flavour in (("overlays/tpu", "google.com/tpu", "tpu"),
                                    ("overlays/gpu", "nvidia.com/gpu", "cuda12")):
        docs = rendered[name]
        # Only the model servers change.
        for key, d in docs.items():
            if key != ("StatefulSet", "saxplane-model-server"):
                assert d == base[key], f"{name} changes {key}"
        spec = docs[("StatefulSet", "saxplane-model-server")]["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        assert c["image"] == f"saxplane:{flavour}" and flavour in flavours
        limits, requests = c["resources"]["limits"], c["resources"]["requests"]
        assert int(limits[resource]) >= 1 and requests.get(resource, limits[resource]) == limits[resource]
        if resource == "google.com/tpu":
            sel = spec["nodeSelector"]
            assert sel["cloud.google.com/gke-tpu-accelerator"].startswith("tpu-")
            dims = [int(x) for x in sel["cloud.google.com/gke-tpu-topology"].split("x")]
            chips = 1
            for x in dims:
                chips *= x
            assert int(limits[resource]) == chips, "a single-host slice: every chip of the topology"
        else:
            assert spec["nodeSelector"]["cloud.google.com/gke-accelerator"].startswith("nvidia-")
        # The rest of the model server is the base's.
        bc = base[("StatefulSet", "saxplane-model-server")]["spec"]["template"]["spec"]["containers"][0]
        assert {k: v for k, v in c.items() if k not in ("image", "resources")} == {
            k: v for k, v in bc.items() if k not in ("image", "resources")}


def test_admin_waits_for_the_migrate_job(rendered: dict[str, Any]) -> None:
    """The admin's init container is a real script: it waits on an empty database and lets the
    admin start once the migrate Job's command has run."""
    spec = rendered["base"][("Deployment", "saxplane-admin")]["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    argv = init["args"]
    assert argv[:2] == ["python", "-c"]
    job = rendered["base"][("Job", "saxplane-migrate")]["spec"]["template"]["spec"]["containers"][0]
    assert job["args"] == ["migrate"] and [e["name"] for e in job["env"]] == ["SAX_DB_URL"]
    with postgres_database() as url:
        env = {"SAX_DB_URL": url, "PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(dl.REPO)}
        with pytest.raises(subprocess.TimeoutExpired) as waited:
            subprocess.run([str(dl.ENTRYPOINT), *argv], env=env, capture_output=True, text=True, timeout=5)
        assert b"waiting for" in (waited.value.stdout or b"")
        subprocess.run([str(dl.ENTRYPOINT), *job["args"]], env=env, check=True, capture_output=True, timeout=120)
        done = subprocess.run([str(dl.ENTRYPOINT), *argv], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_metrics_are_scraped_by_annotations_or_a_pod_monitor(rendered: dict[str, Any], tree: Path) -> None:
    """Every serving part's pods say where their /metrics is (prometheus.io/* for the plain
    kubernetes-pods job); deploy/k8s/monitoring's PodMonitor selects exactly those pods."""
    import yaml

    for name, docs in rendered.items():
        for (kind, _), d in docs.items():
            spec = kz.pod_spec(d)
            if not spec or kind == "Job":
                continue
            (c,) = [c for c in spec["containers"] if _part(c) in dl.SERVING_PARTS]
            ann = d["spec"]["template"]["metadata"].get("annotations") or {}
            assert ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/path") == "/metrics", name
            assert int(ann["prometheus.io/port"]) == _port(c, "http"), (name, kind)
    (mon,) = kz.render(tree / "monitoring")
    assert (mon["apiVersion"], mon["kind"], mon["metadata"]["namespace"]) == ("monitoring.coreos.com/v1",
                                                                              "PodMonitor", NS)
    sel = mon["spec"]["selector"]
    (expr,) = sel["matchExpressions"]

    def selected(labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in sel["matchLabels"].items()) and \
            (labels.get(expr["key"]) in expr["values"]) == (expr["operator"] == "In")

    picked = []
    for (kind, n), d in rendered["base"].items():
        if kz.pod_spec(d) and selected(d["spec"]["template"]["metadata"]["labels"]):
            picked.append(n)
            (endpoint,) = mon["spec"]["podMetricsEndpoints"]
            (c,) = [c for c in kz.pod_spec(d)["containers"] if _part(c) in dl.SERVING_PARTS]  # type: ignore[index]
            assert endpoint["path"] == "/metrics" and endpoint["port"] in [p["name"] for p in c["ports"]]
    assert sorted(picked) == ["saxplane-admin", "saxplane-frontend", "saxplane-model-server"]
    # The annotation-driven job of deploy/prometheus/prometheus-k8s.yml reads those annotations.
    job = yaml.safe_load((dl.REPO / "deploy" / "prometheus" / "prometheus-k8s.yml").read_text())["scrape_configs"][0]
    sources = {s for r in job["relabel_configs"] for s in r.get("source_labels", [])}
    assert {"__meta_kubernetes_pod_annotation_prometheus_io_scrape", "__meta_kubernetes_pod_annotation_prometheus_io_port",
            "__meta_kubernetes_pod_annotation_prometheus_io_path"} <= sources
