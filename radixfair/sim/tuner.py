"""`radixfair tune`: which fairness setting a recorded trace needs, found by replaying it.

Each setting (a policy; for DLPM each quantum; with several workers, for D²LPM each router quantum
too) replays the trace in the simulator: the production scheduler, policies, radix cache and router
policy, with time from a cost model. A run is cut off at the trace's last arrival, as `bench
fairness` cuts a live run at its duration, and measured the same way: throughput is prompt + output
tokens of the requests completed by then, per second; Jain's index is over the service rates of the
clients backlogged in at least half of the windows. The recommendation is the setting with the
highest throughput whose Jain's index reaches the target; if none does, the fairest one, flagged.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from radixfair.config_flags import flag
from radixfair.router.policies import D2LPMConfig, RouterConfig, worker_policy
from radixfair.sched.policies import POLICIES, PolicyConfig
from radixfair.sched.scheduler import SchedulerConfig
from radixfair.sim.cost_model import CostModel
from radixfair.sim.simulator import SIM_SCHEDULER, SimConfig, Simulator
from radixfair.sim.trace import TraceRecord

DEFAULT_POLICIES = ("dlpm", "vtc", "lpm")
DEFAULT_QUANTA = (256.0, 1024.0, 4096.0, 16384.0)
DEFAULT_ROUTER_QUANTA = (4096.0, 16384.0, 65536.0)
DEFAULT_JAIN_TARGET = 0.95
# the router policy each worker policy is paired with across several workers
ROUTING = {"dlpm": "d2lpm", "vtc": "global_vtc", "lpm": "cache_aware"}


@dataclass(frozen=True)
class Setting:
    policy: str  # the workers' scheduling policy
    quantum: float | None = None  # DLPM's quantum
    routing: str = "round_robin"  # the router policy (one worker: irrelevant)
    router_quantum: float | None = None  # D²LPM's router quantum


@dataclass(frozen=True)
class TuneConfig:
    policies: tuple[str, ...] = DEFAULT_POLICIES
    quanta: tuple[float, ...] = DEFAULT_QUANTA
    router_quanta: tuple[float, ...] = DEFAULT_ROUTER_QUANTA
    workers: int = 1
    jain_target: float = DEFAULT_JAIN_TARGET
    window: float = 10.0  # seconds per service window of Jain's index
    scheduler: SchedulerConfig = SIM_SCHEDULER  # each simulated worker's
    policy_config: PolicyConfig = field(default_factory=PolicyConfig)  # costs and weights (the quantum is swept)

    def __post_init__(self) -> None:
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown or not self.policies:
            raise ValueError(f"--policies: unknown or none ({', '.join(unknown) or 'empty'}); "
                             f"choose from {', '.join(POLICIES)}")
        if "dlpm" in self.policies and not self.quanta:
            raise ValueError("--quanta is empty")
        for q in (*self.quanta, *self.router_quanta):
            if not (math.isfinite(q) and q > 0):
                raise ValueError(f"quanta must be finite numbers > 0, got {q!r}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if not 0 < self.jain_target <= 1:
            raise ValueError(f"--jain-target must be in (0, 1], got {self.jain_target}")
        if not self.window > 0:
            raise ValueError(f"--window must be > 0, got {self.window}")


def _join(xs: Sequence[float]) -> str:
    return ",".join(f"{x:g}" for x in xs)


@dataclass(frozen=True)
class TuneArgs:
    """`radixfair tune`'s settings, each flag declared once here; `config()` checks and parses them."""

    profile: str = flag("cpu-smollm2", "cost model: a bundled profile or a `bench calibrate` JSON; calibrate on "
                                       "the serving machine for a faithful replay")
    workers: int = flag(1, "simulated workers behind one router")
    jain_target: float = flag(DEFAULT_JAIN_TARGET, "the lowest acceptable Jain's index over the backlogged "
                                                   "clients' service rates")
    policies: str = flag(",".join(DEFAULT_POLICIES), "workers' scheduling policies to try (comma list)")
    quanta: str = flag(_join(DEFAULT_QUANTA), "DLPM quanta to try (comma list)")
    router_quanta: str = flag(_join(DEFAULT_ROUTER_QUANTA), "D2LPM router quanta to try with --workers > 1 "
                                                             "(comma list)")
    window: float = flag(10.0, "seconds per service window of Jain's index")
    max_total_tokens: int | None = flag(None, "each simulated worker's KV pool; match the server's",
                                        none_means=str(SIM_SCHEDULER.max_total_tokens))
    max_running_requests: int | None = flag(None, "each simulated worker's batch limit; match the server's",
                                            none_means=str(SIM_SCHEDULER.max_running_requests))
    w_in: float = flag(PolicyConfig.w_in, "cost of an uncached prompt token")
    w_out: float = flag(PolicyConfig.w_out, "cost of an output token")

    def config(self) -> TuneConfig:
        scheduler = SIM_SCHEDULER
        if self.max_total_tokens is not None:
            scheduler = replace(scheduler, max_total_tokens=self.max_total_tokens)
        if self.max_running_requests is not None:
            scheduler = replace(scheduler, max_running_requests=self.max_running_requests)
        return TuneConfig(policies=tuple(p.strip() for p in self.policies.split(",") if p.strip()),
                          quanta=_floats(self.quanta, "--quanta"),
                          router_quanta=_floats(self.router_quanta, "--router-quanta"), workers=self.workers,
                          jain_target=self.jain_target, window=self.window, scheduler=scheduler,
                          policy_config=PolicyConfig(w_in=self.w_in, w_out=self.w_out))


