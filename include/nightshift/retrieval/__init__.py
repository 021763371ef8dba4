"""The corpus as a vector index: chunking, embedding (with a cache keyed by model and chunk text), the index
stores (FAISS files by default, pgvector in production) and the grounded prompt retrieval-augmented answers use.

Airflow-free; ``pipelines/ingest.py`` builds an index per dataset version, the endpoint and the evaluation read it.
"""
