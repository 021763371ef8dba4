"""`nightshift keys`: the key is shown once at creation, never listed, and revocation takes effect."""

import os
import subprocess
import sys

from nightshift.serving.keys import KEY_PATTERN, KeyRing, KeyStore


def nightshift(home, *args):
    env = {**os.environ, "NIGHTSHIFT_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "nightshift.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_keys_create_list_revoke(tmp_path):
    created = nightshift(tmp_path, "keys", "create", "--name", "dashboard")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert KEY_PATTERN.fullmatch(key)
    ring = KeyRing(KeyStore(tmp_path / "serving" / "api_keys.json"), recheck_seconds=0)
    assert ring.identify(key)

    listed = nightshift(tmp_path, "keys", "list")
    assert "dashboard" in listed.stdout and key not in listed.stdout and key[-4:] in listed.stdout

    assert nightshift(tmp_path, "keys", "revoke", "nobody").returncode == 1
    revoked = nightshift(tmp_path, "keys", "revoke", "dashboard")
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    assert ring.identify(key) is None
