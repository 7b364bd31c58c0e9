"""The run as plain-text tables on stdout: every figure, then the issue's targets with pass/fail."""

from __future__ import annotations

from collections.abc import Sequence

from cellstream.bench.targets import Check, floor_run

TURNS_SHOWN = 6  # turns of the conversation printed (first, last, evenly between)


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Text columns aligned left, numbers right."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(h), *(len(row[k]) for row in cells)]) for k, h in enumerate(headers)]
    left = [bool(rows) and isinstance(rows[0][k], str) for k in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  " + "  ".join(v.ljust(w) if lj else v.rjust(w) for v, w, lj in zip(values, widths, left, strict=True))

    return "\n".join(line(row).rstrip() for row in [list(headers), *cells])


def _cell(value: object) -> str:
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _header(results: dict) -> str:
    machine, model, options = results["machine"], results["model"], results["options"]
    mode = "quick run: numbers not meaningful" if options["quick"] else "full run"
    return (f"cellstream bench ({mode}) on {machine['cpu_model']}, {machine['cores']} cores, "
            f"load {machine['load_average_at_start'][0]:.2f} at start\n"
            f"model {model['name']}: {model['num_layers']} layers x {model['hidden_size']}, "
            f"vocab {model['vocab_size']}; onnxruntime {machine['versions']['onnxruntime']}, "
            f"{options['ort_threads']} intra-op thread(s); {options['clients']} client processes")


def _floor(results: dict) -> str:
    rows = [(r["api"], r["calls"], r["messages_per_s"], r["p50_ms"], r["p99_ms"], r["server_cpu_us_per_message"],
             r["client_cpu_us_per_message"]) for r in results["floor"]]
    return ("0. Floor: an empty gRPC server (same loop, bytes and load; no work): the best any service on it can do; "
            "kserve rows: driven by tritonclient\n"
            + _table(("api", "calls", "msgs/s", "p50 ms", "p99 ms", "server us/msg", "client us/msg"), rows))


def _limit(results: dict) -> str:
    limit = results["limit"]
    rows = [(p["batch"], p["steps_per_s"], p["us_per_call"]) for p in limit["steps"]]
    prefill = limit["prefill"]
    return ("1. Limit: in-process onnxruntime, T=1\n" + _table(("batch", "steps/s", "us/call"), rows)
            + f"\n  prefill T={prefill['tokens']}: {prefill['tokens_per_s']:,.0f} tokens/s")


def _service(results: dict) -> str:
    efficiency = {(r["config"], r["api"], r["sessions"], r["calls"]): r["efficiency"] for r in results["efficiency"]}
    rows = []
    for config, measured in results["service"].items():
        for run in measured["runs"]:
            key = (config, run["api"], run["sessions"], run["calls"])
            floor = floor_run(results, run["api"], run["calls"])
            rows.append((*key, run["steps_per_s"], run["p50_ms"], run["p99_ms"], run["mean_batch"],
                         run["server_cpu_us_per_step"], run["client_cpu_us_per_step"], efficiency[key],
                         "" if floor is None else floor["messages_per_s"],
                         "" if floor is None else floor["server_cpu_us_per_message"]))
    headers = ("config", "api", "sessions", "calls", "steps/s", "p50 ms", "p99 ms", "mean batch", "server us/step",
               "client us/step", "efficiency", "floor msgs/s", "floor us/msg")
    return ("2-3. Service: 1-token steps (calls: streams or unary calls in flight; p50/p99: per message); "
            "efficiency = steps/s / limit at the mean batch; floor: the empty server's streams or unary calls "
            "at as many calls (figure 0)\n" + _table(headers, rows))


def _conversation(results: dict) -> str:
    conv = results["conversation"]
    count = conv["turns"]
    shown = sorted({round(k * (count - 1) / (TURNS_SHOWN - 1)) for k in range(TURNS_SHOWN)})
    rows = [(k + 1, conv["stateful_ms"][k], conv["stateless_ms"][k], conv["stateless_ms"][k] / conv["stateful_ms"][k])
            for k in shown]
    return (f"4. Stateful vs stateless: {count} turns of ~{conv['bytes_per_turn']:.0f} bytes, "
            f"median of {conv['repetitions']}\n" + _table(("turn", "stateful ms", "stateless ms", "ratio"), rows))


def _generate(results: dict) -> str:
    rows = [(r["replies"], r["tokens_per_s"], r["p50_ms"], r["p99_ms"], r["mean_batch"]) for r in results["generate"]]
    return ("5. Generate: concurrent chat replies (latency per streamed chunk)\n"
            + _table(("replies", "tokens/s", "p50 ms", "p99 ms", "mean batch"), rows))


def _memory(results: dict) -> str:
    memory, startup = results["memory"], results["startup"]
    return (f"6. Memory: {memory['bytes_per_session']:,.0f} resident bytes per idle session "
            f"({memory['sessions']:,} sessions; state alone {memory['state_bytes_per_session']:,} B)\n"
            f"   Start-up to SERVING: median {startup['median_s']:.2f} s, max {startup['max_s']:.2f} s "
            f"over {len(startup['samples_s'])} starts")


def _targets(checks: Sequence[Check]) -> str:
    rows = []
    for check in checks:
        measured = "not measured" if check.measured is None else f"{_cell(check.measured)} {check.unit}".strip()
        verdict = "-" if check.passed is None else ("pass" if check.passed else "FAIL")
        floor = "" if check.floor is None else f"{_cell(check.floor)} {check.unit}".strip()
        rows.append((check.name, f"{check.requirement} {check.unit}".strip(), measured, verdict, floor))
    return ("Targets (issues 4, 8 and 15); floor: the best the empty gRPC server of figure 0 allows\n"
            + _table(("target", "required", "measured", "pass", "floor"), rows))


def render(results: dict, checks: Sequence[Check]) -> str:
    sections = (_header(results), _floor(results), _limit(results), _service(results), _conversation(results),
                _generate(results), _memory(results), _targets(checks))
    return "\n\n".join(sections)
