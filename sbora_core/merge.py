"""Moved to `sbora_core.method.merge`; this path stays so code written against the flat layout
(the README's library example before the split) keeps importing. Code in this repository imports
from `sbora_core.method.merge` (tests/test_import_layers.py checks)."""

from sbora_core.method.merge import *  # noqa: F403
