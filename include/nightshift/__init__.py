"""nightshift: Airflow DAGs that keep a fine-tuned LLM fresh, safe and accountable in production."""
