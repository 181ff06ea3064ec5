"""The LLM benchmark's results: the ratios the targets are set on, the table (console and markdown), how far the
three agree on the text, ``results/llm.json`` and ``results/llm.md``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

import report

NAME = "llm"
KEY_STREAMS = 8
#: name -> (what, target, True when higher is better).
TARGETS = {
    "vs_generate": (f"maas tokens/s at {KEY_STREAMS} streams ÷ sequential generate", 2.5, True),
    "vs_transformers_serve": (
        f"maas tokens/s at {KEY_STREAMS} streams ÷ transformers serve at {KEY_STREAMS}",
        1.2,
        True,
    ),
    "ttft_p95_s": (f"maas time to first token p95 at {KEY_STREAMS} streams, s", 2.0, False),
}
HEADERS = (
    "server",
    "streams",
    "tok/s",
    "TTFT p50",
    "TTFT p95",
    "ITL p50",
    "ITL p95",
    "done/sent",
    "err",
    "RSS MiB",
    "vs gen",
    "vs peer",
)
UNITS = "TTFT in s, ITL in ms; vs gen, vs peer: tok/s over generate's, over tf serve's at the same streams"


def _level(result: dict[str, Any] | None, streams: int) -> dict[str, Any] | None:
    if result is None:
        return None
    return next((lv for lv in result["levels"] if lv["streams"] == streams), None)


def ratios(maas: dict[str, Any], generate: dict[str, Any], peer: dict[str, Any] | None) -> dict[str, Any]:
    key = _level(maas, KEY_STREAMS)
    peer_key = _level(peer, KEY_STREAMS)
    if key is None:
        return {}
    values = {
        "vs_generate": key["tokens_per_s"] / generate["tokens_per_s"],
        "vs_transformers_serve": (
            key["tokens_per_s"] / peer_key["tokens_per_s"] if peer_key and peer_key["tokens_per_s"] > 0 else None
        ),
        "ttft_p95_s": key["ttft_p95_s"],
    }
    out = {}
    for name, value in values.items():
        what, target, higher = TARGETS[name]
        met = None if value is None else (value >= target if higher else value <= target)
        out[name] = {"what": what, "value": value, "target": target, "met": met}
    return out


def agreement(texts: dict[int, str] | None, reference: dict[int, str]) -> dict[str, int] | None:
    """How many completions are identical to sequential generate's, over the prompts both finished."""
    if texts is None:
        return None
    common = sorted(set(texts) & set(reference))
    return {"compared": len(common), "identical": sum(texts[p] == reference[p] for p in common)}


