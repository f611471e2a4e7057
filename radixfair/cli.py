"""`radixfair` command line: generate, serve, bench."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None, help="GGUF file or Hugging Face folder (default: SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--max-total-tokens", type=int, default=None, help="KV pool size in tokens")
    g.add_argument("--mem-fraction-static", type=float, default=None,
                   help="memory share for the KV pool when --max-total-tokens is not given")
    g.add_argument("--max-running-requests", type=int, default=128)
    g.add_argument("--max-prefill-tokens", type=int, default=8192)
    g.add_argument("--chunked-prefill-size", type=int, default=2048, help="-1 disables chunked prefill")
    g.add_argument("--context-length", type=int, default=None)
    from radixfair.sched.policies import DEFAULT_DLPM_QUANTUM, DEFAULT_POLICY, POLICIES

    def client_weights(text: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for item in filter(None, (x.strip() for x in text.split(","))):
            name, eq, value = item.partition("=")
            try:
                w = float(value)
            except ValueError:
                w = float("nan")
            if not eq or not name.strip() or not w > 0 or w == float("inf"):
                raise argparse.ArgumentTypeError(f"expected CLIENT=WEIGHT with a weight > 0, got {item!r}")
            out[name.strip()] = w
        return out

    g.add_argument("--schedule-policy", default=DEFAULT_POLICY, choices=list(POLICIES),
                   help="waiting-queue policy (default: %(default)s)")
    g.add_argument("--w-in", type=float, default=1.0, help="cost of an uncached prompt token")
    g.add_argument("--w-out", type=float, default=2.0, help="cost of an output token")
    g.add_argument("--dlpm-quantum", type=float, default=DEFAULT_DLPM_QUANTUM,
                   help="service (in cost units) each client gets per DLPM round")
    g.add_argument("--client-weights", type=client_weights, default={}, metavar="ALICE=2,BOB=1",
                   help="per-client shares for vtc and dlpm; unnamed clients weigh 1")
    g.add_argument("--disable-radix-cache", action="store_true")
    g.add_argument("--random-seed", type=int, default=0)
    g.add_argument("--num-threads", type=int, default=None, help="torch CPU threads")


def engine_kwargs(ns: argparse.Namespace) -> dict[str, Any]:
    keys = [
        "model", "dtype", "device", "max_total_tokens", "mem_fraction_static", "max_running_requests",
        "max_prefill_tokens", "chunked_prefill_size", "context_length", "schedule_policy",
        "w_in", "w_out", "dlpm_quantum", "client_weights",
        "disable_radix_cache", "random_seed", "num_threads",
    ]
    return {k: getattr(ns, k) for k in keys}


def _cmd_generate(ns: argparse.Namespace) -> int:
    from radixfair.engine.engine import Engine

    kw = engine_kwargs(ns)
    if kw["max_total_tokens"] is None:
        kw["max_total_tokens"] = 16384  # one prompt: no need to reserve a big pool
    with Engine(**kw) as engine:
        prompt = ns.prompt
        if ns.chat:
            prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        params = {"max_new_tokens": ns.max_new_tokens, "temperature": ns.temperature}
        if ns.seed is not None:
            params["seed"] = ns.seed
        if ns.stream:
            printed = 0
            for out in engine.generate(prompt, params, stream=True):
                text = out["text"]
                sys.stdout.write(text[printed:])
                sys.stdout.flush()
                printed = len(text)
            sys.stdout.write("\n")
        else:
            out = engine.generate(prompt, params)
            print(out["text"])
    return 0


def load_api_keys(ns: argparse.Namespace) -> dict[str, Any] | None:
    """`--api-key KEY` (one client, "default") or `--api-keys FILE`: JSON
    `{"KEY": "alice"}` or `{"KEY": {"client": "alice", "weight": 2}}`."""
    import json

    from radixfair.server.app import ServerClient

    if ns.api_key is not None:
        if not ns.api_key:
            raise ValueError("--api-key is empty")
        return {ns.api_key: ServerClient("default")}
    if ns.api_keys is None:
        return None
    with open(ns.api_keys, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"--api-keys {ns.api_keys}: not valid JSON ({e})") from e
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"--api-keys {ns.api_keys}: expected a non-empty object of KEY -> client")
    keys: dict[str, Any] = {}
    for i, (key, v) in enumerate(raw.items()):
        # the error names the entry by position: a message must never echo a key
        where = f"--api-keys {ns.api_keys}: entry {i + 1}"
        if not key:
            raise ValueError(f"{where}: empty key")
        if isinstance(v, str):
            v = {"client": v}
        if not isinstance(v, dict) or not isinstance(v.get("client"), str) or not v["client"]:
            raise ValueError(f'{where}: expected "client-name" or {{"client": NAME, "weight": W}}')
        w = v.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w < float("inf"):
            raise ValueError(f"{where}: weight must be a number > 0")
        keys[key] = ServerClient(v["client"], float(w))
    return keys


def _cmd_serve(ns: argparse.Namespace) -> int:
    import signal
    import threading
    import time

    import uvicorn

    from radixfair.engine.engine import Engine
    from radixfair.server.app import create_app

    keys = load_api_keys(ns)
    kw = engine_kwargs(ns)
    if keys:
        # weights from the key file feed the fair policies; --client-weights still wins
        weights = {c.client: c.weight for c in keys.values() if c.weight != 1.0}
        kw["client_weights"] = {**weights, **kw["client_weights"]}
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop cleanly while the model loads
    try:
        with Engine(**kw) as engine:
            app = create_app(engine, keys, ns.max_body_bytes)
            config = uvicorn.Config(app, host=ns.host, port=ns.port, log_level=ns.log_level.lower(),
                                    timeout_graceful_shutdown=5)
            server = uvicorn.Server(config)
            host = f"[{ns.host}]" if ":" in ns.host else ns.host

            # uvicorn installs its own SIGINT/SIGTERM handlers (graceful shutdown) inside run(); the URL
            # is printed from a watcher so it appears only once the socket is bound
            def announce() -> None:
                while not server.started and not server.should_exit:
                    time.sleep(0.05)
                if server.started:
                    print(f"radixfair: serving {engine.model_path} at http://{host}:{ns.port}", flush=True)

            threading.Thread(target=announce, name="radixfair-announce", daemon=True).start()
            server.run()
    except KeyboardInterrupt:
        # SIGINT/SIGTERM: uvicorn has already drained and closed; it re-raises the signal on exit
        pass
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="radixfair", description=__doc__)
    p.add_argument("--log-level", default="warning")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete one prompt and print the result")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    add_engine_args(g)
    g.set_defaults(func=_cmd_generate)

    s = sub.add_parser("serve", help="HTTP server: SGLang's native API and the OpenAI API")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s, local only)")
    s.add_argument("--port", type=int, default=30000)
    auth = s.add_mutually_exclusive_group()
    auth.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    auth.add_argument("--api-keys", default=None, metavar="FILE",
                      help='JSON {"KEY": {"client": "alice", "weight": 2}}: per-key client identity')
    s.add_argument("--max-body-bytes", type=int, default=8 << 20,
                   help="larger request bodies are refused with 413 (default: %(default)s)")
    add_engine_args(s)
    s.set_defaults(func=_cmd_serve)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    from radixfair.bench import engine_bench, fairness_bench, prefix_bench, serve_bench

    engine_bench.add_parser(bsub)
    prefix_bench.add_parser(bsub)
    fairness_bench.add_parser(bsub)
    serve_bench.add_parser(bsub)
    from radixfair.bench import sim_bench

    sim_bench.add_parser(bsub)
    from radixfair.bench import calibrate

    calibrate.add_parser(bsub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(ns.func(ns))
    except (ValueError, FileNotFoundError) as e:
        print(f"radixfair: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
