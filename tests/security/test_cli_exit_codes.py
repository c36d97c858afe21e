"""saxutil's failures: one line on stderr, exit 1 for a failed command, 2 for a usage error
(the scheme client/README.md documents)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.cluster import REPO, free_port

USAGE = [
    ["lm.generate", "/sax/test/lm", "hi", "--extra", "temperature=0.5"],   # k=v instead of k:v
    ["lm.generate", "/sax/test/lm", "hi", "--extra", "temperature:warm"],  # not a number
    ["publish", "/sax/test/x"],                                            # missing arguments
    ["update", "/sax/test/x"],                                             # nothing to change
    ["no-such-command"],
    ["ls", "--no-such-flag"],
]


def saxutil(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "saxutil", "--admin", f"127.0.0.1:{free_port()}", *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.mark.parametrize("args", USAGE, ids=lambda a: " ".join(a))
def test_usage_errors_are_one_line_and_exit_2(args: list[str]) -> None:
    r = saxutil(*args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.startswith("saxutil: ") and r.stderr.count("\n") == 1, r.stderr
    assert "--help" in r.stderr and r.stdout == ""


def test_a_failed_command_is_one_line_and_exits_1() -> None:
    r = saxutil("ls")  # nothing listens at the admin address
    assert r.returncode == 1 and r.stderr.startswith("saxutil: Unavailable") and r.stderr.count("\n") == 1, r.stderr


def test_help_exits_0() -> None:
    r = saxutil("lm.generate", "--help")
    assert r.returncode == 0 and "Example:" in r.stdout
