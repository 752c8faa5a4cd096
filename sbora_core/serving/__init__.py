"""Serving: the generation engine, its decode paths, per-row adapter slots and the adapter cache.

Stands on `sbora_core.method` and never imports `sbora_core.training`.
"""
