"""Prints the image's Python requirements, one per line, for `pip install -r`.

Used by docker/Dockerfile's build stage (before the sources are copied, so the
dependency layer is cached across code changes):

    python requirements.py pyproject.toml --extras postgres --jax cpu|cuda12|tpu

The project's own `jax` requirement gets the flavour's extra (`jax[cuda12]`,
`jax[tpu]`), keeping its version bounds; `cpu` leaves it as it is.
"""
from __future__ import annotations

import argparse
import re
import sys
import tomllib

# JAX flavour -> (extra on the jax requirement, extra pip options)
FLAVOURS: dict[str, tuple[str | None, list[str]]] = {
    "cpu": (None, []),
    "cuda12": ("cuda12", []),
    # libtpu wheels for older jax releases are only on this index; newer ones are on PyPI.
    "tpu": ("tpu", ["--find-links https://storage.googleapis.com/jax-releases/libtpu_releases.html"]),
}

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")


def requirements(pyproject: dict, extras: list[str], flavour: str) -> list[str]:
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown JAX flavour {flavour!r}; expected one of {', '.join(FLAVOURS)}")
    extra, options = FLAVOURS[flavour]
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    reqs = list(project["dependencies"])
    for name in extras:
        if name not in optional:
            raise ValueError(f"pyproject.toml has no extra {name!r}")
        reqs += optional[name]
    out = list(options)
    seen_jax = False
    for req in reqs:
        m = _NAME.match(req)
        if m and m.group(1).lower() == "jax":
            seen_jax = True
            if extra:
                req = f"jax[{extra}]{m.group(3)}"
        out.append(req)
    if not seen_jax:
        out.append(f"jax[{extra}]" if extra else "jax")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pyproject")
    ap.add_argument("--extras", default="", help="comma-separated extras of the project to include")
    ap.add_argument("--jax", default="cpu", help="JAX flavour: " + ", ".join(FLAVOURS))
    args = ap.parse_args(argv)
    with open(args.pyproject, "rb") as f:
        pyproject = tomllib.load(f)
    try:
        lines = requirements(pyproject, [e for e in args.extras.split(",") if e], args.jax)
    except ValueError as e:
        print(f"requirements.py: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
