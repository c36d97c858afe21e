"""deploy/k8s/overlays/tpu-multihost: multi-host TPU slices as a LeaderWorkerSet, rendered
(`kubectl kustomize` where it exists, and the fallback renderer) and held against the base,
the model server's settings and the slice's own arithmetic (hosts x chips = the topology)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from model_server.slice import SliceConfig
from tests.deploy import deploylib as dl
from tests.deploy import kustomize as kz

NAME = "overlays/tpu-multihost"
LWS = "saxplane-model-server-slice"
SLICE_ENV = {"SAX_SLICE_HOSTS", "SAX_SLICE_RANK", "SAX_COORDINATOR"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return kz.operator_tree(tmp_path_factory.mktemp("k8s_mh") / "k8s")


@pytest.fixture(scope="module")
def docs(tree: Path) -> dict[tuple[str, str], dict[str, Any]]:
    return kz.normalized(kz.render(tree / NAME))


@pytest.fixture(scope="module")
def base(tree: Path) -> dict[tuple[str, str], dict[str, Any]]:
    return kz.normalized(kz.render(tree / "base"))


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _pod_env(container: dict[str, Any], labels: dict[str, str], annotations: dict[str, str]) -> dict[str, str]:
    """The container's environment as the kubelet makes it: fieldRefs resolved, $(VAR) expanded."""
    out: dict[str, str] = {}
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        if ref is not None:
            m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", ref)
            if m:
                out[e["name"]] = (labels if m.group(1) == "labels" else annotations)[m.group(2)]
            else:
                out[e["name"]] = {"metadata.name": "pod", "metadata.namespace": "saxplane"}[ref]
        elif "value" in e:
            out[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: out[m.group(1)], e["value"])
    return out


def test_fallback_renderer_agrees_with_kustomize(tree: Path) -> None:
    if not kz.kubectl_available():
        pytest.skip("no kubectl/kustomize here: the fallback renders alone")
    assert kz.normalized(kz.render_fallback(tree / NAME)) == kz.normalized(kz.render_kubectl(tree / NAME))


def test_slices_replace_the_single_host_servers(docs, base) -> None:
    assert ("StatefulSet", "saxplane-model-server") not in docs
    assert set(docs) == (set(base) - {("StatefulSet", "saxplane-model-server")}) | {("LeaderWorkerSet", LWS)}
    for key, d in docs.items():
        if key != ("LeaderWorkerSet", LWS):
            assert d == base[key], f"the overlay changes {key}"


def test_leader_worker_set(docs, base) -> None:
    lws = docs[("LeaderWorkerSet", LWS)]
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1" and lws["metadata"]["namespace"] == "saxplane"
    tpl = lws["spec"]["leaderWorkerTemplate"]
    assert tpl["restartPolicy"] == "RecreateGroupOnPodRestart", "a lost rank recreates the whole group"
    size = tpl["size"]
    leader, worker = tpl["leaderTemplate"], tpl["workerTemplate"]
    (lc,) = leader["spec"]["containers"]
    (wc,) = worker["spec"]["containers"]
    # hosts x chips per host = every chip of the slice's topology
    for pod, c in ((leader, lc), (worker, wc)):
        sel = pod["spec"]["nodeSelector"]
        assert sel["cloud.google.com/gke-tpu-accelerator"].startswith("tpu-")
        chips = 1
        for x in sel["cloud.google.com/gke-tpu-topology"].split("x"):
            chips *= int(x)
        tpus = int(c["resources"]["limits"]["google.com/tpu"])
        assert size * tpus == chips and size > 1, (size, tpus, chips)
        assert c["image"] == "saxplane:tpu" and c["args"] == ["model-server"]
        assert pod["spec"]["securityContext"]["runAsUser"] == base[("StatefulSet", "saxplane-model-server")][
            "spec"]["template"]["spec"]["securityContext"]["runAsUser"]
        allowed = dl.allowed_env("model-server") | dl.K8S_HELPER_ENV | {"SLICE_GROUP"}
        assert set(_env(c)) <= allowed, sorted(set(_env(c)) - allowed)
        assert SLICE_ENV <= set(_env(c))
    # The leader is the base's model server plus the slice; the base Service selects it alone.
    bc = base[("StatefulSet", "saxplane-model-server")]["spec"]["template"]["spec"]["containers"][0]
    for key in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert lc[key]["httpGet"] == bc[key]["httpGet"]
    assert set(_env(bc)) - {"SAX_ADVERTISE"} <= set(_env(lc))
    for name, e in _env(bc).items():
        if name != "SAX_ADVERTISE":
            assert _env(lc)[name] == e, name
    svc = docs[("Service", "saxplane-model-server")]["spec"]["selector"]
    assert all(leader["metadata"]["labels"].get(k) == v for k, v in svc.items())
    assert not all(worker["metadata"]["labels"].get(k) == v for k, v in svc.items())
    assert not any(k in wc for k in ("readinessProbe", "livenessProbe", "startupProbe", "ports"))

    # What each pod's settings make of its environment (LWS's labels and size annotation).
    ports = {p["name"]: p["containerPort"] for p in lc["ports"]}
    for index, pod, c in ((0, leader, lc), (1, worker, wc), (size - 1, worker, wc)):
        labels = {"leaderworkerset.sigs.k8s.io/worker-index": str(index),
                  "leaderworkerset.sigs.k8s.io/group-index": "2"}
        env = _pod_env(c, labels, {"leaderworkerset.sigs.k8s.io/size": str(size)})
        cfg = SliceConfig.from_env(env)
        assert cfg is not None and (cfg.hosts, cfg.rank) == (size, index)
        host, port = cfg.coordinator.rsplit(":", 1)
        # the leader pod of group 2 under LWS's headless Service
        assert host == f"{LWS}-2.{LWS}.saxplane.svc.cluster.local"
        assert int(port) == ports["coordinator"] and ports["slice-channel"] == int(port) + 1
        if index == 0:
            assert env["SAX_ADVERTISE"] == f"pod.{LWS}.saxplane.svc.cluster.local:{ports['http']}"