def _floats(spec: str, name: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{name}: expected a comma list of numbers, got {spec!r}") from None


def settings(cfg: TuneConfig) -> list[Setting]:
    out: list[Setting] = []
    for p in dict.fromkeys(cfg.policies):
        routing = ROUTING.get(p, "round_robin") if cfg.workers > 1 else "round_robin"
        if cfg.workers > 1 and routing != "round_robin":
            assert worker_policy(routing) == p
        quanta: Sequence[float | None] = cfg.quanta if p == "dlpm" else (None,)
        router_quanta: Sequence[float | None] = cfg.router_quanta if routing == "d2lpm" else (None,)
        out += [Setting(p, q, routing, rq) for q in quanta for rq in router_quanta]
    return out


def run_setting(trace: Sequence[TraceRecord], cost: CostModel, setting: Setting, cfg: TuneConfig,
                duration: float) -> dict[str, Any]:
    """One JSON row: the setting and what the simulator measured over [0, duration)."""
    pc = cfg.policy_config if setting.quantum is None else replace(cfg.policy_config, dlpm_quantum=setting.quantum)
    router: RouterConfig | None = None
    if setting.router_quantum is not None:
        router = D2LPMConfig(router_quantum=setting.router_quantum, w_in=pc.w_in, w_out=pc.w_out)
    sim = SimConfig(policy=setting.policy, num_workers=cfg.workers, routing=setting.routing, router_config=router,
                    scheduler=cfg.scheduler, policy_config=pc, horizon=duration)
    result = Simulator(trace, cost, sim).run()
    rep = result.report(window=min(cfg.window, duration), t1=duration)
    done = [r for r in result.records if r.finish is not None and r.finish <= duration]
    return {
        "policy": setting.policy,
        "quantum": setting.quantum,
        "router_quantum": setting.router_quantum,
        "routing": setting.routing if cfg.workers > 1 else None,
        "throughput": sum(r.prompt_tokens + r.output_tokens for r in done) / duration,
        "jain": _num(rep.jain),
        "max_service_diff": _num(rep.service_difference.max),
        "p99_latency": _num(rep.overall_latency.e2e_p99),
        "hit_rate": rep.hit_rate,
        "completed": len(done),
        "requests": len(result.records),
        "recommended": False,
    }


def tune(trace: Sequence[TraceRecord], cost: CostModel, cfg: TuneConfig,
         progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """A row per setting, the recommended one marked (`recommended`; `meets_target` on every row)."""
    if not trace:
        raise ValueError("the trace has no records")
    duration = max(r.time for r in trace)
    if duration <= 0:
        raise ValueError("the trace's requests all arrive at time 0: no span to measure rates over")
    todo = settings(cfg)
    rows = []
    for i, s in enumerate(todo):
        rows.append(run_setting(trace, cost, s, cfg, duration))
        if progress is not None:
            progress(i + 1, len(todo))
    for r in rows:
        r["meets_target"] = r["jain"] is not None and r["jain"] >= cfg.jain_target
    best = recommend(rows)
    rows[best]["recommended"] = True
    return rows


def recommend(rows: Sequence[dict[str, Any]]) -> int:
    """The index of the highest-throughput row that meets the target (ties: the fairer); without
    one, of the fairest row."""
    meeting = [i for i, r in enumerate(rows) if r["meets_target"]]
    if meeting:
        return max(meeting, key=lambda i: (rows[i]["throughput"], rows[i]["jain"]))
    return max(range(len(rows)), key=lambda i: (-1.0 if rows[i]["jain"] is None else rows[i]["jain"],
                                                rows[i]["throughput"]))


def serve_flags(row: dict[str, Any]) -> str:
    """The `radixfair serve` flags that apply a row's setting (and, for D²LPM, the router's)."""
    flags = f"radixfair serve --schedule-policy {row['policy']}"
    if row["quantum"] is not None:
        flags += f" --dlpm-quantum {_g(row['quantum'])}"
    if row.get("routing") and row["routing"] != "round_robin":
        flags += f"   # on each worker; the router: radixfair router --policy {row['routing']}"
        if row["router_quantum"] is not None:
            flags += f" --router-quantum {_g(row['router_quantum'])}"
    return flags


def label(row: dict[str, Any]) -> str:
    out = str(row["policy"])
    if row["quantum"] is not None:
        out += f" Q={_g(row['quantum'])}"
    if row["router_quantum"] is not None:
        out += f" Qw={_g(row['router_quantum'])}"
    return out


def curve(rows: Sequence[dict[str, Any]], target: float, width: int = 40) -> list[str]:
    """The throughput-fairness curve as text: a line per setting, fairest first, a bar of its
    throughput; `*` marks the recommendation, `|` where the settings cross the Jain target."""
    top = max((r["throughput"] for r in rows), default=0.0) or 1.0
    ordered = sorted(rows, key=lambda r: -1.0 if r["jain"] is None else r["jain"], reverse=True)
    lines: list[str] = []
    crossed = False
    for r in ordered:
        if not crossed and not r["meets_target"]:
            lines.append(f"{'':>22} {'-' * 8} Jain target {target:g} {'-' * 8}")
            crossed = True
        jain = "  —  " if r["jain"] is None else f"{r['jain']:.3f}"
        bar = "#" * max(1, round(width * r["throughput"] / top))
        lines.append(f"{'*' if r['recommended'] else ' '} {label(r):<20} Jain {jain}  {bar} {r['throughput']:.0f} tok/s")
    return lines


def plot(rows: Sequence[dict[str, Any]], path: str, target: float, title: str) -> None:
    """Throughput against Jain's index, DLPM's quanta as a line, the target as a vertical line and
    the recommendation circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    nan = float("nan")
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        key = r["policy"] + (f" Qw={_g(r['router_quantum'])}" if r["router_quantum"] is not None else "")
        groups.setdefault(key, []).append(r)
    for key, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["quantum"] or 0.0)
        xs = [nan if r["jain"] is None else r["jain"] for r in rs]
        ys = [r["throughput"] for r in rs]
        ax.plot(xs, ys, marker="o" if len(rs) > 1 else "s", linestyle="-" if len(rs) > 1 else "none", label=key)
        for r, x, y in zip(rs, xs, ys, strict=True):
            if r["quantum"] is not None:
                ax.annotate(f"Q={_g(r['quantum'])}", (x, y), textcoords="offset points", xytext=(5, -11), fontsize=8)
    best = next(r for r in rows if r["recommended"])
    if best["jain"] is not None:
        ax.scatter([best["jain"]], [best["throughput"]], s=260, facecolors="none", edgecolors="black", linewidths=1.5,
                   label=f"recommended: {label(best)}", zorder=4)
    ax.axvline(target, color="gray", linestyle="--", linewidth=1, label=f"Jain target {target:g}")
    ax.set_xlabel("Jain's index (service of backlogged clients)")
    ax.set_ylabel("throughput (prompt + output tokens/s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(textwrap.fill(title, 110), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _g(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _num(x: float) -> float | None:
    return None if math.isnan(x) else x
