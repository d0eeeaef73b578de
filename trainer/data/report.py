"""The data report for people: ``data_report.png`` (matplotlib) and ``data_report.html`` (one self-contained
file, the PNG inlined), beside ``data_report.json``. Counts only: PII appears as hits per type, never as the
values that were masked.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path


def kept_records(report: dict) -> int:
    return report["records_read"] - sum(n for _, n in steps(report))


def pii_label(kind: str) -> str:
    """How a PII kind of the report reads: "iban_checksum_failed" → "iban, checksum failed"."""
    return "iban, checksum failed" if kind == "iban_checksum_failed" else kind


def steps(report: dict) -> list[tuple[str, int]]:
    """(cleaning step, records it removed), in pipeline order (mirrors `DataReport.steps`)."""
    # Only preference pairs can have equal answers (and reports written before them have no count): shown when some
    pairs = [("equal answers", report["equal_answers"])] if report.get("equal_answers") else []
    return [("malformed", report["malformed"]), ("empty", report["empty"]), *pairs,
            ("duplicates", report["duplicates"]),
            ("near-duplicates", report["near_duplicates"]), ("fuzzy duplicates", report["fuzzy_duplicates"]),
            ("too long", report["too_long_dropped"])]


def write_report_files(report: dict, folder: Path, title: str) -> None:
    from tunerun.cluster.run_folder import DATA_REPORT_PAGES

    html, png = DATA_REPORT_PAGES
    image = render_png(report, title)
    (Path(folder) / png).write_bytes(image)
    (Path(folder) / html).write_text(render_html(report, image, title), encoding="utf-8")


def render_png(report: dict, title: str) -> bytes:
    """Three panels: token-length histogram, records removed per cleaning step, PII hits per type."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 4), layout="constrained")  # no pyplot: no global state, no GUI backend
    FigureCanvasAgg(figure)
    lengths, removed, pii = figure.subplots(1, 3, width_ratios=[1.3, 1, 1])
    histogram = report.get("length_histogram") or {}
    edges, counts = histogram.get("edges", []), histogram.get("counts", [])
    if counts:
        widths = [b - a for a, b in zip(edges, edges[1:])]
        lengths.bar(edges[:-1], counts, width=widths, align="edge", color="#4c72b0", edgecolor="white")
    lengths.set(title="token length per example", xlabel="tokens", ylabel="examples")
    names = [name for name, _ in steps(report)] + ["kept"]
    values = [n for _, n in steps(report)] + [kept_records(report)]
    bars = removed.barh(names[::-1], values[::-1], color=["#55a868"] + ["#c44e52"] * (len(names) - 1))
    removed.bar_label(bars, padding=3)
    removed.margins(x=0.15)  # room for the label of the longest bar
    removed.set(title=f"records: {report['records_read']:,} read", xlabel="records")
    kinds = sorted(report.get("pii_masked", {}).items(), key=lambda kv: -kv[1])
    if kinds:
        bars = pii.barh([pii_label(k) for k, _ in kinds][::-1], [n for _, n in kinds][::-1], color="#8172b2")
        pii.bar_label(bars, padding=3)
        pii.margins(x=0.15)
        pii.set(title="PII masked (hits per type)", xlabel="hits")
    else:
        pii.set_axis_off()
        pii.set_title("PII masking off")
    figure.suptitle(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def render_html(report: dict, png: bytes, title: str) -> str:
    esc = html.escape
    rows = "".join(f"<tr><td>{esc(name)}</td><td>{n:,}</td></tr>" for name, n in steps(report))
    stats = report.get("token_lengths") or {}
    pii = "".join(f"<tr><td>{esc(pii_label(kind))}</td><td>{n:,}</td></tr>"
                  for kind, n in report.get("pii_masked", {}).items())
    malformed = report.get("malformed_examples", [])
    problems = "".join(f"<li><code>{esc(p)}</code></li>" for p in malformed)
    lengths = "".join(f"<tr><td>{k}</td><td>{stats[k]:,}</td></tr>" for k in ("min", "mean", "p50", "p95", "max")
                      if k in stats)
    image = base64.b64encode(png).decode()
    packing = (f"<p>packed into {report['packed_rows']:,} rows ({report['packing_efficiency']:.0%} of the tokens "
               "are real, the rest padding)</p>" if report.get("packed_rows") else "")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse;
margin:0 2em 1em 0;display:inline-table;vertical-align:top}} td,th{{border:1px solid #ccc;padding:.25em .6em;
text-align:left}} td:last-child{{text-align:right}} img{{max-width:100%}}</style></head><body>
<h1>{esc(title)}</h1>
<p>{esc(", ".join(report.get("files", [])))} · format {esc(report.get("format", ""))}</p>
<p><b>{report["records_read"]:,}</b> records read → <b>{kept_records(report):,}</b> kept →
<b>{report["train_records"]:,}</b> train, <b>{report["eval_records"]:,}</b> eval
(eval examples that copy a training example: {report["contaminated_eval"]:,});
truncated to the length limit: {report["truncated"]:,}</p>
{packing}
<table><tr><th>removed by</th><th>records</th></tr>{rows}</table>
<table><tr><th>tokens per example</th><th></th></tr>{lengths}</table>
<table><tr><th>PII masked</th><th>hits</th></tr>{pii or "<tr><td>masking off</td><td></td></tr>"}</table>
<p><img alt="token lengths, cleaning steps and PII hits" src="data:image/png;base64,{image}"></p>
{f"<h2>Malformed records (first {len(malformed)})</h2><ul>{problems}</ul>" if problems else ""}
</body></html>
"""
