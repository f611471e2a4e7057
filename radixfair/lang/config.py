"""Process-wide settings of the language, as SGLang's `global_config` holds them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from radixfair.lang.backend.base import Backend


@dataclass
class GlobalConfig:
    # 0: quiet; 2: print a program's final text when it ends
    verbosity: int = 0
    # used by `run`, `run_batch`, `cache` and `flush_cache` when no backend is passed
    default_backend: Backend | None = None
    # `run_batch` of more than one program first prefills the program's constant prefix once
    enable_precache_with_tracing: bool = True


global_config = GlobalConfig()
