"""The evaluation report: one self-contained HTML page (+ the PNG figures) per evaluation run.

``write_report(evaluations, out_uri)`` writes

    <out_uri>/report.html                    everything inline: CSS, images as PNG data URIs;
                                             no JavaScript, no external asset, no external link
    <out_uri>/figures/summary.png            per-product metric dot plot
    <out_uri>/figures/<product>_curves.png   pixel ROC | PRO up to FPR 0.3 (area shaded)
    <out_uri>/figures/<product>_histogram.png  image scores, normal vs anomalous, threshold line
    <out_uri>/figures/<product>_examples.png   image | ground truth | heat map, per example

through :mod:`prn_ray.storage` (local path or ``s3://``); ``report.html`` is written last, so its
presence means the figures are complete. ``markdown_table`` and ``results_json`` give the same
numbers for a terminal, a pull request or automation.

Conventions
-----------
* Decision rule (as calibrated in :mod:`prn_ray.training`): an image is flagged anomalous iff
  ``score > threshold``. FP = normal flagged, FN = anomalous not flagged.
* Table numbers: AUROC / AUPRO / AP as percentages with one decimal (as in the PRN paper), ms per
  image with one decimal, ``n/a`` where a metric is undefined. The mean row is the plain mean
  over the products where the metric is defined; a ``*`` marks a mean that left products out.
* Heat maps use a fixed 0..1 colour scale (never normalised per image, which would make every
  normal image look anomalous).
* Plotting uses matplotlib's object API (``Figure`` + the Agg canvas), never ``pyplot``: no GUI
  backend is needed, the process-wide backend of the caller (e.g. a notebook) is left alone, and
  figures are not registered in a global figure manager, so nothing accumulates across products.
"""

from __future__ import annotations

import html
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np

from prn_ray import storage
from prn_ray.config import StorageConfig
from prn_ray.report.figures import (
    colourbar_png,
    curves_png,
    data_uri,
    fmt_score,
    grid_png,
    histogram_png,
    panels,
    png,
    summary_png,
    verdict,
)
from prn_ray.report.tables import (
    DEFAULT_TITLE,
    KIND,
    METRIC_COLUMNS,
    NA,
    ExampleImage,
    ProductEvaluation,
    defect_rows,
    format_metric,
    mean_cells,
    mean_metrics,
    select_examples,
    size_text,
)

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
 margin:0;background:#f5f6f8;color:#1d2330;line-height:1.4}
