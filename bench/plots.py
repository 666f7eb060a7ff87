"""PNG plots of a bench run (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PERCENTILES = ("p50", "p75", "p90", "p99")


def steady_latency(section: dict, path: Path) -> Path:
    """Latency percentiles per proxy, one panel per (body size, connections) case."""
    cases = section["cases"]
    fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 4), squeeze=False)
    for ax, case in zip(axes[0], cases):
        for name, t in case["targets"].items():
            values = [t.get(p, float("nan")) * 1e3 for p in PERCENTILES]
            ax.plot(PERCENTILES, values, marker="o", label=f"{name} ({t['rps']:.0f} req/s)")
        ax.set_title(f"{case['body_bytes']} B, {case['connections']} connections")
        ax.set_ylabel("latency (ms), median of rounds")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("steady: latency distribution per proxy (wrk --latency)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def wake_breakdown(section: dict, path: Path) -> Path:
    """Where the first request's extra time goes, per sleep mode (medians, ms)."""
    modes = section["modes"]
    columns = min(3, len(modes))
    rows = (len(modes) + columns - 1) // columns
    fig, grid = plt.subplots(rows, columns, figsize=(4.5 * columns, 4 * rows), squeeze=False)
    axes = [[ax for row in grid for ax in row]]
    for ax in axes[0][len(modes):]:
        ax.axis("off")
    parts = [("backend_resume", "backend resume / start"), ("readiness_wait", "readiness wait"),
             ("wakegate_overhead", "wakegate")]
    for ax, m in zip(axes[0], modes):
        bottom = 0.0
        for key, label in parts:
            value = max(0.0, m[key]["p50"])
            ax.bar([m["mode"]], [value], bottom=bottom, label=f"{label}: {value:.2f} ms")
            bottom += value
        ax.set_ylabel("ms added over an awake request (p50)")
        ax.set_title(f"{m['mode']}: first request +{m['added_over_awake']['p50']:.2f} ms")
        ax.legend(fontsize=8)
    fig.suptitle("wake: the first request to a sleeping service")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
