"""Training: datasets, tokenisation, the job's settings, the loop, checkpoints and evaluation.

Stands on `sbora_core.method` and never imports `sbora_core.serving`.
"""
