"""Ratios against the targets, and the short table printed at the end of a run."""

from __future__ import annotations

from typing import Any

# The targets (same 2-core machine, one run).
TARGET_MLP_VS_CELERY = 4.0      # MLP single-sample jobs/s over HTTP >= 4x Celery's
TARGET_CNN_VS_RAW = 0.70        # CNN single-sample jobs/s >= 70% of raw ORT best samples/s
TARGET_LOW_P50_MS = 3.0         # low-load p50 submit-to-result <= raw inference + 3 ms
TARGET_LOW_P99_MS = 10.0        # low-load p99 <= raw inference + 10 ms


def _get(d: dict[str, Any] | None, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a and b else None


# (phase prefix, what the table calls it); inferq's own rows first
SYSTEMS = (("inferq_http", "inferq HTTP, POST ?wait="), ("inferq_amqp", "inferq AMQP, confirms + reply_to"),
           ("celery", "Celery, defaults (prefork, rpc://)"),
           ("celery_durable", "Celery, quorum queue + confirms + acks_late"),
           ("bentoml", "BentoML sync API, 2 workers, adaptive batching"),
           ("bentoml_task", "BentoML task API, 1 worker, submit + poll"),
           ("ray", "Ray Serve, @serve.batch, 1 replica"))


def systems_of(phases: dict[str, Any]) -> list[tuple[str, str]]:
    """SYSTEMS, with a row after inferq HTTP for each further edge process count the run measured (``inferq_http_e<n>``)."""
    counts = sorted({int(name[len("inferq_http_e"):].split("_")[0]) for name in phases
                     if name.startswith("inferq_http_e") and name[len("inferq_http_e"):].split("_")[0].isdigit()})
    extra = [(f"inferq_http_e{n}", f"inferq HTTP, POST ?wait=, {n} edge processes") for n in counts]
    return [SYSTEMS[0], *extra, *SYSTEMS[1:]]


def spread(values: list[float]) -> dict[str, float] | None:
    """Median (the lower middle one for an even count, so it is a value that was measured), min and max."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    return {"median": vals[(len(vals) - 1) // 2], "min": vals[0], "max": vals[-1], "n": len(vals)}


def median_round(results: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The round whose ``key`` (jobs_per_s, or the latency percentile p50) is the median, with the spread of
    jobs/s and latency p50/p99 over all rounds beside its own figures."""
    def value(res: dict[str, Any]) -> float:
        return res.get("jobs_per_s", 0.0) if key == "jobs_per_s" else res.get("latency_ms", {}).get(key, float("inf"))

    chosen = sorted(results, key=value)[(len(results) - 1) // 2]
    lat = [r.get("latency_ms", {}) for r in results]
    return {**chosen, "spread": {"rounds": [r.get("round") for r in results],
                                 "jobs_per_s": spread([r.get("jobs_per_s") for r in results]),
                                 "p50_ms": spread([x.get("p50") for x in lat]), "p99_ms": spread([x.get("p99") for x in lat])}}


COMPACT_KEYS = ("round", "ok", "errors", "jobs_per_s", "duration_s", "latency_ms", "cpu_ms_per_job", "attempts",
                "output_matches_reference", "mean_batch_size_per_job", "loadgen_cpu_s")


def compact(res: dict[str, Any]) -> dict[str, Any]:
    """The figures of one round worth keeping beside the median round's full record."""
    out = {k: res[k] for k in COMPACT_KEYS if k in res}
    out["machine_busy_pct"] = res.get("cpu", {}).get("machine_busy_pct")
    return out


def range_text(sp: dict[str, float] | None, fmt: str = "{:,.0f}") -> str:
    """``245 (230-260)``: the median and the range of the rounds."""
    if not sp:
        return "-"
    if sp["n"] == 1:
        return fmt.format(sp["median"])
    return f"{fmt.format(sp['median'])} ({fmt.format(sp['min'])}\u2013{fmt.format(sp['max'])})"


def summarize(model: dict[str, Any]) -> dict[str, Any]:
    """The figures the issue asks for, from one model's phases."""
    phases = model.get("phases", {})
    raw_best = _get(model, "raw", "best_samples_per_s")
    raw_p50 = _get(model, "raw", "single_latency_ms", "p50")
    http = _get(phases, "inferq_http_load", "jobs_per_s")
    amqp = _get(phases, "inferq_amqp_load", "jobs_per_s")
    celery = _get(phases, "celery_load", "jobs_per_s")
    out: dict[str, Any] = {
        "raw_best_samples_per_s": raw_best,
        "raw_best_batch": _get(model, "raw", "best_batch"),
        "raw_inference_ms": raw_p50,
        "inferq_http_jobs_per_s": http,
        "inferq_amqp_jobs_per_s": amqp,
        "celery_jobs_per_s": celery,
        "ratio_http_vs_celery": _ratio(http, celery),
        "ratio_amqp_vs_celery": _ratio(amqp, celery),
        "ratio_http_vs_raw": _ratio(http, raw_best),
        "ratio_amqp_vs_raw": _ratio(amqp, raw_best),
        "ratio_celery_vs_raw": _ratio(celery, raw_best),
    }
    for name in ("inferq_http_low", "inferq_amqp_low", "celery_low"):
        lat = _get(phases, name, "latency_ms")
        if lat and raw_p50 is not None:
            out[f"{name}_p50_minus_raw_ms"] = round(lat["p50"] - raw_p50, 3)
            out[f"{name}_p99_minus_raw_ms"] = round(lat["p99"] - raw_p50, 3)
    for name in ("inferq_http_load", "inferq_amqp_load"):
        out[f"{name}_mean_batch_per_job"] = _get(phases, name, "mean_batch_size_per_job")
        out[f"{name}_mean_batch_per_batch"] = _get(phases, name, "worker_stats", "mean_batch_per_batch")
    for name in ("inferq_http_load", "inferq_amqp_load", "celery_load"):
        out[f"{name}_cpu_ms_per_job"] = _get(phases, name, "cpu_ms_per_job")
    for prefix, _ in systems_of(phases):
        load = _get(phases, f"{prefix}_load", "spread", "jobs_per_s")
        low = _get(phases, f"{prefix}_low", "spread", "p50_ms")
        if load:
            out.setdefault("systems", {})[prefix] = {
                "jobs_per_s": load, "low_load_p50_ms": low,
                "cpu_ms_per_job": _get(phases, f"{prefix}_load", "cpu_ms_per_job"),
                "http_over_it": None if prefix.startswith("inferq") else _ratio(http, load["median"])}
    return out


def targets(result: dict[str, Any]) -> list[tuple[str, float | None, str, bool | None]]:
    """(what, value, target text, met?) for every target the run has data for."""
    rows: list[tuple[str, float | None, str, bool | None]] = []
    summary = result.get("summary", {})
    if "mlp" in summary:
        v = summary["mlp"].get("ratio_http_vs_celery")
        rows.append(("mlp: inferq HTTP jobs/s / Celery jobs/s", v, f">= {TARGET_MLP_VS_CELERY:g}x", None if v is None else v >= TARGET_MLP_VS_CELERY))
    if "cnn" in summary:
        v = summary["cnn"].get("ratio_http_vs_raw")
        rows.append(("cnn: inferq HTTP jobs/s / raw ORT best samples/s", v, f">= {TARGET_CNN_VS_RAW:.2f}", None if v is None else v >= TARGET_CNN_VS_RAW))
    for model, s in summary.items():
        p50, p99 = s.get("inferq_http_low_p50_minus_raw_ms"), s.get("inferq_http_low_p99_minus_raw_ms")
        rows.append((f"{model}: low-load HTTP p50 - raw inference (ms)", p50, f"<= {TARGET_LOW_P50_MS:g}", None if p50 is None else p50 <= TARGET_LOW_P50_MS))
        rows.append((f"{model}: low-load HTTP p99 - raw inference (ms)", p99, f"<= {TARGET_LOW_P99_MS:g}", None if p99 is None else p99 <= TARGET_LOW_P99_MS))
    return rows


def _f(v: Any, fmt: str = "{:,.0f}", none: str = "-") -> str:
    return none if v is None else fmt.format(v)


def _pct(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1%}" if v >= 0.01 else f"{v:.3%}"


def table(result: dict[str, Any]) -> str:
    """The human summary: throughput and ratios, low-load latency, batching, CPU per job, targets."""
    lines = [f"\ninferq bench {result.get('run_id')}  ({result.get('status')}; {result['meta'].get('cpus')} CPUs, "
             f"load avg at start {', '.join(f'{x:.2f}' for x in result['meta'].get('loadavg_at_start', ()))})", ""]
    hdr = f"{'model':<12}{'raw best/s (bs)':>20}{'raw ms':>9}{'http jobs/s':>13}{'amqp jobs/s':>13}{'celery/s':>10}" \
          f"{'http/celery':>13}{'amqp/celery':>13}{'http/raw':>10}"
    lines += [hdr, "-" * len(hdr)]
    for model, s in result.get("summary", {}).items():
        raw_txt = f"{_f(s.get('raw_best_samples_per_s'))} ({_f(s.get('raw_best_batch'), '{}')})" if s.get("raw_best_samples_per_s") else "-"
        lines.append(
            f"{model:<12}{raw_txt:>20}{_f(s.get('raw_inference_ms'), '{:.3f}'):>9}{_f(s.get('inferq_http_jobs_per_s')):>13}"
            f"{_f(s.get('inferq_amqp_jobs_per_s')):>13}{_f(s.get('celery_jobs_per_s')):>10}"
            f"{_f(s.get('ratio_http_vs_celery'), '{:.2f}x'):>13}{_f(s.get('ratio_amqp_vs_celery'), '{:.2f}x'):>13}"
            f"{_pct(s.get('ratio_http_vs_raw')):>10}"
        )
    lines += ["", f"{'low load (1 in flight), ms over raw inference':<48}{'p50':>9}{'p99':>9}   {'batch/job (load)':>17}{'batch/batch':>12}"]
    for model, s in result.get("summary", {}).items():
        for path, label in (("inferq_http", "inferq http"), ("inferq_amqp", "inferq amqp"), ("celery", "celery")):
            p50, p99 = s.get(f"{path}_low_p50_minus_raw_ms"), s.get(f"{path}_low_p99_minus_raw_ms")
            if p50 is None:
                continue
            bj = s.get(f"{path}_load_mean_batch_per_job")
            bb = s.get(f"{path}_load_mean_batch_per_batch")
            lines.append(f"  {model + ' ' + label:<46}{p50:>+9.2f}{p99:>+9.2f}   {_f(bj, '{:.2f}'):>17}{_f(bb, '{:.2f}'):>12}")
    lines += ["", f"{'CPU ms per job under load':<34}{'edge':>8}{'worker':>8}{'broker':>8}{'loadgen':>9}{'total':>8}   machine busy (others)"]
    for model, data in result.get("models", {}).items():
        for name in ("inferq_http_load", "inferq_amqp_load", "celery_load"):
            phase = data.get("phases", {}).get(name)
            if not phase:
                continue
            c = phase.get("cpu_ms_per_job", {})
            lines.append(f"  {model + ' ' + name.replace('_load', '').replace('_', ' '):<32}{_f(c.get('edge'), '{:.3f}'):>8}"
                         f"{_f(c.get('worker'), '{:.3f}'):>8}{_f(c.get('broker'), '{:.3f}'):>8}{_f(c.get('loadgen'), '{:.3f}'):>9}"
                         f"{_f(c.get('total'), '{:.3f}'):>8}   {phase['cpu']['machine_busy_pct']}% ({phase['cpu'].get('foreign_busy_pct', '?')}%)")
    for model, s in result.get("summary", {}).items():
        if not s.get("systems"):
            continue
        lines += ["", f"{model}: median of {result['meta'].get('options', {}).get('rounds', '?')} interleaved rounds (min-max)",
                  f"  {'system':<50}{'jobs/s':>22}{'low-load p50 ms':>24}{'inferq HTTP / it':>18}{'CPU ms/job':>12}"]
        for prefix, label in systems_of(result.get("models", {}).get(model, {}).get("phases", {})):
            row = s["systems"].get(prefix)
            if row:
                lines.append(f"  {label:<50}{range_text(row['jobs_per_s']):>22}{range_text(row['low_load_p50_ms'], '{:.2f}'):>24}"
                             f"{_f(row['http_over_it'], '{:.2f}x'):>18}{_f((row['cpu_ms_per_job'] or {}).get('total'), '{:.2f}'):>12}")
    rows = targets(result)
    if rows:
        lines += ["", "targets:"]
        for what, value, target, ok in rows:
            verdict = "n/a" if ok is None else ("MET" if ok else "MISSED")
            lines.append(f"  {what:<52}{_f(value, '{:.3f}'):>10}  {target:<9} {verdict}")
    return "\n".join(lines) + "\n"
