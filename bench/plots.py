"""PNG plots of a run (matplotlib, the bench extra), next to results.json."""

from __future__ import annotations

from pathlib import Path

from cellstream.bench.options import MULTIPLEXED
from cellstream.bench.targets import BATCHING


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a benchmark machine
    import matplotlib.pyplot as plt

    return plt


def _api_label(run: dict) -> str:
    """The api, and for multiplexed runs how many calls carried the sessions."""
    return f"{run['api']} x{run['calls']}" if run["api"] in MULTIPLEXED else run["api"]


def _service_series(results: dict) -> dict[tuple[str, str], tuple[list[int], list[dict]]]:
    """(api label, config) -> the sessions and runs of that series."""
    series: dict[tuple[str, str], tuple[list[int], list[dict]]] = {}
    for config, measured in results["service"].items():
        for run in measured["runs"]:
            sessions, runs = series.setdefault((_api_label(run), config), ([], []))
            sessions.append(run["sessions"])
            runs.append(run)
    return series


def plot_limit_and_efficiency(results: dict, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    limit = results["limit"]["steps"]
    ax.plot([p["batch"] for p in limit], [p["steps_per_s"] for p in limit], "k-o", label="onnxruntime in-process")
    for label in sorted({_api_label(row) for row in results["efficiency"]}):
        rows = [r for r in results["efficiency"] if _api_label(r) == label and r["config"] == BATCHING]
        ax.plot([r["mean_batch"] for r in rows], [r["service_steps_per_s"] for r in rows], "o--",
                label=f"service, {label} (at its mean batch)")
    ax.set(xscale="log", yscale="log", xlabel="batch size (service: mean batch size)", ylabel="steps/s",
           title="Limit vs service at the same batch size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_service(results: dict, path: Path) -> None:
    plt = _pyplot()
    fig, (rate, latency) = plt.subplots(1, 2, figsize=(11, 4.5))
    series = _service_series(results)
    # One colour per api (more series than matplotlib's default cycle has colours), one line style per config.
    colours = {api: plt.cm.tab10(k % 10) for k, api in enumerate(dict.fromkeys(api for api, _ in series))}
    for (api, config), (sessions, runs) in series.items():
        style = {"color": colours[api], "marker": "o", "linestyle": "-" if config == BATCHING else ":",
                 "label": f"{api}, {config}"}
        rate.plot(sessions, [r["steps_per_s"] for r in runs], **style)
        latency.plot(sessions, [r["p99_ms"] for r in runs], **style)
    rate.set(xscale="log", xlabel="concurrent sessions", ylabel="steps/s", title="Aggregate 1-token steps/s")
    latency.set(xscale="log", yscale="log", xlabel="concurrent sessions", ylabel="p99 ms", title="p99 step latency")
    for ax in (rate, latency):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_conversation(results: dict, path: Path) -> None:
    plt = _pyplot()
    conv = results["conversation"]
    turns = range(1, conv["turns"] + 1)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(turns, conv["stateful_ms"], "o-", markersize=3, label="stateful: only the new turn")
    ax.plot(turns, conv["stateless_ms"], "o-", markersize=3, label="stateless: whole history, zero state")
    ax.set(yscale="log", xlabel="turn", ylabel="latency ms (median)",
           title=f"Per-turn latency, ~{conv['bytes_per_turn']:.0f} bytes per turn")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOTS = {
    "limit_efficiency.png": plot_limit_and_efficiency,
    "service.png": plot_service,
    "conversation.png": plot_conversation,
}


def write_plots(results: dict, out_dir: Path) -> list[str]:
    for name, plot in PLOTS.items():
        plot(results, out_dir / name)
    return list(PLOTS)
