#!/usr/bin/env python3
"""llama.cpp side of `ragcake bench prefill`: a worker that times prefill and decode of the
same GGUF and the same token ids with llama-cpp-python, one request at a time, so that
ragcake and llama.cpp can take turns.

The first line on stdin holds the settings, as JSON:
  {"model": PATH, "tokens": [ids], "n_ctx": n, "threads": t, "batch": b}
After loading the model and one untimed warm-up pass it answers {"ready": true}; then each
line is a request, answered with one line:
  {"prefill": n}  ->  {"seconds": s}   the first n tokens from an empty cache
  {"decode": d}   ->  {"seconds": s}   d tokens one at a time after a 256-token prompt
until stdin closes.
"""
import json
import sys
import time

from llama_cpp import Llama


def answer(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main():
    cfg = json.loads(sys.stdin.readline())
    tokens = cfg["tokens"]
    llm = Llama(
        model_path=cfg["model"],
        n_ctx=cfg["n_ctx"],
        n_batch=cfg["batch"],
        n_ubatch=cfg["batch"],
        n_threads=cfg["threads"],
        n_threads_batch=cfg["threads"],
        verbose=False,
    )
    # One warm-up pass so first-touch costs are not counted.
    llm.reset()
    llm.eval(tokens[: min(256, len(tokens))])
    answer({"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        llm.reset()
        if "prefill" in request:
            t0 = time.perf_counter()
            llm.eval(tokens[: request["prefill"]])
            answer({"seconds": time.perf_counter() - t0})
        elif "decode" in request:
            llm.eval(tokens[:256])
            t0 = time.perf_counter()
            for i in range(request["decode"]):
                llm.eval([tokens[256 + i]])
            answer({"seconds": time.perf_counter() - t0})
        else:
            answer({"error": f"unknown request {request}"})


if __name__ == "__main__":
    main()
