"""`saxutil`'s client commands: Saxml's command line over HTTP (click).

Talks to the admin given by --admin or SAX_ADMIN (default localhost:10000)
and to model replicas through the client library's routing. The commands that
start or change other parts (`up`, `migrate`, `convert`) are added beside it,
by the `saxutil` package.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable

import click

from client import errors
from client import sax
from client.admin import AdminClient
from client.overrides import parse_overrides


# Exit codes (client/README.md, "saxutil"): every failure prints one line on stderr.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _fail(message: str, code: int = EXIT_FAILED) -> None:
    click.echo(f"saxutil: {message}", err=True)
    sys.exit(code)


class SaxGroup(click.Group):
    """Every failure is one line on stderr: exit 1 when the command failed (the cell's answer,
    a connection, a file), 2 when it was called wrongly (a usage error, with the command whose
    --help tells the right way), 130 when interrupted."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx else "saxutil"
            _fail(f"{e.format_message()} (see '{where} --help')", EXIT_USAGE)
        except click.ClickException as e:
            _fail(e.format_message())
        except click.exceptions.Abort:
            _fail("interrupted", EXIT_INTERRUPTED)
        sys.exit(rv if isinstance(rv, int) else EXIT_OK)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except errors.SaxError as e:
            _fail(f"{type(e).__name__}: {e.message}")
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as e:  # e.g. a database or checkpoint error: one line, not a traceback
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            _fail(f"{type(e).__name__}: {first}" if not isinstance(e, (ValueError, OSError)) else str(e))


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line, fmt(headers), line, *[fmt(r) for r in cells], line])


@click.group(cls=SaxGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--admin", envvar="SAX_ADMIN", default="localhost:10000", show_default=True,
              help="Admin server host:port (SAX_ADMIN).")
@click.pass_context
def main(ctx: click.Context, admin: str) -> None:
    """Saxplane command line: publish models, inspect the cell, call models.

    Example: saxutil --admin localhost:10000 ls /sax/test
    """
    ctx.obj = {"admin": admin}


def _admin(ctx: click.Context) -> AdminClient:
    return AdminClient(ctx.obj["admin"])


def _progress(model_id: str) -> Callable[[sax.ModelDetail], None]:
    started = time.monotonic()
    last = [""]

    def show(d: sax.ModelDetail) -> None:
        states = ", ".join(f"{r.address} {r.status}" for r in d.replicas) or "waiting for a server"
        line = f"{model_id}: {d.active_replicas}/{d.target_replicas} ready ({states}) {time.monotonic() - started:.0f}s"
        if d.reason and d.reason != d.last_error:
            line += f"\n  not placed: {d.reason}"
        if d.last_error:
            line += f"\n  last error: {d.last_error}"
        if line != last[0]:
            click.echo(line, err=True)
            last[0] = line
    return show


def _scaling_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
            click.option("--min-replicas", type=click.IntRange(min=0),
                         help="Fewest replicas autoscaling keeps (0: scale to zero when idle; default: replicas)."),
            click.option("--max-replicas", type=click.IntRange(min=0),
                         help="Most replicas autoscaling adds under load (default: replicas)."),
            click.option("--idle-seconds", type=click.FloatRange(min=0, min_open=True),
                         help="Seconds without requests before a replica above the minimum is released "
                              "(default 300).")]):
        fn = option(fn)
    return fn


@main.command()
@click.argument("model_id")
@click.argument("model_path")
@click.argument("checkpoint")
@click.argument("replicas", type=int)
@click.argument("overrides", nargs=-1)
@click.option("--wait/--no-wait", default=False, help="Wait until the replicas are ready.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait with --wait.")
@_scaling_options
@click.pass_context
def publish(ctx: click.Context, model_id: str, model_path: str, checkpoint: str, replicas: int,
            overrides: tuple[str, ...], wait: bool, timeout: float, **scaling: Any) -> None:
    """Publish a model.

    Example: saxutil publish /sax/test/lm test.tiny None 1 num_slots=4 --wait

    Autoscaled, idle to zero: saxutil publish /sax/test/lm test.tiny None 1 --min-replicas 0 --max-replicas 3
    """
    d = _admin(ctx).publish(model_id, model_path, checkpoint, replicas, parse_overrides(overrides), **scaling)
    click.echo(f"published {model_id}")
    _snapshot_note(d)
    if wait and replicas:
        sax.WaitForReady(model_id, replicas, timeout, admin=ctx.obj["admin"], progress=_progress(model_id))
        click.echo(f"{model_id} is ready")


