"""Readers for the image's build files: the Dockerfile (stages, instructions, ARG/ENV) and
.dockerignore (the build context docker would send), in the subset the repository uses."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tests.deploy.deploylib import DOCKERFILE, DOCKERIGNORE, REPO


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
