"""Registers the nightshift report pages with the Airflow UI (the app lives in nightshift.airflow.reports_app).

- **nightshift** in the navigation: dataset versions, model versions and recent alerts.
- **Reports** on every DAG run: that run's page (collection, preparation, profile and drift, Data Docs for
  ingest_corpus; loss curve, evaluation and gate for finetune_model).
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from nightshift.airflow.reports_app import PREFIX, create_app


class NightshiftReportsPlugin(AirflowPlugin):
    name = "nightshift"
    fastapi_apps = [{"app": create_app(), "url_prefix": PREFIX, "name": "nightshift reports"}]
    external_views = [
        {"name": "nightshift", "href": f"{PREFIX}/", "destination": "nav", "url_route": "nightshift",
         "category": "browse"},
        # The UI fills in the run's ids (URL-encoded) for views shown on a DAG run.
        {"name": "Reports", "href": f"{PREFIX}/runs/{{DAG_ID}}/{{RUN_ID}}", "destination": "dag_run",
         "url_route": "nightshift_run_report"},
    ]
