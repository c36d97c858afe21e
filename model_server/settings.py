"""Model server configuration: SAX_* variables with CLI flags over them."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any, Mapping

from common.settings import DEFAULT_CELL, MODEL_SERVER_PORT, Env, split_csv, with_flags
from model_server.slice import SliceConfig


@dataclass(frozen=True)
class StaticModel:
    """A model loaded at start without an admin: `--model ID=MODEL_PATH:CHECKPOINT`."""
    model_id: str
    model_path: str
    checkpoint: str | None
    overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str) -> "StaticModel":
        model_id, sep, rest = spec.partition("=")
        model_path, sep2, checkpoint = rest.partition(":")
        if not sep or not sep2 or not model_id or not model_path:
            raise ValueError(f"--model expects ID=MODEL_PATH:CHECKPOINT, got {spec!r}")
        return cls(model_id, model_path, None if checkpoint in ("", "None") else checkpoint)


@dataclass(frozen=True)
class RequestLimits:
    """Per-request bounds of the data API (400 beyond them)."""
    max_prompt_tokens: int | None = None   # longest prompt; None: the model's context window
    max_tokens: int | None = None          # most tokens generated per request; None: up to the window
    max_n: int = 128                       # most samples per request (n, num_samples)


@dataclass(frozen=True)
class ModelServerSettings:
    host: str = "0.0.0.0"
    port: int = MODEL_SERVER_PORT
    # Address the admin and clients use to reach this server (default: hostname:port).
    advertise: str | None = None
    admin: str | None = None
    cell: str = DEFAULT_CELL
    chip: str | None = None          # default: detected from JAX (cpu, h100, tpuv5e, ...)
    topology: str | None = None      # default: the device count
    tags: tuple[str, ...] = ()
    memory_bytes: int | None = None  # accelerator memory; default: detected
    heartbeat_interval_s: float = 2.0
    cluster_token: str | None = None
    static_models: tuple[StaticModel, ...] = ()
    threads: int = 64
    cache_dir: str | None = None
    # XLA's persistent compilation cache: a restart or a second load of the same shapes
    # skips compilation (minutes for big models). "" turns it off.
    compilation_cache: str = os.path.expanduser("~/.cache/saxplane/xla")
    max_prompt_tokens: int | None = None
    max_tokens: int | None = None
    max_n: int = 128
    # a multi-host slice (SAX_SLICE_HOSTS, SAX_SLICE_RANK, SAX_COORDINATOR); None: this host alone
    slice: SliceConfig | None = None

    @property
    def limits(self) -> RequestLimits:
        return RequestLimits(self.max_prompt_tokens, self.max_tokens, self.max_n)

    @property
    def address(self) -> str:
        return self.advertise or f"{socket.gethostname()}:{self.port}"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "ModelServerSettings":
        e = Env(env)
        base = cls(
            port=e.integer("SAX_MODEL_SERVER_PORT", cls.port),
            advertise=e.text("SAX_ADVERTISE"),
            admin=e.text("SAX_ADMIN"),
            cell=e.text("SAX_CELL", DEFAULT_CELL),
            chip=e.text("SAX_CHIP"),
            topology=e.text("SAX_TOPOLOGY"),
            tags=e.csv("SAX_TAGS"),
            memory_bytes=e.integer("SAX_MEMORY_BYTES"),
            heartbeat_interval_s=e.number("SAX_HEARTBEAT_INTERVAL", cls.heartbeat_interval_s),
            cluster_token=e.text("SAX_CLUSTER_TOKEN"),
            cache_dir=e.text("SAX_CHECKPOINT_CACHE"),
            compilation_cache=e.raw("SAX_COMPILATION_CACHE", cls.compilation_cache),
            max_prompt_tokens=e.integer("SAX_MAX_PROMPT_TOKENS"),
            max_tokens=e.integer("SAX_MAX_TOKENS"),
            max_n=e.integer("SAX_MAX_N", cls.max_n),
            slice=SliceConfig.from_env(os.environ if env is None else env),
        )
        out = with_flags(base, overrides)
        for name in ("max_prompt_tokens", "max_tokens", "max_n"):
            value = getattr(out, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        return out


def parse_tags(text: str) -> tuple[str, ...]:
    """'a, b,,c' -> ('a', 'b', 'c')."""
    return split_csv(text)