@main.command()
@click.argument("model_id")
@click.pass_context
def unpublish(ctx: click.Context, model_id: str) -> None:
    """Unpublish a model.

    Example: saxutil unpublish /sax/test/lm
    """
    d = _admin(ctx).unpublish(model_id)
    click.echo(f"unpublished {model_id}")
    _snapshot_note(d)


@main.command()
@click.argument("model_id")
@click.option("--replicas", type=int, help="New number of replicas (reloads nothing).")
@click.option("--checkpoint", help="New checkpoint (rolls replicas over, new before old).")
@_scaling_options
@click.pass_context
def update(ctx: click.Context, model_id: str, replicas: int | None, checkpoint: str | None,
           **scaling: Any) -> None:
    """Change a model's replicas, checkpoint and/or autoscaling bounds.

    Example: saxutil update /sax/test/lm --replicas 3
    """
    if replicas is None and checkpoint is None and all(v is None for v in scaling.values()):
        raise click.UsageError("give --replicas, --checkpoint, --min-replicas, --max-replicas and/or --idle-seconds")
    d = _admin(ctx).update(model_id, replicas=replicas, checkpoint=checkpoint, **scaling)
    click.echo(f"updated {model_id}: checkpoint {d['checkpoint']}, {d['requested_replicas']} replicas "
               f"({d['min_replicas']}..{d['max_replicas']}, idle {d['idle_seconds']:g}s)")
    _snapshot_note(d)


def _snapshot_note(answer: dict[str, Any]) -> None:
    """Warns (stderr) when the admin committed a change that its blob-store snapshot does not
    hold yet: the database alone has it until the store is back."""
    snap = answer.get("snapshot") or {}
    if snap.get("behind"):
        click.echo(f"saxutil: warning: committed, but the blob-store snapshot is behind (at version "
                   f"{snap.get('snapshot_version')}, the change is {snap.get('version')}); it is written "
                   "when the store is reachable again", err=True)


def _snapshot_behind(admin: AdminClient) -> None:
    stats = admin.stats()
    if stats.get("snapshot_behind"):
        click.echo(f"warning: the blob-store snapshot is {stats['snapshot_behind']} change(s) behind the "
                   "database (the blob store is unreachable, or no admin leads)", err=True)


@main.command()
@click.argument("path", default="/sax")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def ls(ctx: click.Context, path: str, as_json: bool) -> None:
    """List cells, the models of a cell, or one model.

    Example: saxutil ls /sax/test/lm
    """
    admin = _admin(ctx)
    parts = [p for p in path.split("/") if p]
    if not parts or parts[0] != "sax" or len(parts) > 3:
        raise click.BadParameter("expected /sax, /sax/<cell> or /sax/<cell>/<model>", param_hint="PATH")
    if len(parts) == 1:
        cell = admin.healthz()["cell"]
        click.echo(json.dumps([cell]) if as_json else table(["#", "Cell"], [[1, cell]]))
    elif len(parts) == 2:
        models = admin.models(path)
        click.echo(json.dumps(models) if as_json else
                   table(["#", "Model ID"], [[i + 1, m] for i, m in enumerate(models)]))
        _snapshot_behind(admin)
    else:
        d = admin.model(path)
        if as_json:
            click.echo(json.dumps(d, indent=2))
            return
        click.echo(table(["Model", "Model Path", "Checkpoint Path", "# of Replicas", "Active", "Min", "Max",
                          "State"],
                         [[d["model_id"], d["model_path"], d["checkpoint"], d["target_replicas"],
                           d["active_replicas"], d["min_replicas"], d["max_replicas"], d["state"]]]))
        scale = d.get("last_scale") or {}
        if scale.get("reason"):
            ago = f" ({time.time() - scale['at']:.0f}s ago)" if scale.get("at") else ""
            click.echo(f"last scaling: {scale['reason']}{ago}")
        if d.get("reason") and d["reason"] != d.get("last_error"):
            click.echo(f"not placed: {d['reason']}")
        if d["replicas"]:
            click.echo(table(["Replica Address", "Status", "Generation", "Error or progress"],
                             [[r["address"], r["status"], r["generation"], r.get("error") or ""]
                              for r in d["replicas"]]))
        if d.get("last_error"):
            click.echo(f"last error: {d['last_error']}")
        _snapshot_behind(admin)


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def servers(ctx: click.Context, as_json: bool) -> None:
    """List model servers with chip, memory and models.

    Example: saxutil servers
    """
    rows = _admin(ctx).servers()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(table(["Address", "Chip", "Topology", "Memory (GiB)", "Alive", "Models"],
                     [[s["address"], s["chip"], s["topology"], f"{s['memory_bytes'] / 2**30:.1f}",
                       "yes" if s["alive"] else "no",
                       ", ".join(f"{m['model_id']}@{m['generation']} {m['status']}" for m in s["models"])]
                      for s in rows]))


