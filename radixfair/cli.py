"""`radixfair` command line: generate, serve, tune, bench."""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from radixfair.config_flags import add_flags, flag, flag_values
from radixfair.engine_args import EngineArgs
from radixfair.sampling_params import SamplingParams

if TYPE_CHECKING:
    from radixfair.server.server_args import ServerArgs


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True)
class LogArgs:
    log_level: str = flag("warning", "what the process logs", choices=LOG_LEVELS, parse=str.lower)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    add_flags(p.add_argument_group("engine"), EngineArgs)


def engine_args(ns: argparse.Namespace) -> EngineArgs:
    return EngineArgs(**flag_values(EngineArgs, ns))


def server_args(ns: argparse.Namespace) -> ServerArgs:
    from radixfair.server.server_args import ServerArgs

    return ServerArgs(**flag_values(ServerArgs, ns))


def _cmd_generate(ns: argparse.Namespace) -> int:
    from radixfair.engine.engine import Engine

    args = engine_args(ns)
    if args.max_total_tokens is None:
        args = replace(args, max_total_tokens=16384)  # one prompt: no need to reserve a big pool
    with Engine(args=args) as engine:
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


def load_api_keys(server: ServerArgs) -> dict[str, Any] | None:
    """`--api-key KEY` (one client, "default") or `--api-keys FILE`: JSON `{"KEY": "alice"}` or
    `{"KEY": {"client": "alice", "weight": 2}}`; `"trusted_proxy": true` marks a router's key."""
    import json

    from radixfair.server.app import ServerClient

    if server.api_key is not None:
        if not server.api_key:
            raise ValueError("--api-key is empty")
        return {server.api_key: ServerClient("default")}
    if server.api_keys is None:
        return None
    with open(server.api_keys, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"--api-keys {server.api_keys}: not valid JSON ({e})") from e
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"--api-keys {server.api_keys}: expected a non-empty object of KEY -> client")
    keys: dict[str, Any] = {}
    for i, (key, v) in enumerate(raw.items()):
        # the error names the entry by position: a message must never echo a key
        where = f"--api-keys {server.api_keys}: entry {i + 1}"
        if not key:
            raise ValueError(f"{where}: empty key")
        if isinstance(v, str):
            v = {"client": v}
        if not isinstance(v, dict) or not isinstance(v.get("client"), str) or not v["client"]:
            raise ValueError(f'{where}: expected "client-name" or {{"client": NAME, "weight": W}}')
        w = v.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w < float("inf"):
            raise ValueError(f"{where}: weight must be a number > 0")
        proxy = v.get("trusted_proxy", False)
        if not isinstance(proxy, bool):
            raise ValueError(f"{where}: trusted_proxy must be true or false")
        keys[key] = ServerClient(v["client"], float(w), proxy)
    return keys


def cmd_serve(ns: argparse.Namespace) -> int:
    import signal
    import threading
    import time

    import uvicorn

    from radixfair.engine.engine import Engine
    from radixfair.server.app import create_app
    from radixfair.server.connections import uvicorn_config

    opts = server_args(ns)
    keys = load_api_keys(opts)
    args = engine_args(ns)
    if keys:
        # weights from the key file feed the fair policies; --client-weights still wins
        weights = {c.client: c.weight for c in keys.values() if c.weight != 1.0}
        args = replace(args, client_weights={**weights, **args.client_weights})
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop cleanly while the model loads
    failure: str | None = None
    try:
        with Engine(args=args) as engine:
            app = create_app(engine, keys, opts)
            config = uvicorn_config(app, opts, log_level=ns.log_level.lower(), timeout_graceful_shutdown=5)
            server = uvicorn.Server(config)

            # a dead engine thread serves nothing: stop, and exit non-zero so that a supervisor
            # restarts the server (the requests it held were answered 503 by the engine)
            def watch_engine() -> None:
                engine.stopped.wait()
                if engine.failure is not None:
                    server.should_exit = True

            threading.Thread(target=watch_engine, name="radixfair-engine-watch", daemon=True).start()
            host = f"[{opts.host}]" if ":" in opts.host else opts.host

            # uvicorn installs its own SIGINT/SIGTERM handlers (graceful shutdown) inside run(); the URL
            # is printed from a watcher so it appears only once the socket is bound
            def announce() -> None:
                while not server.started and not server.should_exit:
                    time.sleep(0.05)
                if server.started:
                    print(f"radixfair: serving {engine.model_names.served} ({engine.model_path}) at "
                          f"http://{host}:{opts.port}", flush=True)

            threading.Thread(target=announce, name="radixfair-announce", daemon=True).start()
            server.run()
            failure = engine.failure
    except KeyboardInterrupt:
        # SIGINT/SIGTERM: uvicorn has already drained and closed; it re-raises the signal on exit
        pass
    if failure is not None:
        print(f"radixfair: error: {failure}; see the log above", file=sys.stderr)
        return 1
    return 0


