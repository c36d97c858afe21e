"""`saxutil` (`python -m saxutil`): client.cli's group with `up`, `migrate` and `convert` beside
its commands."""
from __future__ import annotations

from client.cli import SaxGroup
from client.cli import main as client_main
from saxutil.local_cell import up
from saxutil.tools import convert, migrate

main = SaxGroup(name="saxutil", commands={**client_main.commands, "up": up, "migrate": migrate,
                                          "convert": convert},
                params=client_main.params, callback=client_main.callback, help=client_main.help,
                context_settings=client_main.context_settings)

if __name__ == "__main__":
    main()
