"""The run report: one self-contained HTML file (charts embedded as base64 PNGs) built from the run folder.

It reads only the ledger — metrics.jsonl, eval/*.json, data/data_report.json, run.json, job.yaml — so it works
for any run wherever it trained, and imports neither torch nor Ray (matplotlib draws off-screen with Agg).
"""
from __future__ import annotations

import base64
import io
from pathlib import Path

from tunerun.cluster.run_folder import (JOB, REPORT, RUN_INFO, EvalRecords, TrainRow, data_report, eval_records,
                                        metric_rows, read_job)
from tunerun.cluster.runs import RunInfo, read_info
from tunerun.jobs.metrics import EVAL_SET, SCORES, format_value, lower_is_better

TEMPLATE = Path(__file__).with_name("report.html.j2")


def build_report(run) -> tuple[str, dict[str, bytes]]:
    """(the HTML page, {chart name: PNG bytes})."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    info = read_info(run) if run.exists(RUN_INFO) else RunInfo()
    spec = read_job(run).spec.model_dump(mode="json") if run.exists(JOB) else {}
    records = eval_records(run)
    final = records.final
    charts = _charts(metric_rows(run).train, records)
    env = Environment(loader=FileSystemLoader(TEMPLATE.parent), autoescape=select_autoescape(["j2", "html"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = _fmt
    page = env.get_template(TEMPLATE.name).render(
        run_id=run.run_id, info=info.to_json(), spec=spec,
        charts={name: base64.b64encode(png).decode("ascii") for name, png in charts.items()},
        comparison=_comparison(records.base, final), general=_general(records.base, final),
        per_eval=_per_eval(records), examples=_side_by_side(records.base, final),
        gates=info.gates or (final or {}).get("gates"), data=_data_report(run),
        on_demand=records.on_demand, final_step=(final or {}).get("step"), exports=records.export_checks)
    return page, charts


def write_report(run) -> str:
    """Write ``report.html`` (and the charts as ``report/<name>.png``) into the run folder; returns its URI."""
    import tempfile

    page, charts = build_report(run)
    with tempfile.TemporaryDirectory(prefix="tunerun-report-") as tmp:
        for name, png in charts.items():
            path = Path(tmp) / f"{name}.png"
            path.write_bytes(png)
            run.upload(path, f"report/{name}.png")
    run.write_text(REPORT, page)
    return run.uri(REPORT)


# ── tables ──────────────────────────────────────────────────────────────────────────────────────────────────


def _numeric(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "generated"}


def _comparison(base: dict | None, final: dict | None) -> list[dict]:
    """Rows of metric, base, tuned, change; lower is better for loss, perplexity and forgetting."""
    if final is None:
        return []
    before = _numeric((base or {}).get("metrics", {}))
    rows = []
    for name, after in _numeric(final["metrics"]).items():
        if name.startswith("forgetting"):
            continue
        b = before.get(name)
        better = None if b is None or after == b else (after < b if lower_is_better(name) else after > b)
        rows.append({"metric": name, "base": b, "tuned": after, "delta": None if b is None else after - b,
                     "better": better})
    return rows


def _general(base: dict | None, final: dict | None) -> dict | None:
    if not base or not final or "general" not in base or "general" not in final:
        return None
    rows = [{"metric": k, "base": v, "tuned": final["general"].get(k)} for k, v in _numeric(base["general"]).items()]
    return {"rows": rows, "drop": final["metrics"].get("forgetting_drop"),
            "flagged": final["metrics"].get("forgetting_flagged")}


def _per_eval(records: EvalRecords) -> dict:
    rows = ([records.base] if records.base else []) + records.steps
    names = [n for n in EVAL_SET
             if any(n in r["metrics"] and r["metrics"][n] is not None for r in rows)]
    return {"names": names, "rows": [{"label": "base" if r.get("base") else f"step {r['step']}",
                                      "values": [r["metrics"].get(n) for n in names]} for r in rows]}


def _side_by_side(base: dict | None, final: dict | None) -> list[dict]:
    if final is None:
        return []
    before = {e["index"]: e["output"] for e in (base or {}).get("examples", [])}
    return [{**e, "base_output": before.get(e["index"])} for e in final.get("examples", [])]


def _data_report(run) -> list[tuple[str, object]]:
    r = data_report(run)
    if r is None:
        return []
    rows = []
    for key, value in r.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items()) or "–"
        elif isinstance(value, list):
            value = ", ".join(map(str, value[:10])) or "–"
        rows.append((key.replace("_", " "), value))
    return rows


def _fmt(value) -> str:
    """`format_value`, with yes/no for flags and thousands separators for large numbers (data-report counts)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and abs(value) >= 1000:
        return f"{value:,.1f}"
    return format_value(value)


# ── charts ──────────────────────────────────────────────────────────────────────────────────────────────────


def _charts(train: list[TrainRow], records: EvalRecords) -> dict[str, bytes]:
    # Held-out points come from the eval records: the final one exists before its metrics.jsonl row does.
    rows = ([records.base] if records.base else []) + records.steps
    evals = [(r["step"], r["metrics"]["loss"]) for r in rows if r["metrics"].get("loss") is not None]
    charts = {}
    if train or evals:
        charts["loss"] = _plot("Loss", "step", [
            ("train loss", [m.step for m in train], [m.loss for m in train], "-"),
            ("held-out loss", [e[0] for e in evals], [e[1] for e in evals], "o-")], log_y=True)
    if any(m.lr is not None for m in train):
        charts["learning_rate"] = _plot("Learning rate", "step", [
            ("lr", [m.step for m in train if m.lr is not None], [m.lr for m in train if m.lr is not None], "-")])
    series = []
    for name in SCORES:
        points = [(r["step"], r["metrics"][name]) for r in rows if r["metrics"].get(name) is not None]
        if points:
            series.append((name, [p[0] for p in points], [p[1] for p in points], "o-"))
    if series:
        charts["eval_metrics"] = _plot("Held-out generation metrics (step 0 = base model)", "step", series,
                                       y_range=(-0.02, 1.02))
    return charts


def _plot(title: str, xlabel: str, series: list, log_y: bool = False, y_range=None) -> bytes:
    # Figure() without pyplot: no global state, the Agg canvas, safe off-screen and inside workers.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 3.6), dpi=100, layout="constrained")
    axes = figure.subplots()
    for label, xs, ys, style in series:
        axes.plot(xs, ys, style, label=label, markersize=4)
    if log_y and all(y > 0 for _, _, ys, _ in series for y in ys):
        axes.set_yscale("log")
    if y_range:
        axes.set_ylim(*y_range)
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