def _cmd_tune(ns: argparse.Namespace) -> int:
    from tqdm import tqdm

    from radixfair.bench.report import print_table, write_json
    from radixfair.sim.cost_model import load_profile
    from radixfair.sim.trace import read_jsonl
    from radixfair.sim.tuner import TuneArgs, curve, label, plot, serve_flags, tune

    cfg = TuneArgs(**flag_values(TuneArgs, ns)).config()
    scheduler = cfg.scheduler
    trace = read_jsonl(ns.trace)
    cost = load_profile(ns.profile)
    with tqdm(desc="tune", unit="run", disable=not sys.stderr.isatty()) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        rows = tune(trace, cost, cfg, progress)
    span = max(r.time for r in trace)
    title = (f"radixfair tune: {ns.trace}, {len(trace)} requests over {span:.0f} s, {ns.workers} worker(s), "
             f"cost model {cost.name}, KV pool {scheduler.max_total_tokens} tokens")
    print_table(
        ["", "policy", "quantum", "router quantum", "tok/s", "Jain", "max svc diff", "p99 e2e (s)", "hit rate",
         "done/arrived"],
        [["*" if r["recommended"] else "", r["policy"], _opt(r["quantum"], ".0f"), _opt(r["router_quantum"], ".0f"),
          f"{r['throughput']:.0f}", _opt(r["jain"], ".3f"), _opt(r["max_service_diff"], ".0f"),
          _opt(r["p99_latency"], ".1f"), f"{r['hit_rate']:.3f}", f"{r['completed']}/{r['requests']}"] for r in rows],
        title=title + f"; Jain target {cfg.jain_target:g}", width=150)
    print("throughput-fairness curve (fairest first):")
    for line in curve(rows, cfg.jain_target):
        print("  " + line)
    best = next(r for r in rows if r["recommended"])
    if best["meets_target"]:
        print(f"recommended: {label(best)} (Jain {best['jain']:.3f} >= {cfg.jain_target:g}, "
              f"{best['throughput']:.0f} tok/s)")
    else:
        print(f"no setting reaches Jain {cfg.jain_target:g}; the fairest is {label(best)} "
              f"(Jain {_opt(best['jain'], '.3f')})")
    print(f"apply it with:\n  {serve_flags(best)}")
    write_json(ns.json, rows)
    if ns.plot:
        plot(rows, ns.plot, cfg.jain_target, title)
        print(f"wrote {ns.plot}")
    return 0


def _opt(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def add_tune_args(p: argparse.ArgumentParser) -> None:
    from radixfair.sim.tuner import TuneArgs

    p.add_argument("--trace", required=True, metavar="JSONL",
                   help="the trace to replay: `serve --record-trace`'s, or any simulator trace")
    add_flags(p, TuneArgs)
    p.add_argument("--json", default=None, metavar="PATH",
                   help="rows: policy, quantum, router_quantum, throughput, jain, max_service_diff, p99_latency, "
                        "recommended (and routing, hit_rate, completed, requests, meets_target)")
    p.add_argument("--plot", default=None, metavar="PATH", help="PNG of throughput against Jain's index")
    p.set_defaults(func=_cmd_tune)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """`radixfair serve`'s flags: the server's and the engine's (`python -m radixfair.launch_server` too)."""
    from radixfair.server.server_args import ServerArgs

    add_flags(p, ServerArgs)
    add_engine_args(p)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="radixfair", description=__doc__)
    add_flags(p, LogArgs)
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete one prompt and print the result")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=SamplingParams.max_new_tokens)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    add_engine_args(g)
    g.set_defaults(func=_cmd_generate)

    s = sub.add_parser("serve", help="HTTP server: SGLang's native API and the OpenAI API")
    add_serve_args(s)
    s.set_defaults(func=cmd_serve)

    t = sub.add_parser("tune", help="replay a trace in the simulator under each fairness setting and recommend "
                                    "the quantum that meets a Jain target with the most throughput")
    add_tune_args(t)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    from radixfair.bench import engine_bench, fairness_bench, lang_bench, prefix_bench, serve_bench

    engine_bench.add_parser(bsub)
    prefix_bench.add_parser(bsub)
    fairness_bench.add_parser(bsub)
    serve_bench.add_parser(bsub)
    lang_bench.add_parser(bsub)
    from radixfair.bench import sim_bench

    sim_bench.add_parser(bsub)
    from radixfair.bench import calibrate

    calibrate.add_parser(bsub)
    from radixfair.bench import structured_bench

    structured_bench.add_parser(bsub)
    for leaf in _leaf_parsers(p):
        # --log-level after the command too, where SGLang takes it: this copy has no default of its
        # own, so the value given before the command (or the default) stands unless it is given
        add_flags(leaf, LogArgs, defaults={"log_level": argparse.SUPPRESS})
        leaf.set_defaults(cli_parser=leaf)
    return p


def _leaf_parsers(p: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parsers that run a command (those without subcommands of their own)."""
    # argparse keeps a parser's subcommands only in its private `_actions`
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield p
    for action in subs:
        for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
            yield from _leaf_parsers(child)


def parse_command_line(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """`parser.parse_args`, but an unknown flag is reported by the command it was given to, with the
    closest flag that command knows (`--model-pth`: did you mean `--model-path`?)."""
    ns, extras = parser.parse_known_args(argv)
    if extras:
        leaf: argparse.ArgumentParser = getattr(ns, "cli_parser", parser)
        leaf.error(unrecognized_arguments(extras, leaf))
    return ns


def unrecognized_arguments(extras: Sequence[str], parser: argparse.ArgumentParser) -> str:
    known = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    hints = []
    for arg in extras:
        if not arg.startswith("-"):
            continue
        name = arg.split("=", 1)[0]
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        if close:
            hints.append(f"{name}: did you mean {close[0]}?")
        else:
            hints.append(f"{name}: no such flag (see --help)")
    return f"unrecognized arguments: {' '.join(extras)}" + "".join(f"\n  {h}" for h in hints)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_command_line(build_parser(), argv)
    setup_logging(ns.log_level)
    return run_command(ns)


def run_command(ns: argparse.Namespace) -> int:
    try:
        return int(ns.func(ns))
    except (ValueError, FileNotFoundError) as e:
        print(f"radixfair: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
