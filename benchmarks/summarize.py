"""Markdown tables of the latest record of each benchmark (the README's "Benchmarks" section is pasted from this).

Usage: ``python benchmarks/summarize.py``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def latest(name: str) -> dict | None:
    path = RESULTS / f"{name}.jsonl"
    if not path.exists():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else None


def extract_table(rec: dict) -> str:
    m, p = rec["metrics"], rec["params"]
    e2e, steady = m["samples_per_second_end_to_end"], m["samples_per_second_steady"]
    cpus = rec["machine"]["cpus"]
    load = m["load_average_1m_before_after"]
    x = p["extract"]
    rows = [
        f"`bench_extract` ({rec['date'][:10]}, {m['rows']} rows, tiny model, {cpus} CPUs, default extract settings: "
        f"batch {x['batch_size']}, shards of {x['shard_rows']} rows, {x['min_actors']}..{x['max_actors']} actor(s) "
        f"x {x['num_cpus_per_actor']:g} CPU; load average {load[0]} before, {load[1]} after)",
        "",
        "| arm | steady samples/s | vs bare loop (every CPU) | end-to-end samples/s | vs bare loop (every CPU) |",
        "|---|---|---|---|---|",
    ]
    labels = {"bare_loop_all_cpus": f"bare single-process loop, {cpus} torch threads",
              "bare_loop_1_thread": "bare single-process loop, 1 torch thread",
              "ray_default": "Ray pipeline, default extract settings"}
    for key, label in labels.items():
        r_s = steady[key] / steady["bare_loop_all_cpus"]
        r_e = e2e[key] / e2e["bare_loop_all_cpus"]
        bold = "**" if key == "ray_default" else ""
        rows.append(f"| {label} | {steady[key]} | {bold}{r_s:.3f}{bold} | {e2e[key]} | {r_e:.3f} |")
    rows.append(f"\nTarget: Ray steady ≥ {m['target_ratio_steady']} × the bare loop on every CPU.")
    return "\n".join(rows)


def gradients_table(rec: dict) -> str:
    m = rec["metrics"]
    return "\n".join([
        f"`bench_gradients` ({rec['date'][:10]}; {rec['params']['torch_threads']} torch thread(s), batch "
        f"{rec['params']['batch_size']}, load average "
        f"{' -> '.join(map(str, m.get('load_average_1m_before_after_per_sample', ['?'])))})",
        "",
        "| measure | value |",
        "|---|---|",
        f"| per-sample LoRA gradients, loop | {m['loop_ms_per_sample']} ms wall, {m['loop_cpu_ms_per_sample']} ms CPU "
        f"per sample |",
        f"| per-sample LoRA gradients, torch.func vmap, SDPA attention | {m['vmap_sdpa_ms_per_sample']} ms wall, "
        f"{m['vmap_sdpa_cpu_ms_per_sample']} ms CPU ({m['vmap_sdpa_over_loop_cpu']}× the loop in CPU time) |",
        f"| per-sample LoRA gradients, torch.func vmap, eager attention (default) | "
        f"{m['vmap_eager_ms_per_sample']} ms wall, {m['vmap_eager_cpu_ms_per_sample']} ms CPU "
        f"({m['vmap_eager_over_loop_cpu']}× the loop in CPU time) |",
        f"| dense Rademacher projector peak, 134M-param LoRA → 8192 | {m['dense_peak_mb']} MB (target ≤ 2048) |",
        f"| sparse JL projector peak | {m['sparse_peak_mb']} MB |",
        f"| sparse vs dense projection speed-up (same input) | {m['sparse_speedup']}× |",
    ])


def records(name: str) -> list[dict]:
    path = RESULTS / f"{name}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def select_table(_rec: dict) -> str:
    """The latest partitioned-pipeline record of each (dims, method) (records with per-cell results)."""
    latest_of: dict[tuple, dict] = {}
    for rec in records("bench_select"):
        if "cells" not in rec["metrics"]:
            continue
        for method in rec["params"]["methods"]:
            latest_of[(rec["params"]["dims"], method)] = rec
    lines = ["`bench_select` (partitioned aggregate + select on generated stores, 20 tasks; per-process peak RSS "
             "of the driver and every Ray worker)", "",
             "| dims | method | date | rows | seconds (phases / cell) | driver peak RSS MB | max process peak RSS MB "
             "| serve state MB | time exponent | RSS growth | targets met |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (dims, method), rec in sorted(latest_of.items()):
        pm = rec["metrics"]["per_method"][method]
        unmeasured = {"rss_growth_le_10pct": pm.get("rss_growth"), "exponent_le_1_15": pm.get("time_exponent")}
        targets = {k: v for k, v in pm.get("targets", {}).items() if k not in unmeasured or unmeasured[k] is not None}
        met = ", ".join(k for k, v in targets.items() if v) or "-"
        missed = [k for k, v in targets.items() if not v]
        for cell in (c for c in rec["metrics"]["cells"] if c["method"] == method):
            if "error" in cell:
                lines.append(f"| {dims} | {method} | {rec['date'][:10]} | {cell['rows']:,} | failed | - | - | - | - | - "
                             f"| - |")
                continue
            state = (cell.get("serve_state") or {}).get("state_and_cache_rss_mb")
            phase = cell["aggregate_seconds"] + cell["select_seconds"]
            exp = pm.get("time_exponent")
            growth = pm.get("rss_growth")
            lines.append(f"| {dims} | {method} | {rec['date'][:10]} | {cell['rows']:,} | {phase:.0f} / "
                         f"{cell['seconds']:.0f} | {cell.get('driver_peak_rss_mb', 0):,.0f} | "
                         f"{cell['max_process_peak_rss_mb']:,.0f} | "
                         f"{'-' if state is None else f'{state:.0f}'} | {'-' if exp is None else f'{exp:.2f}'} | "
                         f"{'-' if growth is None else f'{growth:+.0%}'} | {met}"
                         f"{' (missed: ' + ', '.join(missed) + ')' if missed else ''} |")
    return "\n".join(lines)


SERVE_CELLS = (("batched_c1", "@serve.batch 16, concurrency 1"), ("batched_c16", "@serve.batch 16, concurrency 16"),
               ("batch_size_1_c1", "batch size 1, concurrency 1"), ("batch_size_1_c16", "batch size 1, concurrency 16"),
               ("noop_floor_c1", "no-op Serve app (floor), concurrency 1"),
               ("noop_floor_c16", "no-op Serve app (floor), concurrency 16"))


def _serve_cells(cells: dict) -> list[str]:
    """Table rows of the bench_serve cells present in ``cells``."""
    rows = ["| setting | throughput (req/s) | p50 ms | p99 ms | machine CPU ms per request |", "|---|---|---|---|---|"]
    for key, label in SERVE_CELLS:
        if key in cells:
            c = cells[key]
            rows.append(f"| {label} | {c['throughput_rps']} | {c['p50_ms']} | {c['p99_ms']} | "
                        f"{c.get('cpu_ms_per_request', '-')} |")
    return rows


def serve_table(rec: dict) -> str:
    m = rec["metrics"]
    rows = ["`bench_serve` ({}; tiny model, one sample per request, 12 s per cell)".format(rec["date"][:10]), "",
            *_serve_cells(m)]
    realised = m.get("batching_gain_realised")
    target = (f"{realised:.0%} of the in-process gain, target ≥ 85%" if realised is not None
              else "target of that record: ≥ 3×")
    rows += ["", f"Batching vs batch size 1 at concurrency 16: **{m['batched_over_batch1_throughput_c16']}×** "
                 f"({target}); HTTP overhead over a direct Scorer call (p50): **{m['http_overhead_p50_ms']} ms** "
                 f"(target ≤ 15 ms; direct call {m['direct_scorer_p50_ms']} ms)."]
    direct = m.get("direct_ingress")
    if direct:
        rows += ["", "With Serve's direct ingress (`datasel serve --direct-ingress`: requests go straight to the "
                     "replica's own port, no proxy hop; a second local Ray, cells interleaved within it):", "",
                 *_serve_cells(direct)]
        rows += ["", f"Batching vs batch size 1 at concurrency 16, direct ingress: "
                     f"**{direct['batched_over_batch1_throughput_c16']}×** "
                     f"({direct['batching_gain_realised']:.0%} of the in-process gain, target ≥ 85%)."]
    amortisation = m.get("model_amortisation")
    if amortisation:
        rows += ["", f"In-process, one model pass costs {amortisation['ms_per_sample_batch_1']} ms per sample at "
                     f"batch 1 and {amortisation['ms_per_sample_batch_16']} ms at batch 16 "
                     f"({amortisation['model_speedup']}×): the most batching can gain on this model and CPU."]
    costs = m.get("request_amortisation")
    if costs:
        rows += ["", f"The whole scoring work of a request (parse + model pass) costs {costs['ms_per_sample_batch_1']} "
                     f"ms per sample at batch 1 and {costs['ms_per_sample_batch_16']} ms at batch 16 in-process; the "
                     f"no-op app costs the machine {m['http_cpu_ms_per_request_c16']} ms of CPU per request at "
                     f"concurrency 16, which batching cannot touch. Were the scoring work the only thing batching changed, "
                     f"the throughput ratio would be about **{m['batching_estimate_from_cpu']}×** (an estimate from "
                     f"these CPU costs, not a bound); the batched app reached "
                     f"{m['batched_over_batch1_of_estimate']:.0%} of it."]
    return "\n".join(rows)


def _mean_std(entry: dict, name: str) -> str:
    """``entry[name]`` (a ``{"mean", "std"}`` record field) as "mean ± std", the mean alone when std is 0, else "-"."""
    v = entry.get(name)
    if v is None or v.get("mean") is None:
        return "-"
    return f"{v['mean']:.3f} ± {v['std']:.3f}" if v.get("std") else f"{v['mean']:.3f}"


def quality_table(rec: dict) -> str:
    m = rec["metrics"]
    p = rec["params"]
    rows = [f"`quality` ({rec['date'][:10]}; {p['num_samples']} rows, seeds {p['seeds']}, {p['train']['steps']} "
            f"training steps{' — quick smoke size' if p.get('quick') else ''})", "",
            "| subset | rows | dup rate | noise rate | task coverage | held-out acc | Rel (acc) | held-out loss | "
            "Rel (loss) |", "|---|---|---|---|---|---|---|---|---|"]
    for key, val in m.items():
        if not isinstance(val, dict) or "loss" not in val:
            continue
        cell = functools.partial(_mean_std, val)
        rows.append(f"| {key} | {cell('rows')} | {cell('dup')} | {cell('noise')} | {cell('coverage')} | "
                    f"{cell('acc')} | {cell('rel_acc')} | {cell('loss')} | {cell('rel_loss')} |")
    skipped = p.get("skipped")
    if skipped:
        rows += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())]
    return "\n".join(rows)


def quality_real_table(rec: dict) -> str:
    m, p = rec["metrics"], rec["params"]
    if "error" in m:
        head = f"`quality_real` ({rec['date'][:10]}): failed or stopped: {m['error']}"
        if not any(isinstance(v, dict) and "loss" in v for v in m.values()):
            return head
    else:
        head = ""
    proto = m.get("protocol", {})
    rows = [head] if head else []
    rows += [f"`quality_real` ({rec['date'][:10]}; {p['pool']} pool of {p['num_samples']} rows, duplicate rate "
             f"{p['duplicate_rate']}, noise rate {p['noise_rate']}; seeds {p['seeds']}; {p['epochs']} epochs at batch "
             f"{p['batch_size']}; {p['eval_samples']} held-out questions; warm-up preset {p['warmup_preset']}; "
             f"{m.get('total_s', 0) / 60:.0f} min; full minus random@{p['budgets'].split(',')[0]} = "
             f"{proto.get('full_minus_random_rel', proto.get('full_minus_random15_rel_acc'))} points of Rel "
             f"({proto.get('metric', 'acc')}), discriminates: {proto.get('discriminates')})", "",
             "| subset | rows | dup rate | noise rate | task coverage | held-out acc | acc / full acc x 100 | Rel (acc) | "
             "held-out loss | Rel (loss) |", "|---|---|---|---|---|---|---|---|---|---|"]
    full_acc = m.get("full", {}).get("acc", {}).get("mean")
    for key, val in m.items():
        if not isinstance(val, dict) or "loss" not in val:
            continue
        ratio = "-" if key == "full" or not full_acc else f"{100 * val['acc']['mean'] / full_acc:.1f}"
        cell = functools.partial(_mean_std, val)
        rows.append(f"| {key} | {cell('rows')} | {cell('dup')} | {cell('noise')} | {cell('coverage')} | "
                    f"{cell('acc')} | {ratio} | {cell('rel_acc')} | {cell('loss')} | {cell('rel_loss')} |")
    return "\n".join(rows)


def duplicate_table(rec: dict) -> str:
    p = rec["params"]
    per_seed = rec["metrics"]["per_seed"]
    seeds = list(per_seed)
    random = " / ".join(f"{per_seed[s]['random']['mean']:.3f}" for s in seeds)
    rows = [f"`duplicate_sensitivity` ({rec['date'][:10]}; {p['num_samples']} rows, seeds {p['seeds']}, budget "
            f"{p['budget']}, noise {p['noise']}; random's expected dup rate per seed: {random})", "",
            "| features / method | dup rate per seed | random with the same task mix | below random's expectation | "
            "below same-task-mix random |", "|---|---|---|---|---|"]
    for key, val in rec["metrics"]["summary"].items():
        dups = " / ".join(f"{per_seed[s][key]['dup']:.3f}" for s in seeds)
        matched = " / ".join(f"{per_seed[s][key]['random_same_task_mix']:.3f}" for s in seeds)
        rows.append(f"| {key} | {dups} | {matched} | {val['below_random_expectation']} of {len(seeds)} | "
                    f"{val['below_same_task_mix']} of {len(seeds)} |")
    return "\n".join(rows)


def main() -> None:
    for name, fmt in (("bench_extract", extract_table), ("bench_gradients", gradients_table),
                      ("bench_select", select_table), ("bench_serve", serve_table), ("quality", quality_table),
                      ("quality_real", quality_real_table),
                      ("duplicate_sensitivity", duplicate_table)):
        rec = latest(name)
        try:
            print(fmt(rec) if rec else f"`{name}`: no record yet")
        except KeyError as err:  # a record written before the benchmark measured this field
            print(f"`{name}`: the latest record ({rec['date'][:10]}) has no {err}: re-run the benchmark")
        print()


if __name__ == "__main__":
    main()
