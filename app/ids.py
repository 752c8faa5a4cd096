"""Object ids: a type prefix and 96 random bits, safe in URLs and never a path."""

from __future__ import annotations

import re
import secrets

_ID = re.compile(r"^[a-z]{2,4}_[0-9a-f]{24}$")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def well_formed_id(value: str) -> bool:
    """Ids are opaque tokens we minted; anything else (a path, say) cannot name an object."""
    return bool(_ID.match(value))
