"""API keys: format, hashed storage, revocation, the local key, deployment keys."""

import stat

import pytest

from nightshift.serving.keys import KEY_PATTERN, KeyRing, KeyStore, ensure_local_key, hashes_of, key_hash, new_key


def test_keys_carry_a_recognisable_prefix_and_are_random():
    keys = {new_key() for _ in range(50)}
    assert len(keys) == 50
    assert all(k.startswith("ns-") and len(k) == 46 and KEY_PATTERN.fullmatch(k) for k in keys)
    leaked = f"config: token={next(iter(keys))}; other text"
    assert KEY_PATTERN.search(leaked)


def test_the_store_keeps_only_hashes_in_a_private_file(tmp_path):
    store = KeyStore(tmp_path / "serving" / "api_keys.json")
    record, key = store.create("ci")
    content = store.path.read_text()
    assert key not in content and key_hash(key) in content
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert record.hint.startswith("ns-") and record.hint.endswith(key[-4:]) and len(record.hint) < 15
    assert store.active_hashes() == {key_hash(key): record.id}
    with pytest.raises(ValueError, match="key name"):
        store.create("../etc/passwd")


def test_revoked_keys_stop_working_without_a_restart(tmp_path):
    store = KeyStore(tmp_path / "api_keys.json")
    ring = KeyRing(store, recheck_seconds=0)
    (a, key_a), (b, key_b) = store.create("alice"), store.create("bob")
    assert ring.identify(key_a) == a.id and ring.identify(key_b) == b.id
    assert [r.id for r in store.revoke("alice")] == [a.id]
    assert ring.identify(key_a) is None and ring.identify(key_b) == b.id
    assert store.revoke(b.id) and ring.identify(key_b) is None
    assert store.revoke("nobody") == []
    assert len([r for r in store.records() if r.revoked_at]) == 2


def test_the_local_key_is_created_once_and_renewed_when_revoked(tmp_path):
    store = KeyStore(tmp_path / "api_keys.json")
    key_file = tmp_path / "local.key"
    path, created = ensure_local_key(store, key_file)
    assert created and stat.S_IMODE(path.stat().st_mode) == 0o600
    first = path.read_text().strip()
    assert ensure_local_key(store, key_file) == (key_file, False) and key_file.read_text().strip() == first
    store.revoke("local")
    _, created = ensure_local_key(store, key_file)
    assert created and key_file.read_text().strip() != first


def test_deployment_keys_may_be_plain_or_hashed_and_garbage_is_refused_without_echo():
    key = new_key()
    other = new_key()
    assert hashes_of([key, f" {key_hash(other)} ", ""], "env") == {key_hash(key), key_hash(other)}
    with pytest.raises(ValueError) as refused:
        hashes_of(["hunter2"], "NIGHTSHIFT_API_KEYS")
    assert "NIGHTSHIFT_API_KEYS" in str(refused.value) and "hunter2" not in str(refused.value)
    ring = KeyRing(None, {key_hash(key): "env"})
    assert ring.identify(key) == "env" and ring.identify(other) is None and len(ring) == 1
