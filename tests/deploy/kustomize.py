"""deploy/k8s rendered as kustomize does (`kubectl kustomize` where it exists, else a YAML
load with the small strategic merge the overlays need), and the copy an operator makes of it."""
from __future__ import annotations

import base64
import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.deploylib import REPO, read_env_file

K8S = REPO / "deploy" / "k8s"


def operator_tree(dest: Path) -> Path:
    """A copy of deploy/k8s at `dest` with secrets.env made from the example, as an operator does."""
    shutil.copytree(K8S, dest, ignore=shutil.ignore_patterns("secrets.env"))
    shutil.copy(dest / "base" / "secrets.env.example", dest / "base" / "secrets.env")
    return dest


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
