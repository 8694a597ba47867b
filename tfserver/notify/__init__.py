"""Webhooks (DESIGN: Drift, schedules and notifications): payloads, Standard Webhooks
signing, the address rules of a target, and delivery at least once with retries, kept in
the backend's object store so a restart or another replica carries on.

Imports `storage` and the leaves only, and never blocks the caller: `Notifier.notify`
hands the delivery to a background thread.
"""