@main.command()
@click.argument("model_id")
@click.option("--count", type=int, default=0, help="Stop after this many lines (0: run until Ctrl-C).")
@click.pass_context
def watch(ctx: click.Context, model_id: str, count: int) -> None:
    """Print '+ addr' / '- addr' as ready replicas come and go.

    Example: saxutil watch /sax/test/lm
    """
    admin = _admin(ctx)
    known: set[str] = set()
    version = None
    changes = 0
    while True:
        loc = admin.locate(model_id, version=version, wait_s=20.0)
        version = loc["version"]
        now = set(loc["addresses"])
        for line in [f"+ {a}" for a in sorted(now - known)] + [f"- {a}" for a in sorted(known - now)]:
            click.echo(line)
            sys.stdout.flush()
            changes += 1
            if count and changes >= count:
                return
        known = now


def _extra(extra: str | None) -> sax.ModelOptions:
    opts = sax.ModelOptions()
    for item in filter(None, (extra or "").split(",")):
        key, sep, value = item.partition(":")
        if not sep:
            raise click.BadParameter(f"expected key:value, got {item!r}", param_hint="--extra")
        try:
            opts.SetExtraInput(key.strip(), float(value))
        except ValueError:
            raise click.BadParameter(f"{key}: {value!r} is not a number", param_hint="--extra") from None
    return opts


@main.command("lm.generate")
@click.argument("model_id")
@click.argument("query")
@click.option("-n", "num_samples", type=int, default=None, help="Number of samples.")
@click.option("--stream", is_flag=True, help="Print text as it arrives.")
@click.option("--extra", help="Extra inputs, e.g. temperature:0.5,per_example_max_decode_steps:32.")
@click.option("--json-schema", "json_schema", default=None,
              help="Constrain the output to a JSON Schema: inline JSON or @file.json.")
@click.option("--timeout", type=float, default=None, help="Seconds before giving up.")
@click.pass_context
def lm_generate(ctx: click.Context, model_id: str, query: str, num_samples: int | None, stream: bool,
                extra: str | None, json_schema: str | None, timeout: float | None) -> None:
    """Generate text; QUERY '-' reads standard input.

    Example: saxutil lm.generate /sax/test/lm "Q: why is the sky blue? A:" --extra temperature:0
    """
    if query == "-":
        query = sys.stdin.read()
    opts = _extra(extra)
    if num_samples:
        opts.SetExtraInput("num_samples", num_samples)
    if json_schema:
        if json_schema.startswith("@"):
            with open(json_schema[1:], encoding="utf-8") as f:
                json_schema = f.read()
        opts.SetExtraInputString("json_schema", json_schema)
    if timeout:
        opts.SetTimeout(timeout)
    lm = sax.Model(model_id, sax.Options(admin=ctx.obj["admin"])).LM()
    if stream:
        for text, _index, _score in lm.GenerateStream(query, options=opts):  # type: ignore[union-attr]
            click.echo(text, nl=False)
            sys.stdout.flush()
        click.echo()
        return
    results = lm.Generate(query, opts)
    click.echo(table(["Generate", "Score"], [[t, f"{s:.4f}"] for t, s in results]))


@main.command("lm.score")
@click.argument("model_id")
@click.argument("prefix")
@click.argument("suffixes", nargs=-1, required=True)
@click.pass_context
def lm_score(ctx: click.Context, model_id: str, prefix: str, suffixes: tuple[str, ...]) -> None:
    """Log-probability of each suffix after the prefix.

    Example: saxutil lm.score /sax/test/lm "the sky is" " blue" " green"
    """
    lm = sax.Model(model_id, sax.Options(admin=ctx.obj["admin"])).LM()
    scores = lm.Score(prefix, list(suffixes))
    click.echo(table(["Suffix", "Score"], [[s, f"{v:.4f}"] for s, v in zip(suffixes, scores)]))


@main.command("lm.embed")
@click.argument("model_id")
@click.argument("text")
@click.pass_context
def lm_embed(ctx: click.Context, model_id: str, text: str) -> None:
    """Embedding of a text (JSON list of floats).

    Example: saxutil lm.embed /sax/test/lm "hello"
    """
    click.echo(json.dumps(sax.Model(model_id, sax.Options(admin=ctx.obj["admin"])).LM().Embed(text)))


if __name__ == "__main__":
    main()
