"""Batch-1 decode and prefill speed of llama.cpp (llama-cpp-python) on a GGUF file, for `bench engine
--llama-cpp-python PYTHON`: run by that interpreter (a scratch venv with llama-cpp-python), so it
imports nothing from radixfair. Prints one JSON line.

    PYTHON llama_cpp_probe.py MODEL.gguf PROMPT_TOKENS DECODE_TOKENS THREADS
"""

from __future__ import annotations

import json
import random
import sys
import time


def main(argv: list[str]) -> None:
    from llama_cpp import Llama

    path, prompt_len, steps, threads = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    llm = Llama(model_path=path, n_ctx=prompt_len + steps + 16, n_threads=threads, n_batch=512, verbose=False)
    vocab = llm.n_vocab()
    rng = random.Random(0)
    prompt = [rng.randrange(min(100, vocab // 4), vocab) for _ in range(prompt_len)]
    best_decode, best_prefill = float("inf"), float("inf")
    for _ in range(3):  # the best of three: the machine is shared
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        best_prefill = min(best_prefill, time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(steps):  # one token per eval: batch-1 decode, as the engine's figure
            llm.eval([prompt[i % prompt_len]])
        best_decode = min(best_decode, (time.perf_counter() - t) / steps)
    print(json.dumps({"decode_ms_per_token_b1": best_decode * 1000, "prefill_tok_s": prompt_len / best_prefill,
                      "threads": threads}))


if __name__ == "__main__":
    main(sys.argv[1:])
