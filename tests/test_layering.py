"""The layering rules, as tests: which packages may import which, and which must stay torch-free.

The pure layers (cache, scheduler and policies, simulator, metrics, tokenizer, the engine contract)
run without a model: in the simulator, and in a router that only tokenizes and routes.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "radixfair"
TORCH_FREE = ("radixfair.cache", "radixfair.sched", "radixfair.sim", "radixfair.metrics", "radixfair.tokenizer",
              "radixfair.io_struct", "radixfair.sampling_params", "radixfair.engine_args", "radixfair.config_flags",
              "radixfair.router.policies", "radixfair.lang")
# (importer, what it must never import): by the import statements in the importer's own files
FORBIDDEN = [
    ("cache", "radixfair.sched"),
    ("cache", "radixfair.engine"),
    ("sched", "radixfair.engine"),
    ("sim", "radixfair.engine"),
    ("server", "radixfair.sched"),
    ("tokenizer", "radixfair.engine"),
    ("metrics", "radixfair.engine"),
    # the routing decisions are plain objects: no HTTP, no scheduler, shared by the router and the simulator
    ("router/policies", "radixfair.engine"),
    ("router/policies", "radixfair.server"),
    ("router/policies", "radixfair.sched"),
    ("router/policies", "radixfair.sim"),
    ("router/policies", "fastapi"),
    ("router/policies", "httpx"),
    ("lang", "radixfair.sched"),
    ("lang", "radixfair.server"),
]
CORE = ("cache", "sched", "sim", "metrics", "tokenizer", "engine", "server", "router", "lang")
# the only file of the language that may import the engine (lazily: only `Runtime` builds one)
LANG_ENGINE_IMPORTER = "radixfair/lang/backend/inprocess.py"


def imports_of(package: str) -> dict[str, set[str]]:
    """file -> every module its import statements name (relative imports resolved)."""
    out: dict[str, set[str]] = {}
    root = PACKAGE / package
    files = [root.with_suffix(".py")] if root.with_suffix(".py").exists() else sorted(root.rglob("*.py"))
    for f in files:
        parts = ["radixfair", *f.relative_to(PACKAGE).with_suffix("").parts]
        names: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(parts[: len(parts) - node.level] + ([base] if base else []))
                names.add(base)
                names |= {f"{base}.{a.name}" for a in node.names}
        out[str(f.relative_to(PACKAGE.parent))] = names
    return out


def offenders(package: str, forbidden: str) -> list[str]:
    return sorted(
        f"{f} imports {m}"
        for f, names in imports_of(package).items()
        for m in names
        if m == forbidden or m.startswith(forbidden + ".")
    )


@pytest.mark.parametrize(("package", "forbidden"), FORBIDDEN)
def test_forbidden_imports(package: str, forbidden: str) -> None:
    assert offenders(package, forbidden) == []


@pytest.mark.parametrize("package", CORE)
def test_no_core_package_imports_the_benchmarks(package: str) -> None:
    assert offenders(package, "radixfair.bench") == []


def test_only_the_in_process_backend_imports_the_engine() -> None:
    files = {o.split(" imports ")[0] for o in offenders("lang", "radixfair.engine")}
    assert files == {LANG_ENGINE_IMPORTER}


def test_the_scan_sees_imports() -> None:
    """The rule above would pass vacuously if the scan missed imports: it must see known ones."""
    engine = {m for names in imports_of("engine").values() for m in names}
    assert "radixfair.sched.scheduler" in engine and "torch" in engine
    assert offenders("engine", "radixfair.sched")


def test_pure_layers_import_without_torch_or_the_engine() -> None:
    code = (
        "import importlib, sys\n"
        f"for m in {TORCH_FREE!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m in ('torch', 'radixfair.engine') or m.startswith(('torch.', 'radixfair.engine.')))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent)
    assert out.stdout.strip() == "", f"pure layers pulled in: {out.stdout.strip()}"


def test_the_router_service_imports_without_torch() -> None:
    """`radixfair router` runs on a machine without torch: it only tokenizes, routes and proxies."""
    code = (
        "import sys\n"
        "import radixfair.router.app, radixfair.router.serve, radixfair.router.state\n"
        "print(','.join(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'radixfair.engine')))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent)
    assert out.stdout.strip() == "", f"the router pulled in: {out.stdout.strip()}"
