"""HTTP frontend configuration: SAX_* variables with CLI flags over them (see __main__)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from common.settings import DEFAULT_ADMIN, FRONTEND_PORT, Env, with_flags


def parse_aliases(specs: tuple[str, ...] | list[str]) -> tuple[tuple[str, str], ...]:
    """`NAME=MODEL_ID` entries -> ((name, model_id), ...); raises ValueError on a bad entry."""
    out = []
    for spec in specs:
        name, sep, model_id = spec.partition("=")
        name, model_id = name.strip(), model_id.strip()
        if not sep or not name or not model_id.startswith("/sax/"):
            raise ValueError(f"an alias is NAME=/sax/CELL/MODEL, got {spec!r}")
        out.append((name, model_id))
    return tuple(out)


@dataclass(frozen=True)
class FrontendSettings:
    host: str = "0.0.0.0"
    port: int = FRONTEND_PORT
    admin: str = DEFAULT_ADMIN                     # admin server host:port
    api_keys: tuple[str, ...] = ()                 # Bearer keys for data calls; none: open
    admin_token: str | None = None                 # needed for publish/unpublish/update; sent to the admin
    allowed_origins: tuple[str, ...] = ()          # CORS origins ("*" for any); none: CORS off
    max_body_bytes: int = 16 << 20
    max_outstanding_per_model: int = 512           # 429 beyond (0: no limit)
    max_n: int = 128                               # n / num_samples refused beyond, before routing
    max_streams_per_key: int = 0                   # open streams per API key, 429 beyond (0: no limit)
    aliases: tuple[tuple[str, str], ...] = ()      # OpenAI model names -> Sax model ids
    default_model: str | None = None               # for calls that name no model (/tokenize, ...)
    workers: int = 2
    threads: int = 64
    upstream_timeout_s: float = 600.0              # most seconds between two bytes of an upstream answer
    max_attempts: int = 3                          # replicas tried before the first byte
    load_wait_s: float = 300.0                     # a call for an idle model waits this long for a replica
    models_cache_s: float = 2.0                    # how long the published-model list is reused
    fanout_threads: int = 64                       # parallel upstream calls for prompt lists, per worker
    graceful_timeout_s: int = 30                   # in-flight streams drain this long on SIGTERM

    @property
    def alias_map(self) -> dict[str, str]:
        return dict(self.aliases)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "FrontendSettings":
        e = Env(env)
        base = cls(
            host=e.text("SAX_FRONTEND_HOST", cls.host),
            port=e.integer("SAX_FRONTEND_PORT", cls.port),
            admin=e.text("SAX_ADMIN", DEFAULT_ADMIN),
            api_keys=e.csv("SAX_API_KEYS"),
            admin_token=e.text("SAX_ADMIN_TOKEN"),
            allowed_origins=e.csv("SAX_ALLOWED_ORIGINS"),
            max_body_bytes=e.integer("SAX_MAX_BODY_BYTES", cls.max_body_bytes),
            max_outstanding_per_model=e.integer("SAX_MAX_OUTSTANDING_PER_MODEL", cls.max_outstanding_per_model),
            max_n=e.integer("SAX_FRONTEND_MAX_N", cls.max_n),
            max_streams_per_key=e.integer("SAX_MAX_STREAMS_PER_KEY", cls.max_streams_per_key),
            aliases=parse_aliases(e.csv("SAX_ALIASES")),
            default_model=e.text("SAX_DEFAULT_MODEL"),
            workers=e.integer("SAX_FRONTEND_WORKERS", cls.workers),
            threads=e.integer("SAX_FRONTEND_THREADS", cls.threads),
            upstream_timeout_s=e.number("SAX_UPSTREAM_TIMEOUT", cls.upstream_timeout_s),
            load_wait_s=e.number("SAX_LOAD_WAIT", cls.load_wait_s),
        )
        return with_flags(base, overrides)
