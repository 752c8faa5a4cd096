"""The service layer: what the API routes, the workers and the CLI do with datasets, jobs and adapters.

Every operation is scoped to a tenant; another tenant's object is
indistinguishable from a missing one. Problems are raised as the domain
errors of `app.errors` (no HTTP here); `app.main` maps them to status codes.
"""
