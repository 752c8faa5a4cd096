"""`sbora`: the command-line entry point.

Local commands (no server needed): `sbora train`, `sbora validate`, `sbora eval`.
Running the service: `sbora serve` (API + one worker), `sbora worker`, `sbora migrate`, `sbora keys`,
`sbora models` (list, add, remove base models).
Against a running server (SBORA_URL, SBORA_API_KEY): `sbora datasets`, `sbora jobs`, `sbora adapters`,
`sbora evals`, `sbora generate`.
"""

from __future__ import annotations

import typer

from sbora_cli import evals, local, remote, server

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Fine-tune and serve SBoRA adapters.")
local.register(app)
server.register(app)
remote.register(app)
evals.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
