"""API keys of the endpoint: create, list, revoke; the local key the documentation's examples use."""

from __future__ import annotations

import logging
import os
import sys

from nightshift.settings import (
    Settings,
)

log = logging.getLogger("nightshift")


def cmd_keys(settings: Settings, args) -> int:
    from nightshift.serving.keys import KeyStore

    store = KeyStore(settings.key_file)
    if args.action == "create":
        record, key = store.create(args.name)
        print(f"created key {record.id} ({record.name}); it is shown only this once:\n{key}")
        return 0
    if args.action == "revoke":
        if not args.id:
            raise SystemExit("nightshift keys revoke needs a key id or name (see `nightshift keys list`)")
        revoked = store.revoke(args.id)
        if not revoked:
            print(f"no active key has the id or name {args.id!r}", file=sys.stderr)
            return 1
        for record in revoked:
            print(f"revoked key {record.id} ({record.name}, {record.hint}); the endpoint refuses it within a second")
        return 0
    records = store.records()
    if not records:
        print(f"no keys in {settings.key_file}; create one with `nightshift keys create --name NAME`")
        return 0
    print(f"{'id':<10}{'name':<24}{'key':<16}{'created':<27}revoked")
    for r in records:
        print(f"{r.id:<10}{r.name:<24}{r.hint:<16}{r.created_at:<27}{r.revoked_at or '-'}")
    return 0


def build_keyring(settings: Settings):
    """Return the keys the endpoint accepts: the key file, NIGHTSHIFT_API_KEYS and the serving connection."""
    from nightshift.airflow.connections import api_key_hashes
    from nightshift.serving.keys import KeyRing, KeyStore, hashes_of

    fixed = {h: "env" for h in hashes_of(os.environ.get("NIGHTSHIFT_API_KEYS", "").split(","),
                                         "NIGHTSHIFT_API_KEYS")}
    fixed.update(api_key_hashes(settings.serving_conn_id))
    return KeyRing(KeyStore(settings.key_file), fixed)


def ensure_local_key(settings: Settings) -> None:
    from nightshift.serving.keys import KeyStore, ensure_local_key

    path, created = ensure_local_key(KeyStore(settings.key_file), settings.local_key_file)
    log.info("%s API key for local use: %s (send it as `Authorization: Bearer $(cat %s)`)",
             "created an" if created else "the", path, path)
