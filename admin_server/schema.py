"""The cell's durable state: SQLAlchemy 2.0 typed ORM tables.

Times that are compared with each other (heartbeats, lease expiry, retry
back-off) are epoch seconds in a double column so SQLite and PostgreSQL
behave alike; audit timestamps are timezone-aware datetimes.
"""
from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (JSON, BigInteger, DateTime, Double, Enum, ForeignKey, Index, Integer,
                        MetaData, String, Text, UniqueConstraint, func)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON}


class ModelState(enum.StrEnum):
    ACTIVE = "ACTIVE"
    UNPUBLISHING = "UNPUBLISHING"


class Wanted(enum.StrEnum):
    LOADED = "LOADED"
    UNLOADED = "UNLOADED"


class Observed(enum.StrEnum):
    NONE = "NONE"
    LOADING = "LOADING"
    LOADED = "LOADED"
    FAILED = "FAILED"
    UNLOADING = "UNLOADING"


def _enum_column(cls: type[enum.StrEnum]) -> Enum:
    """A column of `cls` members, stored as their values in a VARCHAR(16) (the type the
    migrations created; no native database enum to alter when a state is added)."""
    return Enum(cls, native_enum=False, create_constraint=False, length=16, validate_strings=True,
                values_callable=lambda members: [m.value for m in members])


class PublishedModel(Base):
    """A published model: what the cell should serve."""
    __tablename__ = "models"

    model_id: Mapped[str] = mapped_column(String(300), primary_key=True)
    cell: Mapped[str] = mapped_column(String(128), index=True)
    model_path: Mapped[str] = mapped_column(String(255))
    checkpoint: Mapped[str | None] = mapped_column(String(1024))
    requested_replicas: Mapped[int] = mapped_column(Integer)
    # Autoscaling bounds (both default to `requested_replicas`) and the idle time after
    # which a replica above `min_replicas` is released.
    min_replicas: Mapped[int] = mapped_column(Integer, server_default="0")
    max_replicas: Mapped[int] = mapped_column(Integer, server_default="0")
    idle_seconds: Mapped[float] = mapped_column(Double, server_default="300")
    # The leader's current replica count, between min and max; why and when it last moved.
    target_replicas: Mapped[int] = mapped_column(Integer, server_default="0")
    scale_reason: Mapped[str | None] = mapped_column(Text)
    scaled_at: Mapped[float | None] = mapped_column(Double)
    # Since when the waiting work per replica stayed above the scale-up target / below the
    # scale-down one (the leader's windows).
    busy_since: Mapped[float | None] = mapped_column(Double)
    calm_since: Mapped[float | None] = mapped_column(Double)
    # The last data call that found no ready replica (it asks the admin to load one).
    demand_at: Mapped[float | None] = mapped_column(Double)
    # Why a wanted replica is not placed (None when every wanted replica has a server).
    placement_note: Mapped[str | None] = mapped_column(Text)
    overrides: Mapped[dict[str, Any]] = mapped_column(default=dict)
    uuid: Mapped[str] = mapped_column(String(36))
    # Bumped when the checkpoint changes; replicas of older generations drain.
    generation: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[ModelState] = mapped_column(_enum_column(ModelState), default=ModelState.ACTIVE)
    # Accelerator bytes one replica needs, learned from the first loaded replica.
    memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    retry_after: Mapped[float | None] = mapped_column(Double)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now())

    replicas: Mapped[list["Replica"]] = relationship(
        back_populates="model", cascade="all, delete-orphan", passive_deletes=True)


class ModelServer(Base):
    """A model server that has announced itself; the row goes when it stops heartbeating."""
    __tablename__ = "servers"

    address: Mapped[str] = mapped_column(String(255), primary_key=True)
    cell: Mapped[str] = mapped_column(String(128), index=True)
    boot_id: Mapped[str] = mapped_column(String(64))
    chip: Mapped[str] = mapped_column(String(64))
    topology: Mapped[str] = mapped_column(String(64))
    device_count: Mapped[int] = mapped_column(Integer)
    memory_bytes: Mapped[int] = mapped_column(BigInteger)
    tags: Mapped[list[str]] = mapped_column(default=list)
    servable_model_paths: Mapped[list[str]] = mapped_column(default=list)
    first_seen: Mapped[float] = mapped_column(Double)
    last_heartbeat: Mapped[float] = mapped_column(Double, index=True)
    # Bumped by the leader whenever this server's desired set changes; a heartbeat
    # that carries the current one (and an unchanged report) gets a short answer.
    assignment_version: Mapped[int] = mapped_column(BigInteger, default=0)
    # Digests of the description and model report last written for this server.
    desc_digest: Mapped[str] = mapped_column(String(32), default="")
    report_digest: Mapped[str] = mapped_column(String(32), default="")

    replicas: Mapped[list["Replica"]] = relationship(
        back_populates="server", cascade="all, delete-orphan", passive_deletes=True)


class Replica(Base):
    """One model on one server: the leader's wish (wanted) and the server's report (observed)."""
    __tablename__ = "replicas"
    __table_args__ = (UniqueConstraint("model_id", "server_address", "generation"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[str] = mapped_column(
        ForeignKey("models.model_id", ondelete="CASCADE"), index=True)
    server_address: Mapped[str] = mapped_column(ForeignKey("servers.address", ondelete="CASCADE"))
    generation: Mapped[int] = mapped_column(Integer)
    checkpoint: Mapped[str | None] = mapped_column(String(1024))
    wanted: Mapped[Wanted] = mapped_column(_enum_column(Wanted), default=Wanted.LOADED)
    observed: Mapped[Observed] = mapped_column(_enum_column(Observed), default=Observed.NONE)
    error: Mapped[str | None] = mapped_column(Text)
    memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    load_time_s: Mapped[float | None] = mapped_column(Double)
    # The load the server last reported (requests running and queued) and when the replica
    # last served a request (epoch seconds): autoscaling and LRU eviction read these.
    running: Mapped[int] = mapped_column(Integer, server_default="0")
    waiting: Mapped[int] = mapped_column(Integer, server_default="0")
    last_used_at: Mapped[float | None] = mapped_column(Double)
    # Set on a failed replica: the server is not tried again for this model before then.
    retry_after: Mapped[float | None] = mapped_column(Double)
    created_at: Mapped[float] = mapped_column(Double)
    updated_at: Mapped[float] = mapped_column(Double, index=True)

    model: Mapped[PublishedModel] = relationship(back_populates="replicas")
    server: Mapped[ModelServer] = relationship(back_populates="replicas")


class Lease(Base):
    """The leader lease of one cell; `epoch` fences every leader write."""
    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    epoch: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[float] = mapped_column(Double)


class CellState(Base):
    """Per-cell counters: `version` counts changes to published models; the
    leader snapshots to the blob store whenever it is ahead of `snapshot_version`."""
    __tablename__ = "cells"

    cell: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, default=0)
    snapshot_version: Mapped[int] = mapped_column(BigInteger, default=0)
    restored_from: Mapped[str | None] = mapped_column(String(1024))


Index("ix_replicas_server_wanted", Replica.server_address, Replica.wanted)