main{max-width:1280px;margin:0 auto;padding:24px}
header{background:#1d2330;color:#fff;padding:20px 24px}
header h1{margin:0 0 4px;font-size:1.5em}
header .date{opacity:.75;font-size:.9em}
.meta{display:flex;flex-wrap:wrap;gap:6px 8px;margin-top:12px}
.meta span{background:rgba(255,255,255,.12);border-radius:4px;padding:2px 8px;font-size:.85em}
.meta b{font-weight:600;opacity:.8}
.warn{background:#fff3cd;border:1px solid #e0c36a;border-radius:6px;padding:8px 12px;
 margin:12px 0;color:#5c4500}
section{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.08);
 padding:16px 20px;margin:20px 0}
h2{margin:0 0 8px;font-size:1.25em} h3{margin:16px 0 6px;font-size:1.05em}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:5px 10px;border-bottom:1px solid #e3e6ea;text-align:right;font-size:.92em}
th{background:#f0f2f5;font-weight:600} td.name,th.name{text-align:left}
tr.mean td{font-weight:700;border-top:2px solid #1d2330}
a{color:#1f5fbf;text-decoration:none}
.figs{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.figs img,.pair img{max-width:100%;height:auto;border:1px solid #eceef1;border-radius:4px}
.pair{display:grid;grid-template-columns:8fr 5.2fr;gap:12px;align-items:start}
.pair img{width:100%}
@media (max-width:900px){.pair{grid-template-columns:1fr}}
.facts{display:flex;flex-wrap:wrap;gap:8px;margin:6px 0 10px}
.fact{background:#f0f2f5;border-radius:6px;padding:4px 10px;font-size:.88em}
.fact b{font-size:1.05em}
.bar{display:inline-block;height:8px;background:#d8dde4;border-radius:4px;width:80px;
 vertical-align:middle;margin-right:6px;overflow:hidden}
.bar i{display:block;height:100%;background:#3a7bd5}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(440px,1fr));gap:12px}
.card{border:1px solid #e3e6ea;border-radius:6px;padding:6px;background:#fafbfc}
.card.bad{border-color:#e38b8b;background:#fff6f6}
.card img{width:100%;height:auto;image-rendering:auto;display:block}
.cap{font-size:.84em;margin-top:4px;display:flex;flex-wrap:wrap;gap:4px 10px}
.badge{border-radius:3px;padding:0 6px;font-weight:700;font-size:.85em;color:#fff}
.ok{background:#2e8b57} .ko{background:#c0392b} .nt{background:#7f8c8d}
.cols{display:grid;grid-template-columns:1fr 1fr 1fr;font-size:.75em;color:#667;
 text-align:center}
.muted{color:#667;font-size:.85em}
.cbar{display:inline-flex;align-items:center;gap:6px;font-size:.8em;color:#667}
footer{color:#667;font-size:.8em;padding:0 24px 24px;max-width:1280px;margin:0 auto}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _img_tag(png: bytes, alt: str, width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    return f'<img src="{data_uri(png)}" alt="{_e(alt)}"{w}>'


def _cell_style(key: str, value: float) -> str:
    if KIND.get(key) != "pct" or not math.isfinite(value):
        return ""
    hue = 120.0 * float(np.clip((value - 0.5) / 0.5, 0.0, 1.0))  # 50 % red .. 100 % green
    return f' style="background:hsl({hue:.0f},62%,90%)"'


def _anchor(i: int, product: str) -> str:
    return f"p{i}-" + re.sub(r"[^A-Za-z0-9_-]+", "-", product)[:40]


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out += _flatten(v, key + ".")
        else:
            out.append((key, v))
    return out


def _meta_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v)
    return str(v)


def _results_table(evaluations: Sequence[ProductEvaluation]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for _, h, _ in METRIC_COLUMNS)
    rows = [f'<tr><th class="name">Product</th>{head}</tr>']
    for i, e in enumerate(evaluations):
        cells = "".join(
            f"<td{_cell_style(k, e.metric(k))}>{format_metric(k, e.metric(k))}</td>"
            for k, _, _ in METRIC_COLUMNS
        )
        rows.append(f'<tr><td class="name"><a href="#{_anchor(i, e.product)}">'
                    f"{_e(e.product)}</a></td>{cells}</tr>")
    means = mean_metrics(evaluations)
    cells = "".join(
        f"<td{_cell_style(k, means[k][0])}>{c}</td>"
        for (k, _, _), c in zip(METRIC_COLUMNS, mean_cells(evaluations))
    )
    rows.append(f'<tr class="mean"><td class="name">Mean</td>{cells}</tr>')
    return "<table>" + "".join(rows) + "</table>"


def _defect_table(e: ProductEvaluation) -> str:
    rows = ['<tr><th class="name">test images</th><th>n</th><th>flagged (score &gt; thr)</th>'
            "<th>mean score</th><th>image AUROC vs normals (%)</th></tr>"]
    for r in defect_rows(e):
        kind = "anomalous" if r["anomalous"] else "normal"
        if r["flagged"] is None:
            flagged = NA
        else:
            rate = r["flagged"] / r["n"] if r["n"] else 0.0
            colour = "#3a7bd5" if r["anomalous"] else "#c0392b"
            flagged = (f'<span class="bar"><i style="width:{100 * rate:.0f}%;'
                       f'background:{colour}"></i></span>{r["flagged"]}/{r["n"]}')
        auc = r["image_auroc_vs_normal"]
        rows.append(
            f'<tr><td class="name">{_e(r["defect_type"])} <span class="muted">({kind})</span>'
            f'</td><td>{r["n"]}</td><td>{flagged}</td><td>{fmt_score(r["mean_score"])}</td>'
            f'<td>{format_metric("image_auroc", auc) if auc is not None else "—"}</td></tr>'
        )
    return "<table>" + "".join(rows) + "</table>"


_COLS = ('<div class="cols"><span>image</span><span>ground truth</span>'
         "<span>anomaly map</span></div>")
_GROUPS = (
    ("FN", "Missed anomalies (false negatives)"),
    ("FP", "False alarms (false positives)"),
    ("TP", "Detected anomalies"),
    ("TN", "Correctly passed normals"),
    ("", "Examples"),
)


def _example_cards(
    e: ProductEvaluation, examples: list[ExampleImage], thumb_px: int, cmap: str, alpha: float
) -> tuple[str, bytes | None]:
    """(HTML of the grouped cards, PNG of the whole grid)."""
    if not examples:
        return '<p class="muted">No example images were provided.</p>', None
    rendered = []
    for ex in examples:
        code, words, correct = verdict(ex, e.threshold)
        rendered.append((ex, code, words, correct, panels(ex, thumb_px, cmap, alpha)))
    order = {code: i for i, (code, _) in enumerate(_GROUPS)}
    # worst first inside each group: FN lowest score first, FP highest first, etc.
    sign = {"FN": 1, "FP": -1, "TP": -1, "TN": 1, "": -1}
    rendered.sort(key=lambda r: (order[r[1]], sign[r[1]] * float(r[0].score)))
    parts, grid_cards = [], []
    thr = "" if e.threshold is None else f" (thr {fmt_score(e.threshold)})"
    for code, title in _GROUPS:
        group = [r for r in rendered if r[1] == code]
        if not group:
            continue
        parts.append(f'<h3>{_e(title)} · {len(group)}</h3><div class="grid">')
        for ex, c, words, correct, picture in group:
            label = "anomalous" if ex.label else "normal"
            dt = ex.defect_type or ("good" if not ex.label else "")
            badge_cls = "nt" if correct is None else ("ok" if correct else "ko")
            mark = "" if correct is None else ("✓ " if correct else "✗ ")
            name = ex.name or ""
            short = name if len(name) <= 48 else "…" + name[-47:]
            alt = f"{e.product} {name} {label} {dt} score {fmt_score(ex.score)}"
            parts.append(
                f'<div class="card{" bad" if correct is False else ""}">{_COLS}'
                f"{_img_tag(png(picture), alt)}"
                f'<div class="cap"><span class="badge {badge_cls}">{mark}{_e(words)}</span>'
                f"<span>score <b>{fmt_score(ex.score)}</b>{_e(thr)}</span>"
                f"<span>{_e(label)}{' · ' + _e(dt) if dt else ''}</span>"
                f'<span class="muted" title="{_e(name)}">{_e(short)}</span></div></div>'
            )
            grid_cards.append((picture, f"{c or '-'} {words} | score {fmt_score(ex.score)}{thr}"
                                       f" | {label}{'/' + dt if dt else ''} | {name}"))
        parts.append("</div>")
    return "".join(parts), grid_png(grid_cards)


def _figure_names(evaluations: Sequence[ProductEvaluation]) -> list[str]:
    """File-name stems, unique and filesystem/S3 safe."""
    out, used = [], set()
    for e in evaluations:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", e.product).strip("._") or "product"
        base, k = stem, 2
        while stem.lower() in used:
            stem, k = f"{base}_{k}", k + 1
        used.add(stem.lower())
        out.append(stem)
    return out


def _report_examples(e: ProductEvaluation, max_examples: int) -> list[ExampleImage]:
    """The product's examples, cut down to ``max_examples`` covering the four outcomes."""
    examples = list(e.examples)
    if len(examples) > max_examples:
        keep = select_examples([x.score for x in examples], [x.label for x in examples],
                               max_examples)
        examples = [examples[j] for j in keep]
    return examples


def _product_facts(e: ProductEvaluation, d: Mapping[str, Any]) -> str:
    """The fact chips of a product section: test set, model, threshold outcome, run info."""
    facts = [("test images", f"{d['n_images']} ({d['n_normal']} normal, "
                             f"{d['n_anomalous']} anomalous)")]
    if e.model_version:
        facts.append(("model", e.model_version))
    if e.image_size is not None:
        facts.append(("image size", size_text(e.image_size)))
    if e.threshold is not None:
        facts.append(("threshold", fmt_score(e.threshold)))
        facts.append(("false alarms", f"{d['fp']}/{d['n_normal']}"))
        facts.append(("misses", f"{d['fn']}/{d['n_anomalous']}"))
    facts += [(k, storage.redact(_meta_value(v))) for k, v in _flatten(e.info)]
    return "".join(f'<span class="fact">{_e(k)}: <b>{_e(v)}</b></span>' for k, v in facts)


def _product_section(
    i: int,
    e: ProductEvaluation,
    stem: str,
    save: Callable[[str, bytes], None],
    cbar: str,
    max_examples: int,
    thumb_px: int,
    cmap: str,
    alpha: float,
) -> str:
    """One product's section; saves its curves, histogram and example-grid figures."""
    curves, hist = curves_png(e), histogram_png(e)
    save(f"{stem}_curves.png", curves)
    save(f"{stem}_histogram.png", hist)
    examples = _report_examples(e, max_examples)
    cards, grid = _example_cards(e, examples, thumb_px, cmap, alpha)
    if grid is not None:
        save(f"{stem}_examples.png", grid)
    d = e.decisions()
    metric_facts = "".join(
        f'<span class="fact">{_e(h)}: <b>{format_metric(k, e.metric(k))}</b></span>'
        for k, h, _ in METRIC_COLUMNS
    )
    fpfn = ("" if e.threshold is None else
            f" At the threshold {_e(fmt_score(e.threshold))}: {d['fp']} false alarm(s) "
            f"among {d['n_normal']} normal and {d['fn']} miss(es) among "
            f"{d['n_anomalous']} anomalous test images.")
    return (
        f'<section id="{_anchor(i, e.product)}"><h2>{_e(e.product)}</h2>'
        f'<div class="facts">{_product_facts(e, d)}</div>'
        f'<div class="facts">{metric_facts}</div>'
        f'<div class="pair">{_img_tag(curves, f"{e.product} pixel ROC and PRO curves")}'
        f'{_img_tag(hist, f"{e.product} image score histogram")}</div>'
        f'<p class="muted">Pixel ROC: all test pixels pooled. PRO: mean per-region overlap '
        f"up to a pixel FPR of 0.3; AUPRO is the shaded area divided by 0.3. Histogram: "
        f"image scores of the normal vs the anomalous test images.{fpfn}</p>"
        f"<h3>Per defect type</h3>{_defect_table(e)}"
        f'<h3>Examples</h3><p class="cbar">anomaly map 0 '
        f"{cbar} 1 "
        f"(fixed scale, not normalised per image; red contour = ground truth)</p>"
        f"{cards}</section>"
    )


def _header(title: str, generated: str, n_products: int, meta_items: list[tuple[str, str]]) -> str:
    meta_html = "".join(f"<span><b>{_e(k)}</b> {_e(v)}</span>" for k, v in meta_items)
    return (
        f"<header><h1>{_e(title)}</h1><div class=\"date\">generated {generated} · "
        f"{n_products} product(s)</div><div class=\"meta\">{meta_html}</div></header>"
    )


def _weights_warning(meta_items: list[tuple[str, str]]) -> str:
    """A banner when the run used random backbone weights (its numbers mean nothing)."""
    weights = {v.strip().lower() for k, v in meta_items if k.split(".")[-1] == "weights"}
    if "none" not in weights:
        return ""
    return ('<div class="warn"><b>Random backbone weights</b> (weights = none): this run '
            "is a smoke test; its numbers say nothing about detection quality.</div>")


def _results_section(evaluations: Sequence[ProductEvaluation], summary: bytes) -> str:
    return (
        f"<section><h2>Results</h2>{_results_table(evaluations)}"
        '<p class="muted">Percentages with one decimal. Image AUROC: image scores vs labels. '
        "Pixel AUROC and pixel AP: all test pixels pooled. AUPRO@0.3: normalised area under "
        "the per-region-overlap curve up to a pixel false-positive rate of 0.3 (MVTec AD "
        "definition). ms/image: inference time per image. Mean: plain mean over the products "
        "(* = over the products where the metric is defined).</p>"
        f'<div class="figs">{_img_tag(summary, "metrics per product")}</div></section>'
    )


def write_report(
    evaluations: Sequence[ProductEvaluation],
    out_uri: str,
    storage_cfg: StorageConfig | None = None,
    title: str = DEFAULT_TITLE,
    meta: Mapping[str, Any] | None = None,
    *,
    max_examples: int = 16,
    thumb_px: int = 192,
    cmap: str = "jet",
    alpha: float = 0.45,
) -> str:
    """Write ``<out_uri>/report.html`` (self-contained) and ``<out_uri>/figures/*.png``.

    ``meta``: run information for the header (backbone, weights, seen anomalies, config
    highlights; nested dicts are flattened to dotted keys; values pass through
    :func:`prn_ray.storage.redact`). ``thumb_px``: largest side of each example panel in the
    report (bounds the HTML size). Returns the URI of ``report.html``.
    """
    evaluations = list(evaluations)
    if not evaluations:
        raise ValueError("write_report needs at least one ProductEvaluation")
    t0 = time.perf_counter()
    fig_dir = storage.join(out_uri, "figures")
    stems = _figure_names(evaluations)

    def save(name: str, png: bytes) -> None:
        storage.write_bytes(storage.join(fig_dir, name), png, storage_cfg)

    meta_items = [(k, storage.redact(_meta_value(v))) for k, v in _flatten(meta or {})]
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    summary = summary_png(evaluations)
    save("summary.png", summary)
    cbar = _img_tag(colourbar_png(cmap), "colour scale 0 to 1", 160)
    sections = [
        _product_section(i, e, stem, save, cbar, max_examples, thumb_px, cmap, alpha)
        for i, (e, stem) in enumerate(zip(evaluations, stems))
    ]
    body = (
        _header(title, generated, len(evaluations), meta_items)
        + f"<main>{_weights_warning(meta_items)}{_results_section(evaluations, summary)}"
        + "".join(sections) + "</main>"
        f"<footer>prn_ray report · figures also saved as PNG files under figures/ next to this "
        f"file · built in {time.perf_counter() - t0:.1f} s</footer>"
    )
    page = ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>{body}</body></html>")
    uri = storage.join(out_uri, "report.html")
    storage.write_text(uri, page, storage_cfg)  # last: its presence means the figures are done
    return uri
