"""Child processes, as a supervisor reports them."""

from __future__ import annotations

import signal


def exit_reason(code: int | None) -> str:
    """`killed by SIGKILL`, `exited with code 3`, or `still running`."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"
