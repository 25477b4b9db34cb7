"""`tandem bench`'s results: a row per rate (latency percentiles, joint SLO attainment, goodput),
the table, and the plots (attainment against rate, latency CDFs, request timelines) as PNGs."""
from __future__ import annotations

from pathlib import Path

import msgspec

from tandem.deploy.bench_load import Timing


class Slo(msgspec.Struct, frozen=True):
    ttft_s: float
    tpot_s: float
    attainment: float = 0.9


class RateRow(msgspec.Struct, frozen=True):
    rate: float
    requests: int
    errors: int
    ttft_ms: tuple[float, float, float]  # p50, p90, p99
    tpot_ms: tuple[float, float, float]
    itl_ms: tuple[float, float, float]
    attainment: float  # share of requests meeting both SLOs (a failed request meets none)
    goodput: float  # requests per second that met both, over the run's duration
    duration_s: float


def percentiles(values: list[float], scale: float = 1e3) -> tuple[float, float, float]:
    if not values:
        return (float("nan"),) * 3
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * scale  # noqa: E731
    return pick(0.5), pick(0.9), pick(0.99)


def meets(t: Timing, slo: Slo) -> bool:
    if t.error is not None or t.ttft is None or t.ttft > slo.ttft_s:
        return False
    return t.tpot is None or t.tpot <= slo.tpot_s


def summarize(rate: float, timings: list[Timing], slo: Slo) -> RateRow:
    ok = [t for t in timings if t.error is None]
    duration = max((t.end for t in timings), default=0.0) or 1e-9
    good = sum(meets(t, slo) for t in timings)
    return RateRow(
        rate=rate, requests=len(timings), errors=len(timings) - len(ok),
        ttft_ms=percentiles([t.ttft for t in ok if t.ttft is not None]),
        tpot_ms=percentiles([t.tpot for t in ok if t.tpot is not None]),
        itl_ms=percentiles([gap for t in ok for gap in t.itls]),
        attainment=good / max(1, len(timings)), goodput=good / duration, duration_s=duration)


def goodput(rows: list[RateRow], slo: Slo) -> float | None:
    """DistServe's goodput: the highest rate run whose attainment reaches the target (None: none did)."""
    passing = [r.rate for r in rows if r.attainment >= slo.attainment]
    return max(passing) if passing else None


def table(rows: list[RateRow], slo: Slo) -> str:
    head = ("| rate (req/s) | requests | errors | TTFT p50/p90/p99 (ms) | TPOT p50/p90/p99 (ms) "
            "| ITL p50/p90/p99 (ms) | attainment | good req/s |")
    lines = [head, "|" + "---|" * 8]
    fmt = lambda p: "/".join(f"{v:.0f}" for v in p)  # noqa: E731
    for r in rows:
        lines.append(f"| {r.rate:g} | {r.requests} | {r.errors} | {fmt(r.ttft_ms)} | {fmt(r.tpot_ms)} "
                     f"| {fmt(r.itl_ms)} | {r.attainment:.1%} | {r.goodput:.2f} |")
    best = goodput(rows, slo)
    lines.append("")
    lines.append(f"SLO: TTFT <= {slo.ttft_s * 1e3:g} ms and TPOT <= {slo.tpot_s * 1e3:g} ms for "
                 f"{slo.attainment:.0%} of requests; goodput (highest rate meeting it): "
                 + (f"{best:g} req/s" if best is not None else "none of the rates"))
    return "\n".join(lines)


def attainment_plot(measured: dict[str, list[tuple[float, float]]], simulated: dict[str, list[tuple[float, float]]],
                    target: float, path: Path) -> Path:
    """SLO attainment against rate: measured curves solid, simulated ones dashed, on one axes
    (``tandem bench`` draws what it measured, ``tandem simulate --plot`` its prediction beside a
    bench's results)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for style, curves in (("-", measured), ("--", simulated)):
        for label, points in curves.items():
            ax.plot([r for r, _ in points], [100 * a for _, a in points], linestyle=style, marker="o",
                    label=label if style == "-" else f"{label} (simulated)")
    ax.axhline(100 * target, color="grey", linestyle=":", label=f"target {target:.0%}")
    ax.set(xlabel="rate (requests/s)", ylabel="requests meeting both SLOs (%)", ylim=(0, 105),
           title="SLO attainment against rate")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(runs: dict[float, list[Timing]], rows: list[RateRow], slo: Slo, out: Path) -> list[Path]:
    """attainment.png, latency_cdf.png and timeline.png under ``out``; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "attainment.png", out / "latency_cdf.png", out / "timeline.png"]
    attainment_plot({"measured": [(r.rate, r.attainment) for r in rows]}, {}, slo.attainment, paths[0])

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for rate, timings in runs.items():
        for ax, values in ((left, [t.ttft for t in timings if t.ttft is not None]),
                           (right, [t.tpot for t in timings if t.tpot is not None])):
            ordered = sorted(1e3 * v for v in values)
            if ordered:
                ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=f"{rate:g} req/s")
    for ax, name, limit in ((left, "TTFT", slo.ttft_s), (right, "TPOT", slo.tpot_s)):
        ax.axvline(1e3 * limit, color="grey", linestyle="--")
        ax.set(xlabel=f"{name} (ms)", ylabel="fraction of requests", title=f"{name} CDF")
        ax.legend()
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)

    rate, timings = max(runs.items())
    fig, ax = plt.subplots(figsize=(8, max(3, 0.12 * len(timings))))
    for t in timings:
        first = t.token_times[0] if t.token_times else t.end
        ax.plot([t.sent, first], [t.index, t.index], color="tab:orange", linewidth=2)
        ax.plot([first, t.end], [t.index, t.index], color="tab:red" if t.error else "tab:blue", linewidth=2)
    ax.set(xlabel="seconds from the start", ylabel="request",
           title=f"Requests at {rate:g} req/s: waiting for the first token (orange), decoding (blue)")
    fig.tight_layout()
    fig.savefig(paths[2], dpi=100)
    plt.close(fig)
    return paths
