#!/usr/bin/env bash
# Entry point of the nightshift Airflow image: apply airflow_settings.yaml (connections, pools, variables;
# an idempotent upsert, so every component may run it) as soon as the metadata DB is migrated, in the
# background, then hand over to the official entry point unchanged.
set -euo pipefail
if [[ "${NIGHTSHIFT_APPLY_SETTINGS:-true}" == "true" ]]; then
  (nightshift apply-settings --wait "${NIGHTSHIFT_APPLY_SETTINGS_WAIT:-600}" \
    || echo "nightshift: airflow_settings.yaml was not applied; run 'nightshift apply-settings'" >&2) &
fi
exec /entrypoint "$@"
