"""`sbora`: the command-line entry point.

Local commands (no server needed): `sbora train`, `sbora validate`, `sbora eval`, `sbora models`.
"""

from __future__ import annotations

import typer

from sbora_cli import local

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Fine-tune and serve SBoRA adapters.")
local.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
