#!/usr/bin/env python3
"""llama.cpp side of `ragcake bench prefill`: times prefill and decode of the same GGUF and
the same token ids with llama-cpp-python, and prints one JSON object.

Reads its settings as JSON on stdin:
  {"model": PATH, "tokens": [ids], "contexts": [n], "repeats": r, "threads": t,
   "batch": b, "decode_tokens": d}
"""
import json
import statistics
import sys
import time

from llama_cpp import Llama


def main():
    cfg = json.load(sys.stdin)
    tokens = cfg["tokens"]
    max_ctx = max(cfg["contexts"])
    llm = Llama(
        model_path=cfg["model"],
        n_ctx=max_ctx + cfg["decode_tokens"] + 16,
        n_batch=cfg["batch"],
        n_ubatch=cfg["batch"],
        n_threads=cfg["threads"],
        n_threads_batch=cfg["threads"],
        verbose=False,
    )
    # One warm-up pass so first-touch costs are not counted.
    llm.reset()
    llm.eval(tokens[: min(256, max_ctx)])
    prefill = []
    for n in cfg["contexts"]:
        times = []
        for _ in range(cfg["repeats"]):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(tokens[:n])
            times.append(time.perf_counter() - t0)
        prefill.append({"context": n, "seconds": times})
    # Decode: after a 256-token prompt, one token at a time.
    decode = []
    for _ in range(cfg["repeats"]):
        llm.reset()
        llm.eval(tokens[:256])
        t0 = time.perf_counter()
        for i in range(cfg["decode_tokens"]):
            llm.eval([tokens[256 + i]])
        decode.append(time.perf_counter() - t0)
    json.dump({"prefill": prefill, "decode_seconds": decode,
               "median_decode_tok_s": cfg["decode_tokens"] / statistics.median(decode)}, sys.stdout)


if __name__ == "__main__":
    main()
