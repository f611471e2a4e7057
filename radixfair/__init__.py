"""radixfair: LLM serving with RadixAttention and locality-aware fair scheduling.

The frontend language's names (`function`, `gen`, `select`, `user`, `RuntimeEndpoint`, ...) are
attributes of this package, so an SGLang program runs with `import radixfair as sgl`. They load on
first use: importing radixfair stays light, and none of them imports torch (`Runtime` and `Engine`
do when called).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from radixfair.engine.engine import Engine as Engine
    from radixfair.lang import *  # noqa: F403

_LANG = "radixfair.lang"


def __getattr__(name: str) -> Any:
    if name == "Engine":
        return importlib.import_module("radixfair.engine.engine").Engine
    lang = importlib.import_module(_LANG)
    if name in lang.__all__:
        value = getattr(lang, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'radixfair' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "Engine", *importlib.import_module(_LANG).__all__})