def _f(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def rows(maas: dict[str, Any], generate: dict[str, Any], peer: dict[str, Any] | None) -> list[list[str]]:
    out = [
        [
            "generate",
            "1 (seq.)",
            _f(generate["tokens_per_s"], ",.1f"),
            "—",
            "—",
            _f(1000 * generate["seconds_per_request_p50"] / generate["mean_completion_tokens"], ",.0f"),
            "—",
            f"{generate['requests']}/{generate['requests']}",
            "0",
            "—",
            "1.00",
            "—",
        ]
    ]
    for name, result in (("maas", maas), ("tf serve", peer)):
        if result is None:
            continue
        for lv in result["levels"]:
            other = _level(peer, lv["streams"]) if result is maas else None
            vs_peer = lv["tokens_per_s"] / other["tokens_per_s"] if other and other["tokens_per_s"] > 0 else None
            out.append(
                [
                    name,
                    str(lv["streams"]),
                    _f(lv["tokens_per_s"], ",.1f"),
                    _f(lv["ttft_p50_s"], ".2f"),
                    _f(lv["ttft_p95_s"], ".2f"),
                    _f(lv["itl_p50_ms"], ",.0f"),
                    _f(lv["itl_p95_ms"], ",.0f"),
                    f"{lv['finished']}/{lv['requests']}",
                    str(lv["errors"]),
                    _f(lv["peak_rss_mib"], ",.0f"),
                    _f(lv["tokens_per_s"] / generate["tokens_per_s"], ".2f"),
                    _f(vs_peer, ".2f"),
                ]
            )
    return out


def _ratio_lines(found: dict[str, Any], skipped: dict[str, str]) -> list[str]:
    lines = []
    for name, r in found.items():
        if r["value"] is None:
            why = skipped.get("transformers serve", "not measured")
            lines.append(f"- {r['what']}: not measured ({why}); target {r['target']:g}")
            continue
        sign = "≥" if TARGETS[name][2] else "≤"
        verdict = "met" if r["met"] else "MISSED"
        lines.append(f"- {r['what']}: **{r['value']:.2f}** (target {sign} {r['target']:g}: {verdict})")
    return lines


def _notes(
    config: dict[str, Any],
    maas: dict[str, Any],
    generate: dict[str, Any],
    peer: dict[str, Any] | None,
    agree: dict[str, Any],
    skipped: dict[str, str],
) -> list[str]:
    start, end = config["load_avg_start"], config["load_avg_end"]

    def cores(result: dict[str, Any]) -> str:
        return ", ".join(f"{lv['others_cores']:.2f}" for lv in result["levels"])

    notes = [
        f"- How busy the machine was: load averages (1/5/15 min) {start[0]:.2f}/{start[1]:.2f}/{start[2]:.2f} at the "
        f"start, {end[0]:.2f}/{end[1]:.2f}/{end[2]:.2f} at the end (they count this benchmark's own processes). "
        f"Cores kept busy by other processes (the machine's busy CPU time less the benchmark's and the server's) "
        f"during each level: maas {cores(maas)}; generate {generate['others_cores']:.2f}"
        + (f"; transformers serve {cores(peer)}" if peer else "")
        + f", of {os.cpu_count()} CPUs.",
    ]
    for name, result in (("maas serve", maas), ("transformers serve", peer)):
        if result is None:
            continue
        cpt = [lv["chunks_per_token"] for lv in result["levels"] if lv["chunks_per_token"] is not None]
        if not result["usage_checked"]:
            check = "stream_options refused: chunks counted as tokens, unchecked"
        elif cpt:
            check = (
                f"content chunks per completion token (usage) on finished requests: {min(cpt):.3f} to {max(cpt):.3f}"
            )
        else:
            check = "no request finished inside a window: chunks per token unchecked"
        eos = sum(lv["finished_at_eos"] for lv in result["levels"])
        done = sum(lv["finished"] for lv in result["levels"])
        burst = result["burst_ttft_p95_s"]
        notes.append(
            f"- {name}: RSS {result['idle_rss_mib']:,.0f} MiB after warm-up; one request alone took "
            f"{result['spread_s']:.1f} s (the clients' starts are spread over it); 16 short requests sent at once: "
            f"TTFT p95 {_f(burst, '.2f')} s; {check}; {eos} of {done} finished requests ended at EOS before "
            f"{config['max_tokens']} tokens."
        )
        errors = [lv["first_error"] for lv in result["levels"] if lv["first_error"]]
        if errors:
            notes.append(f"- {name}: first error: {errors[0]}")
    for name, a in agree.items():
        if a is not None:
            notes.append(
                f"- Greedy text identical to sequential generate's: {name} {a['identical']} of {a['compared']} "
                "completions compared (another numeric path, bfloat16 weights or batched matrix products, may "
                "pick another token where two are close, and the text diverges from there)."
            )
    notes += [f"- {name}: {why}" for name, why in skipped.items()]
    return notes


def publish(
    console: Console,
    *,
    machine: dict[str, Any],
    config: dict[str, Any],
    maas: dict[str, Any],
    generate: dict[str, Any],
    peer: dict[str, Any] | None,
    skipped: dict[str, str],
) -> list[Path]:
    found = ratios(maas, generate, peer)
    agree = {
        "maas serve": agreement(maas["texts"], generate["texts"]),
        "transformers serve": agreement(peer["texts"] if peer else None, generate["texts"]),
    }
    cells = rows(maas, generate, peer)
    table = Table(title=f"LLM serving: {config['model']}", caption=UNITS, box=box.SIMPLE_HEAVY)
    for i, h in enumerate(HEADERS):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in cells:
        table.add_row(*row)
    # The table needs the room: in a pipe (a log file), wider than Rich's default of 80 columns.
    wide = console if console.is_terminal else Console(file=console.file, width=max(console.width, 140))
    wide.print(table)
    ratio_lines = _ratio_lines(found, skipped)
    notes = _notes(config, maas, generate, peer, agree, skipped)
    for line in ratio_lines + notes:
        console.print(line, highlight=False, markup=False)
    payload = {
        "machine": machine,
        "config": config,
        "ratios": found,
        "agreement": agree,
        "maas_serve": maas,
        "sequential_generate": generate,
        "transformers_serve": peer,
        "skipped": skipped,
    }
    body = "\n".join(
        [
            f"{machine['timestamp']}; Python {machine['python']}, torch {machine['torch']}, transformers "
            f"{machine['transformers']}, openai {machine['openai']}. {config['threads']} compute thread(s) each "
            f"(MAAS_LLM_THREADS); maas with MAAS_LLM_WEIGHTS={config['maas_llm_weights']} on a CPU "
            f"{'with' if config['cpu_native_bf16'] else 'without'} native bfloat16 (auto: bfloat16 matrices where "
            "it has), generate and transformers serve in float32; "
            f"a {config['kv_cache_mb']:,} MiB KV cache for each server (MAAS_LLM_KV_CACHE_MB; "
            f"transformers serve: `--cb-num-blocks {config['peer_kv_blocks']}`), greedy, max_tokens "
            f"{config['max_tokens']}, {config['seconds_per_level']:g} s per level, {len(config['prompts'])} fixed "
            f"chat prompts; {config['client']}. Both servers run side by side; in each of {config['rounds']} "
            "round(s), generate, then each level on maas and on transformers serve back to back (the best round "
            "of each point is shown).",
            "",
            report.markdown_table(HEADERS, cells),
            "",
            "generate: transformers' `generate` in the benchmark's process, one prompt after another; maas: `maas "
            "serve`; tf serve: `transformers serve --continuous-batching`. tok/s: content chunks that arrived within "
            "the level's window, per second, all streams together. TTFT (s): request sent to first content chunk. "
            "ITL (ms): gap between a request's consecutive chunks (generate: its median request time per token). "
            "done/sent: requests finished / sent in the window (those still open at its end are closed). RSS: the "
            "server's peak resident memory with its children, sampled every 0.2 s. vs gen, vs peer: tok/s over "
            "generate's, over tf serve's at the same streams.",
            "",
            *ratio_lines,
            "",
            *notes,
        ]
    )
    return [
        report.write_json(NAME, payload),
        report.write_markdown_section(NAME, "LLM serving benchmark", report.machine_key(machine), body),
    ]
