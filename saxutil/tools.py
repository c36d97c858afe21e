"""`saxutil migrate` and `saxutil convert`: run by the parts that own them (the admin's
migrations, the model server's checkpoint converter), imported only when the command runs."""
from __future__ import annotations

import click


@click.command()
@click.option("--db-url", envvar="SAX_DB_URL", required=True, help="Database URL (SAX_DB_URL).")
@click.option("--revision", default="head", show_default=True)
def migrate(db_url: str, revision: str) -> None:
    """Run the admin database's Alembic migrations.

    Example: saxutil migrate --db-url postgresql+psycopg://postgres@localhost/sax
    """
    from admin_server.db import migrate as run

    run(db_url, revision)
    click.echo(f"database at {revision}")


@click.command()
@click.argument("source")
@click.argument("dest")
@click.option("--dtype", default="keep", show_default=True, type=click.Choice(["keep", "float32", "bfloat16"]))
def convert(source: str, dest: str, dtype: str) -> None:
    """Convert a Hugging Face checkpoint to Orbax (local paths or gs://).

    Example: saxutil convert ./gpt2 gs://bucket/gpt2-orbax
    """
    from model_server.convert import convert as run

    run(source, dest, dtype)
    click.echo(f"wrote an Orbax checkpoint to {dest}")
