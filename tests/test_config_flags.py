"""Command-line flags generated from config dataclasses (`radixfair.config_flags`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import pytest

from radixfair.config_flags import add_flags, flag, flag_values


def _pair(text: str) -> dict[str, float]:
    k, _, v = text.partition("=")
    return {k: float(v)}


@dataclass(frozen=True)
class Settings:
    batch_size: int = flag(8, "requests per batch")
    rate: float | None = flag(None, "requests/s", none_means="unlimited")
    mode: str = flag("fast", "how to run", choices=("fast", "slow"))
    verbose: bool = flag(False, "say more")
    weights: dict[str, float] = flag({}, "NAME=W", parse=_pair, metavar="NAME=W")
    key: str | None = flag(None, "one key", exclusive="auth")
    key_file: str | None = flag(None, "a file of keys", exclusive="auth", metavar="FILE")
    internal: int = 3  # not a flag


def _parse(argv: list[str], **kw: Any) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_flags(p, Settings, **kw)
    return p.parse_args(argv)


def test_defaults_round_trip_to_the_dataclass() -> None:
    assert Settings(**flag_values(Settings, _parse([]))) == Settings()
    a, b = Settings(), Settings()
    assert a.weights == {} and a.weights is not b.weights  # a dict default is copied per instance


def test_flags_take_name_type_choices_and_parse_from_the_fields() -> None:
    ns = _parse(["--batch-size", "4", "--rate", "2.5", "--mode", "slow", "--verbose", "--weights", "a=2",
                 "--key-file", "k.json"])
    s = Settings(**flag_values(Settings, ns))
    assert s == Settings(batch_size=4, rate=2.5, mode="slow", verbose=True, weights={"a": 2.0}, key_file="k.json")
    assert not hasattr(ns, "internal")
    for bad in (["--batch-size", "x"], ["--mode", "medium"], ["--key", "k", "--key-file", "f"]):
        with pytest.raises(SystemExit):
            _parse(bad)


def test_help_states_defaults_and_a_command_may_change_some() -> None:
    p = argparse.ArgumentParser()
    add_flags(p, Settings, only=("batch_size", "rate", "weights"), defaults={"batch_size": 64})
    text = " ".join(p.format_help().split())
    assert "requests per batch (default: 64)" in text and "requests/s (default: unlimited)" in text
    assert "(default: None)" not in text and "(default: {})" not in text and "--mode" not in text
    q = argparse.ArgumentParser()
    add_flags(q, Settings, only=("rate",), defaults={"rate": 2.0})
    assert "requests/s (default: 2.0)" in " ".join(q.format_help().split())
    ns = p.parse_args([])
    assert flag_values(Settings, ns, only=("batch_size", "rate")) == {"batch_size": 64, "rate": None}


def test_misuse_fails_when_the_parser_is_built() -> None:
    with pytest.raises(TypeError, match="no flag"):
        add_flags(argparse.ArgumentParser(), Settings, only=("internal",))
    with pytest.raises(TypeError, match="not added"):
        add_flags(argparse.ArgumentParser(), Settings, only=("rate",), defaults={"batch_size": 1})

    @dataclass(frozen=True)
    class NoParse:
        table: dict[str, int] = flag({}, "no parse function")

    with pytest.raises(TypeError, match="parse function"):
        add_flags(argparse.ArgumentParser(), NoParse)


def test_aliases_are_other_spellings_of_the_same_flag() -> None:
    @dataclass(frozen=True)
    class Named:
        model: str | None = flag(None, "the model", aliases=("--model-path",))
        tp_size: int = flag(1, "parallelism", aliases=("--tp", "--tensor-parallel-size"))

    def parse(argv: list[str]) -> Named:
        p = argparse.ArgumentParser()
        add_flags(p, Named)
        return Named(**flag_values(Named, p.parse_args(argv)))

    assert parse(["--model-path", "m", "--tp", "1"]) == Named(model="m", tp_size=1)
    assert parse(["--model", "m", "--tensor-parallel-size", "3"]) == Named(model="m", tp_size=3)
    assert parse([]) == Named()
    p = argparse.ArgumentParser()
    add_flags(p, Named)
    assert "--model MODEL, --model-path MODEL" in " ".join(p.format_help().split())
    with pytest.raises(TypeError, match="option strings"):
        flag(0, "bad", aliases=("model-path",))


@dataclass(frozen=True)
class _Many:
    urls: tuple[str, ...] = flag((), "workers", metavar="URL", many=True)
    keys: tuple[str, ...] = flag((), "keys")


def test_a_many_flag_takes_several_values_per_occurrence() -> None:
    p = argparse.ArgumentParser()
    add_flags(p, _Many)
    ns = p.parse_args(["--urls", "a", "b", "--urls", "c", "--keys", "k"])
    assert _Many(**flag_values(_Many, ns)) == _Many(urls=("a", "b", "c"), keys=("k",))
    assert _Many(**flag_values(_Many, p.parse_args([]))) == _Many()
    with pytest.raises(SystemExit):
        p.parse_args(["--keys", "k1", "k2"])  # a plain repeatable flag takes one value each time
