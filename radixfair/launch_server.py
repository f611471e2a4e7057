"""`python -m radixfair.launch_server ...`: `radixfair serve` under the name SGLang's users type
(`python -m sglang.launch_server --model-path M --port P ...` with `sglang` replaced)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from radixfair.cli import LogArgs, add_serve_args, cmd_serve, parse_command_line, run_command, setup_logging
from radixfair.config_flags import add_flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m radixfair.launch_server",
                                description="the HTTP server (as `radixfair serve`): SGLang's native API and the "
                                            "OpenAI API")
    add_flags(p, LogArgs)
    add_serve_args(p)
    p.set_defaults(func=cmd_serve)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_command_line(build_parser(), argv)
    setup_logging(ns.log_level)
    return run_command(ns)


if __name__ == "__main__":
    sys.exit(main())
