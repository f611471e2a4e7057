"""`--record-trace PATH`: served traffic as a simulator trace, for `bench sim --trace`, `bench
fairness --trace` and `radixfair tune`.

One JSONL record per request that left the server (`TraceRecord.recorded`): arrival time in seconds
since the recorder started, client, the prompt as a chain of block hashes (its token ids only with
`--record-trace-tokens`: prompts are users' data), and the output length: the tokens served, or for a
request aborted before it finished (its client left, or the server was cut off) the `max_new_tokens`
it asked for, since a replay must offer the load that arrived, not the part that was served. Records
are written as requests finish, so the file is not in arrival order; the trace reader sorts it. Past
`max_bytes` the file rotates: PATH -> PATH.1 -> PATH.2 ..., `BACKUPS` of them kept.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from radixfair.sim.trace import TraceRecord

BACKUPS = 3


class TraceRecorder:
    def __init__(self, path: str | Path, keep_tokens: bool = False, max_bytes: int = 256 << 20) -> None:
        if max_bytes < 1:
            raise ValueError(f"--record-trace-max-bytes must be >= 1, got {max_bytes}")
        self.path = Path(path)
        self.keep_tokens = keep_tokens
        self.max_bytes = max_bytes
        self.start = time.monotonic()
        self.records = 0
        self._lock = threading.Lock()
        # fail at startup, naming the flag, rather than on the first request
        try:
            self._file: IO[str] | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held open
        except OSError as e:
            raise ValueError(f"--record-trace {path}: cannot open it for writing ({e.strerror})") from None

    def record(self, client: str, input_ids: Sequence[int], output_len: int, arrival: float) -> None:
        """A request that arrived at `arrival` (time.monotonic())."""
        t = arrival - self.start
        with self._lock:
            if self._file is None:
                return
            rec = TraceRecord.recorded(round(max(t, 0.0), 6), client, input_ids, max(output_len, 1),
                                       rid=f"r{self.records}", keep_tokens=self.keep_tokens)
            line = json.dumps(rec.to_json(), separators=(",", ":")) + "\n"
            if self._file.tell() > 0 and self._file.tell() + len(line) > self.max_bytes:
                self._rotate()
            self._file.write(line)
            self._file.flush()
            self.records += 1

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        for i in range(BACKUPS - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
