"""docker/Dockerfile, docker/entrypoint.sh and .dockerignore, checked without Docker: the stages,
users and entrypoint name things that exist, the build context holds what the COPYs need, the
project installs (not editable) from that context and runs, and every part the entrypoint
dispatches to starts."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.cluster import postgres_database
from tests.deploy import deploylib as dl
from tests.deploy import imagelib as il

PIP_INSTALL = re.compile(r"\bpip(?:-with-ca)? install\b")
BUILD_TOOLS = re.compile(r"\b(build-essential|gcc|g\+\+|clang|make|cmake|rustc|cargo|python3-dev|libpq-dev)\b")


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict, list[il.Stage]]:
    return il.parse_dockerfile()


def _venv_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAX_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(dl.REPO)  # the checkout stands in for the image's installed project
    env.update(extra)
    return env


def test_stages_base_user_and_cache(dockerfile: tuple[dict, list[il.Stage]]) -> None:
    _, stages = dockerfile
    assert len(stages) >= 2, "multi-stage: a build stage and a runtime stage"
    names = [s.name for s in stages]
    assert all(names) and len(set(names)) == len(names), names
    for s in stages:
        assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", s.base), f"{s.name}: base {s.base}"
    final = stages[-1]
    # Non-root, numeric (Kubernetes' runAsNonRoot can only verify a numeric user).
    users = final.all("USER")
    assert users, "the runtime stage sets USER"
    uid, _, gid = users[-1].args.strip().partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or gid.isdigit()), users[-1].args
    # No build tools in the runtime stage, no pip there at all: it only copies the environment.
    for i in final.all("RUN"):
        assert not BUILD_TOOLS.search(i.args), f"build tools in the runtime stage: {i.args}"
        assert not PIP_INSTALL.search(i.args), f"the runtime stage installs packages: {i.args}"
        assert "secret" not in i.flags.get("mount", ""), "no build secret in the runtime stage"
    # pip's cache is off wherever pip runs.
    for s in stages:
        if any(PIP_INSTALL.search(i.args) for i in s.all("RUN")):
            assert s.env().get("PIP_NO_CACHE_DIR") in ("1", "true", "on") or all(
                "--no-cache-dir" in i.args for i in s.all("RUN") if PIP_INSTALL.search(i.args)), s.name


def test_pip_trusts_an_optional_ca_secret(dockerfile: tuple[dict, list[il.Stage]]) -> None:
    """Every pip that downloads mounts the optional `pip-ca` secret (a proxy's CA bundle, only
    while it runs), through the wrapper that sets PIP_CERT when the secret is there."""
    global_args, stages = dockerfile
    assert global_args["PYTHON_IMAGE"] == "python:3.11-slim-bookworm"
    build = stages[0]
    (wrapper,) = [i for i in build.all("RUN") if "> /usr/local/bin/pip-with-ca" in i.args]
    assert "/run/secrets/pip-ca" in wrapper.args and "PIP_CERT" in wrapper.args
    for i in build.all("RUN"):
        if PIP_INSTALL.search(i.args):
            assert "pip-with-ca install" in i.args, i.args
            assert i.flags.get("mount") == "type=secret,id=pip-ca,required=false", i.args


def test_copies_name_files_that_exist_and_reach_the_context(dockerfile: tuple[dict, list[il.Stage]]) -> None:
    _, stages = dockerfile
    rules = il.dockerignore_rules()
    seen_stages: list[str] = []
    for s in stages:
        for i in s.all("COPY") + s.all("ADD"):
            sources, dest = il.copy_sources(i)
            if "from" in i.flags:
                assert i.flags["from"] in seen_stages, f"COPY --from={i.flags['from']} names no earlier stage"
                continue
            for src in sources:
                path = dl.REPO / src
                assert path.exists(), f"COPY {src}: no such file in the repository"
                assert not il.is_ignored(src, rules), f"COPY {src}: excluded by .dockerignore"
                if path.is_dir():
                    inside = [p for p in path.rglob("*.py")]
                    assert inside and not all(il.is_ignored(str(p.relative_to(dl.REPO)), rules) for p in inside)
        seen_stages.append(s.name or "")


def test_dockerignore_keeps_the_context_small() -> None:
    rules = il.dockerignore_rules()
    for rel in (".git/config", "tests/conftest.py", "bench/engine.py", ".venv/bin/python", "sax-root/x",
                "checkpoints/gpt2/model.safetensors", "admin_server/__pycache__/app.cpython-311.pyc",
                "saxplane.egg-info/PKG-INFO", ".env", "deploy/k8s/base/secrets.env"):
        assert il.is_ignored(rel, rules), f"{rel} would be sent to the Docker daemon"
    for rel in ("pyproject.toml", "admin_server/app.py", "migrations/versions/0001_initial_schema.py",
                "docker/entrypoint.sh"):
        assert not il.is_ignored(rel, rules), rel


def test_entrypoint_health_and_ports(dockerfile: tuple[dict, list[il.Stage]]) -> None:
    _, stages = dockerfile
    final = stages[-1]
    entry = final.all("ENTRYPOINT")[-1].exec_form()
    assert entry and entry[0] == dl.IMAGE_ENTRYPOINT, entry
    # The entrypoint is on PATH in the image: a COPY of docker/entrypoint.sh, executable.
    installed = [il.copy_sources(i) for i in final.all("COPY") if "from" not in i.flags]
    dest = next(d for srcs, d in installed if srcs == ["docker/entrypoint.sh"])
    assert dest == f"/usr/local/bin/{dl.IMAGE_ENTRYPOINT}", dest
    copy = next(i for i in final.all("COPY") if "docker/entrypoint.sh" in i.args)
    assert copy.flags.get("chmod") in ("0755", "755") or os.access(dl.ENTRYPOINT, os.X_OK)
    assert os.access(dl.ENTRYPOINT, os.X_OK), "docker/entrypoint.sh must be executable"
    assert dl.ENTRYPOINT.read_text().startswith("#!/bin/sh\n")
    subprocess.run(["sh", "-n", str(dl.ENTRYPOINT)], check=True)
    health = final.all("HEALTHCHECK")[-1].args
    assert re.search(r'CMD \["saxplane-entrypoint", "healthcheck"\]', health), health
    # EXPOSEd ports are the parts' defaults.
    exposed = {int(p) for i in final.all("EXPOSE") for p in i.args.split()}
    assert exposed == {dl.part(p).default_port for p in dl.SERVING_PARTS}
    # Every SAX_* set in the image is read by some part (or by the entrypoint).
    known = set().union(*(dl.allowed_env(p) for p in dl.PARTS))
    for name in final.env():
        if name.startswith("SAX_") or name.startswith("HF_"):
            assert name in known, f"ENV {name} is read by no part"


def test_jax_flavour_build_argument(dockerfile: tuple[dict, list[il.Stage]]) -> None:
    _, stages = dockerfile
    build = next(s for s in stages if any("requirements.py" in i.args for i in s.all("RUN")))
    assert build.args_().get("JAX_FLAVOR") == "cpu"
    run = next(i.args for i in build.all("RUN") if "requirements.py" in i.args)
    assert re.search(r"--jax \"?\$\{?JAX_FLAVOR\}?\"?", run), run
    assert "--extras postgres" in run
    expect = {"cpu": "jax>=", "cuda12": "jax[cuda12]>=", "tpu": "jax[tpu]>="}
    for flavour, jax_req in expect.items():
        out = subprocess.run([sys.executable, str(dl.DOCKER / "requirements.py"), str(dl.REPO / "pyproject.toml"),
                              "--extras", "postgres", "--jax", flavour], capture_output=True, text=True, check=True)
        lines = out.stdout.split("\n")
        jax_lines = [x for x in lines if re.match(r"jax($|[\[<>=~!])", x)]
        assert len(jax_lines) == 1 and jax_lines[0].startswith(jax_req), (flavour, jax_lines)
        assert any(x.startswith("psycopg") for x in lines), "the postgres extra"
        assert not any(x.startswith(("pytest", "torch")) for x in lines), "no test dependencies"
    bad = subprocess.run([sys.executable, str(dl.DOCKER / "requirements.py"), str(dl.REPO / "pyproject.toml"),
                          "--jax", "rocm"], capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown JAX flavour" in bad.stderr


def test_entrypoint_dispatches_to_commands_that_exist() -> None:
    parts = dl.entrypoint_parts()
    assert set(dl.PARTS) <= set(parts), sorted(parts)
    expect = {"admin": "Run the Saxplane admin server", "model-server": "Run a Saxplane model server",
              "frontend": "Run a Saxplane HTTP frontend", "saxutil": "Saxplane command line",
              "migrate": "Run the admin database's Alembic migrations"}
    for word, text in expect.items():
        out = subprocess.run([str(dl.ENTRYPOINT), word, "--help"], capture_output=True, text=True, timeout=60,
                             env=_venv_env(SAX_HEALTH_FILE=os.devnull))
        assert out.returncode == 0, f"{word}: {out.stderr}"
        assert text in out.stdout, f"{word}: {out.stdout[:300]}"
    usage = subprocess.run([str(dl.ENTRYPOINT), "help"], capture_output=True, text=True, check=True).stdout
    for word in dl.PARTS:
        assert f"  {word}" in usage
    passthrough = subprocess.run([str(dl.ENTRYPOINT), "python", "-c", "print('through')"], capture_output=True,
                                 text=True, env=_venv_env(), check=True)
    assert passthrough.stdout.strip() == "through"


def test_healthcheck_command(tmp_path: Path) -> None:
    health = tmp_path / "healthz"
    env = _venv_env(SAX_HEALTH_FILE=str(health))
    run = lambda: subprocess.run([str(dl.ENTRYPOINT), "healthcheck"], env=env, capture_output=True,  # noqa: E731
                                 text=True, timeout=30)
    assert run().returncode == 0, "no part started (saxutil, migrate): healthy"
    from tests.cluster import free_port

    health.write_text(f"http://127.0.0.1:{free_port()}/healthz\n")
    out = run()
    assert out.returncode == 1 and "unhealthy" in out.stderr


def test_project_installs_from_the_build_context(tmp_path: Path) -> None:
    """What the build stage does, from what `docker build` would send: a regular (not editable)
    install that carries the migrations, and runs from anywhere."""
    ctx = tmp_path / "context"
    ctx.mkdir()
    files = il.build_context(ctx)
    assert not any(f.startswith(("tests/", "bench/", ".git/")) for f in files), files
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(ctx)], check=True, timeout=300, cwd=tmp_path)
    (wheel,) = wheels.glob("saxplane-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for need in ("admin_server/__main__.py", "model_server/__main__.py", "http_frontend/__main__.py",
                 "client/cli.py", "saxutil/__main__.py", "common/gcs.py", "migrations/env.py",
                 "migrations/script.py.mako"):
        assert need in names, f"{need} missing from the image's install"
    assert any(n.startswith("migrations/versions/") and n.endswith(".py") for n in names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    env = _venv_env(PYTHONPATH=str(target))
    where = subprocess.run([sys.executable, "-c", "import admin_server, migrations; print(admin_server.__file__)"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(target)), where
    with postgres_database() as url:
        out = subprocess.run([sys.executable, "-c", "from saxutil.__main__ import main; main()", "migrate"],
                             env={**env, "SAX_DB_URL": url}, cwd=tmp_path, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0 and "database at head" in out.stdout, out.stderr
