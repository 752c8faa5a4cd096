"""Moved to `sbora_core.method.config`; this path stays so code written against the flat layout
(the README's library example before the split) keeps importing. Code in this repository imports
from `sbora_core.method.config` (tests/test_import_layers.py checks)."""

from sbora_core.method.config import *  # noqa: F403
