"""Evaluation report: one self-contained HTML page (+ the PNG figures) per evaluation run.

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

import base64
import html
import io
import json
import math
import numbers
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import cv2
import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from prn_ray import metrics as M
from prn_ray import storage
from prn_ray.config import StorageConfig

__all__ = [
    "METRIC_COLUMNS",
    "ExampleImage",
    "ProductEvaluation",
    "select_examples",
    "format_metric",
    "mean_metrics",
    "markdown_table",
    "results_json",
    "write_report",
    "write_tables",
]

# (key, table header, kind) — the paper's columns
METRIC_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("image_auroc", "Image AUROC (%)", "pct"),
    ("pixel_auroc", "Pixel AUROC (%)", "pct"),
    ("aupro", "AUPRO@0.3 (%)", "pct"),
    ("pixel_ap", "Pixel AP (%)", "pct"),
    ("ms_per_image", "ms/image", "ms"),
)
_KIND = {k: kind for k, _, kind in METRIC_COLUMNS}
NA = "n/a"
DEFAULT_TITLE = "PRN anomaly detection — evaluation report"


# ---------------------------------------------------------------------------------------------
# inputs


@dataclass
class ExampleImage:
    """One test image shown in the grid. ``image`` H x W x 3 uint8 RGB (grey, or float in [0, 1],
    is converted); ``mask`` H x W {0, 1} or None (= no defect); ``anomaly_map`` H x W float in
    [0, 1] (resized to the image when its size differs; values are clipped)."""

    image: np.ndarray
    anomaly_map: np.ndarray
    score: float
    label: bool
    mask: np.ndarray | None = None
    defect_type: str = ""
    name: str = ""  # e.g. the file name or URI, shown in the caption


@dataclass
class ProductEvaluation:
    """Everything the report shows for one product.

    ``metrics``: image_auroc, pixel_auroc, aupro, pixel_ap (fractions in [0, 1]) and
    ms_per_image; missing keys read as undefined. ``curves``: as returned by
    :meth:`prn_ray.metrics.PixelMetricAccumulator.curves` (``pixel_roc``, ``pro``, ...).
    ``scores`` / ``labels`` / ``defect_types``: one entry per test image. ``examples``: the
    images of the grid (at most ``max_examples`` are shown, chosen by :func:`select_examples`
    when more are given). ``info``: extra key/values shown under the product heading (e.g. the
    calibration rule).
    """

    product: str
    metrics: Mapping[str, float]
    scores: Any = ()
    labels: Any = ()
    defect_types: Sequence[str] = ()
    threshold: float | None = None
    curves: Mapping[str, tuple] = field(default_factory=dict)
    examples: list[ExampleImage] = field(default_factory=list)
    model_version: str = ""
    image_size: Any = None
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64).ravel()
        self.labels = np.asarray(self.labels).astype(bool).ravel()
        if self.scores.size != self.labels.size:
            raise ValueError(
                f"{self.product}: {self.scores.size} scores for {self.labels.size} labels"
            )
        dts = [] if self.defect_types is None else list(self.defect_types)
        if dts and len(dts) != self.scores.size:
            raise ValueError(f"{self.product}: {len(dts)} defect types for {self.scores.size} "
                             "scores")
        if not dts:
            dts = ["anomalous" if y else "good" for y in self.labels]
        self.defect_types = [str(d) for d in dts]
        if self.threshold is not None and not math.isfinite(float(self.threshold)):
            self.threshold = None

    @classmethod
    def from_accumulator(cls, product: str, acc: M.PixelMetricAccumulator, *,
                         ms_per_image: float = math.nan, **kwargs: Any) -> ProductEvaluation:
        """Metrics and curves from a filled accumulator; the other fields as keywords."""
        metrics = dict(acc.compute())
        metrics["ms_per_image"] = ms_per_image
        return cls(product=product, metrics=metrics, curves=acc.curves(), **kwargs)

    def metric(self, key: str) -> float:
        v = self.metrics.get(key)
        try:
            v = float(v)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return math.nan
        return v

    @property
    def predicted(self) -> np.ndarray | None:
        return None if self.threshold is None else self.scores > float(self.threshold)

    def decisions(self) -> dict[str, int | None]:
        """Counts at the threshold: n_normal, n_anomalous, tp, fp, tn, fn (None w/o threshold)."""
        y = self.labels
        out: dict[str, int | None] = {"n_images": int(y.size), "n_normal": int((~y).sum()),
                                      "n_anomalous": int(y.sum())}
        p = self.predicted
        for k, v in (("tp", (y, True)), ("fp", (~y, True)), ("tn", (~y, False)),
                     ("fn", (y, False))):
            out[k] = None if p is None else int((v[0] & (p == v[1])).sum())
        return out


def _coerce_image(img: np.ndarray) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if np.issubdtype(a.dtype, np.integer) and a.dtype != np.uint8:  # e.g. 16-bit
        a = a.astype(np.float64) * (255.0 / max(int(np.iinfo(a.dtype).max), 1))
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        if np.nanmax(a, initial=0.0) <= 1.0:
            a = a * 255.0
        a = np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"image must be H x W x 3, got {a.shape}")
    return np.ascontiguousarray(a[:, :, :3])


# ---------------------------------------------------------------------------------------------
# numbers


def format_metric(key: str, value: Any) -> str:
    """Table text of one value: percentages with one decimal, ms with one decimal, ``n/a``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return NA
    if not math.isfinite(v):
        return NA
    return f"{100.0 * v:.1f}" if _KIND.get(key, "pct") == "pct" else f"{v:.1f}"


def mean_metrics(evaluations: Sequence[ProductEvaluation]) -> dict[str, tuple[float, int]]:
    """``{key: (mean over products where defined, number of such products)}``."""
    out = {}
    for key, _, _ in METRIC_COLUMNS:
        vals = [e.metric(key) for e in evaluations]
        vals = [v for v in vals if math.isfinite(v)]
        out[key] = (float(np.mean(vals)) if vals else math.nan, len(vals))
    return out


def _mean_cells(evaluations: Sequence[ProductEvaluation]) -> list[str]:
    n = len(evaluations)
    cells = []
    for key, (m, k) in mean_metrics(evaluations).items():
        txt = format_metric(key, m)
        cells.append(txt + "*" if txt != NA and k < n else txt)
    return cells


def markdown_table(evaluations: Sequence[ProductEvaluation]) -> str:
    """GitHub Markdown table: one row per product plus a **Mean** row."""
    head = ["Product", *(h for _, h, _ in METRIC_COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(METRIC_COLUMNS)]
    for e in evaluations:
        name = e.product.replace("|", r"\|")
        cells = [format_metric(k, e.metric(k)) for k, _, _ in METRIC_COLUMNS]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    mean = _mean_cells(evaluations)
    lines.append("| " + " | ".join(["**Mean**", *mean]) + " |")
    text = "\n".join(lines) + "\n"
    if any(c.endswith("*") for c in mean):
        text += "\n\\* mean over the products where the metric is defined\n"
    return text


def _json_float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _json_size(size: Any) -> Any:
    if size is None:
        return None
    if isinstance(size, numbers.Integral):
        return int(size)
    if isinstance(size, (list, tuple, np.ndarray)):
        return [int(v) if isinstance(v, numbers.Integral) else v for v in np.asarray(size).tolist()]
    return str(size)


def _size_text(size: Any) -> str:
    size = _json_size(size)
    if isinstance(size, int):
        return f"{size} px"
    if isinstance(size, list):
        return " × ".join(str(v) for v in size) + " px"
    return str(size)


def _defect_rows(e: ProductEvaluation) -> list[dict[str, Any]]:
    """Per (label, defect type): count, flagged at the threshold, mean score, AUROC vs normals."""
    dts = np.asarray(e.defect_types, dtype=object)
    pred = e.predicted
    normal_scores = e.scores[~e.labels]
    rows = []
    keys = sorted({(bool(y), str(d)) for y, d in zip(e.labels, dts)}, key=lambda t: (t[0], t[1]))
    for lab, dt in keys:
        sel = (e.labels == lab) & (dts == dt)
        s = e.scores[sel]
        row: dict[str, Any] = {"defect_type": dt, "anomalous": lab, "n": int(sel.sum()),
                               "mean_score": _json_float(s.mean()) if s.size else None}
        row["flagged"] = None if pred is None else int(pred[sel].sum())
        auc = None
        if lab and normal_scores.size and s.size:
            y = np.r_[np.zeros(normal_scores.size, bool), np.ones(s.size, bool)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", M.UndefinedMetricWarning)
                auc = _json_float(M.image_auroc(y, np.r_[normal_scores, s]))
        row["image_auroc_vs_normal"] = auc
        rows.append(row)
    return rows


def results_json(evaluations: Sequence[ProductEvaluation]) -> dict[str, Any]:
    """JSON-ready dict (undefined values are ``null``): per product metrics, threshold,
    decision counts and per-defect-type rows; the mean row; column definitions."""
    products: dict[str, Any] = {}
    for e in evaluations:
        d: dict[str, Any] = {k: _json_float(e.metric(k)) for k, _, _ in METRIC_COLUMNS}
        d.update(model_version=e.model_version or None, image_size=_json_size(e.image_size),
                 threshold=_json_float(e.threshold), decisions=e.decisions(),
                 defect_types=_defect_rows(e))
        products[e.product] = d
    means = mean_metrics(evaluations)
    return {
        "columns": {k: h for k, h, _ in METRIC_COLUMNS},
        "products": products,
        "mean": {k: _json_float(m) for k, (m, _) in means.items()},
        "mean_counts": {k: n for k, (_, n) in means.items()},
        "notes": {
            "units": "image_auroc, pixel_auroc, aupro, pixel_ap are fractions in [0, 1]; "
                     "ms_per_image in milliseconds",
            "aupro": "normalised area under the PRO curve up to FPR 0.3 (MVTec definition)",
            "decision_rule": "anomalous iff score > threshold",
            "mean": "plain mean over the products where the metric is defined",
        },
    }


# ---------------------------------------------------------------------------------------------
# example selection


def select_examples(scores: Any, labels: Any, max_examples: int = 16) -> list[int]:
    """Indices of the test images worth looking at, at most ``max_examples``.

    Four queues, taken round-robin so each is represented: highest-scoring normals (false-alarm
    candidates), lowest-scoring anomalies (misses), highest-scoring anomalies and lowest-scoring
    normals (the clearest correct calls). Duplicates are dropped. Call it with the image scores
    and labels, then load image / mask / map only for the returned indices.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if s.size != y.size:
        raise ValueError(f"{s.size} scores for {y.size} labels")
    idx = np.arange(s.size)
    normals, anomalies = idx[~y], idx[y]
    # stable sorts, ties broken by index -> deterministic
    n_desc = normals[np.argsort(-s[normals], kind="stable")]
    a_asc = anomalies[np.argsort(s[anomalies], kind="stable")]
    queues = [list(n_desc), list(a_asc), list(a_asc[::-1]), list(n_desc[::-1])]
    out: list[int] = []
    seen: set[int] = set()
    limit = min(int(max_examples), s.size)
    pos = [0, 0, 0, 0]
    while len(out) < limit:
        progressed = False
        for q in range(4):
            while pos[q] < len(queues[q]) and int(queues[q][pos[q]]) in seen:
                pos[q] += 1
            if pos[q] < len(queues[q]) and len(out) < limit:
                i = int(queues[q][pos[q]])
                out.append(i)
                seen.add(i)
                progressed = True
        if not progressed:
            break
    return out


# ---------------------------------------------------------------------------------------------
# rendering helpers


def _png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _fig_png(fig: Figure, dpi: int = 100) -> bytes:
    FigureCanvasAgg(fig)  # attach the Agg canvas explicitly (no pyplot, no GUI backend)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    fig.clear()
    return buf.getvalue()


_LUTS: dict[str, np.ndarray] = {}


def _lut(cmap: str) -> np.ndarray:
    if cmap not in _LUTS:
        rgba = matplotlib.colormaps[cmap](np.linspace(0.0, 1.0, 256))
        _LUTS[cmap] = (rgba[:, :3] * 255.0).round().astype(np.uint8)
    return _LUTS[cmap]


def _fit(a: np.ndarray, h: int, w: int, interp: int) -> np.ndarray:
    if a.shape[:2] == (h, w):
        return a
    return cv2.resize(a, (w, h), interpolation=interp)


_GT_COLOUR = (255, 48, 48)
_GAP = 4


def _panels(ex: ExampleImage, thumb_px: int, cmap: str, alpha: float) -> np.ndarray:
    """image | GT contour over image | heat-map overlay with the GT contour, side by side."""
    img = _coerce_image(ex.image)
    h0, w0 = img.shape[:2]
    scale = min(1.0, thumb_px / max(h0, w0))
    h, w = max(1, round(h0 * scale)), max(1, round(w0 * scale))
    img = _fit(img, h, w, cv2.INTER_AREA)
    amap = np.nan_to_num(np.asarray(ex.anomaly_map, dtype=np.float32).squeeze())
    amap = _fit(np.clip(amap, 0.0, 1.0), h, w, cv2.INTER_LINEAR)
    if ex.mask is None:
        mask = np.zeros((h, w), np.uint8)
    else:
        mask = (np.asarray(ex.mask).squeeze() > 0).astype(np.uint8)
        mask = _fit(mask, h, w, cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    thick = max(1, round(max(h, w) / 128))
    gt = img.copy()
    if contours:
        cv2.drawContours(gt, contours, -1, _GT_COLOUR, thick, lineType=cv2.LINE_AA)
    heat = _lut(cmap)[(amap * 255.0 + 0.5).astype(np.uint8)]
    over = cv2.addWeighted(img, 1.0 - alpha, heat, alpha, 0.0)
    if contours:
        cv2.drawContours(over, contours, -1, (255, 255, 255), thick, lineType=cv2.LINE_AA)
    gap = np.full((h, _GAP, 3), 255, np.uint8)
    return np.concatenate([img, gap, gt, gap, over], axis=1)


def _verdict(ex: ExampleImage, threshold: float | None) -> tuple[str, str, bool | None]:
    """(code, words, correct): TP/FP/TN/FN, or '' without a threshold."""
    if threshold is None:
        return "", "no threshold", None
    flagged = float(ex.score) > float(threshold)
    if ex.label:
        return ("TP", "detected", True) if flagged else ("FN", "missed", False)
    return ("FP", "false alarm", False) if flagged else ("TN", "correct normal", True)


def _fmt_score(x: float | None) -> str:
    if x is None or not math.isfinite(float(x)):
        return NA
    x = float(x)
    return f"{x:.3f}" if x == 0 or 1e-3 <= abs(x) < 1e4 else f"{x:.3g}"


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")


def _grid_png(cards: list[tuple[np.ndarray, str]], per_row: int = 2) -> bytes:
    """The example grid as one PNG (for pasting into a note): a caption strip above each card."""
    font, fscale, fth = cv2.FONT_HERSHEY_SIMPLEX, 0.42, 1
    strip = 20
    ch = max(c.shape[0] for c, _ in cards) + strip
    cw = max(c.shape[1] for c, _ in cards)
    rows = math.ceil(len(cards) / per_row)
    pad = 10
    head = 22
    H = head + rows * (ch + pad)
    W = min(per_row, len(cards)) * (cw + pad) + pad
    canvas = np.full((H, W, 3), 255, np.uint8)
    pw = (cw - 2 * _GAP) // 3
    for c in range(min(per_row, len(cards))):
        for j, t in enumerate(("image", "ground truth", "anomaly map")):
            x = pad + c * (cw + pad) + j * (pw + _GAP)
            cv2.putText(canvas, t, (x, 15), font, 0.45, (60, 60, 60), 1, cv2.LINE_AA)
    for i, (card, text) in enumerate(cards):
        r, c = divmod(i, per_row)
        y0, x0 = head + r * (ch + pad), pad + c * (cw + pad)
        text = _ascii(text)
        while text and cv2.getTextSize(text, font, fscale, fth)[0][0] > cw:
            text = text[:-2]
        cv2.putText(canvas, text, (x0, y0 + 14), font, fscale, (20, 20, 20), fth, cv2.LINE_AA)
        canvas[y0 + strip: y0 + strip + card.shape[0], x0: x0 + card.shape[1]] = card
    return _png(canvas)


def _colourbar_png(cmap: str, width: int = 200, height: int = 12) -> bytes:
    row = _lut(cmap)[np.linspace(0, 255, width).round().astype(np.uint8)]
    return _png(np.repeat(row[None], height, axis=0))


def _empty_axes(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, color="0.4",
            transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _curves_png(e: ProductEvaluation) -> bytes:
    # fixed margins: constrained/tight layout would double the drawing time
    fig = Figure(figsize=(8.0, 3.7))
    fig.subplots_adjust(left=0.075, right=0.985, bottom=0.13, top=0.92, wspace=0.25)
    ax1, ax2 = fig.subplots(1, 2)
    roc = e.curves.get("pixel_roc")
    if roc is not None and len(roc[0]) > 1:
        fpr, tpr = np.asarray(roc[0]), np.asarray(roc[1])
        ax1.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.6")
        ax1.fill_between(fpr, tpr, color="tab:blue", alpha=0.18, lw=0)
        ax1.plot(fpr, tpr, color="tab:blue", lw=1.6)
        ax1.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false-positive rate (pixels)",
                ylabel="true-positive rate (pixels)")
    else:
        _empty_axes(ax1, "pixel ROC undefined\n(no anomalous or no normal pixel)")
    ax1.set_title(f"Pixel ROC — AUROC {format_metric('pixel_auroc', e.metric('pixel_auroc'))}%",
                  fontsize=10)
    pro = e.curves.get("pro")
    if pro is not None and len(pro[0]) > 1:
        x, y = np.asarray(pro[0]), np.asarray(pro[1])
        limit = float(x.max()) if x.size else 0.3
        ax2.fill_between(x, y, color="tab:green", alpha=0.2, lw=0)
        ax2.plot(x, y, color="tab:green", lw=1.6)
        ax2.set(xlim=(0, limit if limit > 0 else 0.3), ylim=(0, 1.01),
                xlabel="false-positive rate (pixels)", ylabel="per-region overlap")
    else:
        _empty_axes(ax2, "PRO curve undefined\n(no ground-truth region)")
    ax2.set_title(f"PRO up to FPR 0.3 — AUPRO {format_metric('aupro', e.metric('aupro'))}%",
                  fontsize=10)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, lw=0.5)
        ax.tick_params(labelsize=8)
    return _fig_png(fig)


def _histogram_png(e: ProductEvaluation) -> bytes:
    fig = Figure(figsize=(5.2, 3.7))
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.13, top=0.92)
    ax = fig.subplots()
    ok = np.isfinite(e.scores)
    s, y = e.scores[ok], e.labels[ok]
    if s.size == 0:
        _empty_axes(ax, "no image scores")
    else:
        d = e.decisions()
        lo, hi = float(s.min()), float(s.max())
        if e.threshold is not None and math.isfinite(float(e.threshold)):
            lo, hi = min(lo, float(e.threshold)), max(hi, float(e.threshold))
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        nbins = int(np.clip(2 * math.sqrt(s.size), 10, 40))
        edges = np.linspace(lo, hi, nbins + 1)
        fp = "" if d["fp"] is None else f", FP={d['fp']}"
        fn = "" if d["fn"] is None else f", FN={d['fn']}"
        if (~y).any():
            ax.hist(s[~y], bins=edges, color="tab:blue", alpha=0.55,
                    label=f"normal (n={d['n_normal']}{fp})")
        if y.any():
            ax.hist(s[y], bins=edges, color="tab:red", alpha=0.55,
                    label=f"anomalous (n={d['n_anomalous']}{fn})")
        if e.threshold is not None:
            ax.axvline(float(e.threshold), color="black", ls="--", lw=1.2,
                       label=f"threshold {_fmt_score(e.threshold)}")
        ax.legend(fontsize=8, frameon=False)
        ax.set(xlabel="image score", ylabel="test images")
        ax.grid(alpha=0.3, lw=0.5)
        ax.tick_params(labelsize=8)
    ax.set_title(f"Image scores — image AUROC "
                 f"{format_metric('image_auroc', e.metric('image_auroc'))}%", fontsize=10)
    return _fig_png(fig)


def _summary_png(evaluations: Sequence[ProductEvaluation]) -> bytes:
    names = [e.product for e in evaluations] + ["mean"]
    means = mean_metrics(evaluations)
    height = 1.2 + 0.32 * len(names)
    fig = Figure(figsize=(7.5, height))
    left = min(0.45, 0.03 + 0.0085 * max(len(n) for n in names))
    fig.subplots_adjust(left=left, right=0.98, bottom=0.55 / height, top=1 - 0.45 / height)
    ax = fig.subplots()
    ypos = np.arange(len(names))[::-1]
    styles = {"image_auroc": ("o", "tab:blue"), "pixel_auroc": ("s", "tab:orange"),
              "aupro": ("D", "tab:green"), "pixel_ap": ("^", "tab:purple")}
    lo = 100.0
    for key, head, kind in METRIC_COLUMNS:
        if kind != "pct":
            continue
        vals = [100 * e.metric(key) for e in evaluations] + [100 * means[key][0]]
        vals = np.asarray(vals, dtype=np.float64)
        ok = np.isfinite(vals)
        if ok.any():
            lo = min(lo, float(vals[ok].min()))
        marker, colour = styles[key]
        ax.scatter(vals[ok], ypos[ok], marker=marker, color=colour, s=34, alpha=0.85,
                   label=head.replace(" (%)", ""), zorder=3)
    ax.set_yticks(ypos, names, fontsize=8)
    ax.axhline(0.5, color="0.7", lw=0.8)
    ax.set_xlim(max(0.0, math.floor(lo / 5) * 5 - 1), 100.5)
    ax.set_xlabel("%  (note: the axis does not start at 0)" if lo > 5 else "%", fontsize=8)
    ax.grid(axis="x", alpha=0.3, lw=0.5)
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(fontsize=7, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    return _fig_png(fig)


# ---------------------------------------------------------------------------------------------
# HTML

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
    return f'<img src="{_data_uri(png)}" alt="{_e(alt)}"{w}>'


def _cell_style(key: str, value: float) -> str:
    if _KIND.get(key) != "pct" or not math.isfinite(value):
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
        for (k, _, _), c in zip(METRIC_COLUMNS, _mean_cells(evaluations))
    )
    rows.append(f'<tr class="mean"><td class="name">Mean</td>{cells}</tr>')
    return "<table>" + "".join(rows) + "</table>"


def _defect_table(e: ProductEvaluation) -> str:
    rows = ['<tr><th class="name">test images</th><th>n</th><th>flagged (score &gt; thr)</th>'
            "<th>mean score</th><th>image AUROC vs normals (%)</th></tr>"]
    for r in _defect_rows(e):
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
            f'</td><td>{r["n"]}</td><td>{flagged}</td><td>{_fmt_score(r["mean_score"])}</td>'
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
        code, words, correct = _verdict(ex, e.threshold)
        rendered.append((ex, code, words, correct, _panels(ex, thumb_px, cmap, alpha)))
    order = {code: i for i, (code, _) in enumerate(_GROUPS)}
    # worst first inside each group: FN lowest score first, FP highest first, etc.
    sign = {"FN": 1, "FP": -1, "TP": -1, "TN": 1, "": -1}
    rendered.sort(key=lambda r: (order[r[1]], sign[r[1]] * float(r[0].score)))
    parts, grid_cards = [], []
    thr = "" if e.threshold is None else f" (thr {_fmt_score(e.threshold)})"
    for code, title in _GROUPS:
        group = [r for r in rendered if r[1] == code]
        if not group:
            continue
        parts.append(f'<h3>{_e(title)} · {len(group)}</h3><div class="grid">')
        for ex, c, words, correct, panels in group:
            label = "anomalous" if ex.label else "normal"
            dt = ex.defect_type or ("good" if not ex.label else "")
            badge_cls = "nt" if correct is None else ("ok" if correct else "ko")
            mark = "" if correct is None else ("✓ " if correct else "✗ ")
            name = ex.name or ""
            short = name if len(name) <= 48 else "…" + name[-47:]
            alt = f"{e.product} {name} {label} {dt} score {_fmt_score(ex.score)}"
            parts.append(
                f'<div class="card{" bad" if correct is False else ""}">{_COLS}'
                f"{_img_tag(_png(panels), alt)}"
                f'<div class="cap"><span class="badge {badge_cls}">{mark}{_e(words)}</span>'
                f"<span>score <b>{_fmt_score(ex.score)}</b>{_e(thr)}</span>"
                f"<span>{_e(label)}{' · ' + _e(dt) if dt else ''}</span>"
                f'<span class="muted" title="{_e(name)}">{_e(short)}</span></div></div>'
            )
            grid_cards.append((panels, f"{c or '-'} {words} | score {_fmt_score(ex.score)}{thr}"
                                       f" | {label}{'/' + dt if dt else ''} | {name}"))
        parts.append("</div>")
    return "".join(parts), _grid_png(grid_cards)


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
    weights = {v.strip().lower() for k, v in meta_items if k.split(".")[-1] == "weights"}
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    summary = _summary_png(evaluations)
    save("summary.png", summary)
    cbar = _img_tag(_colourbar_png(cmap), "colour scale 0 to 1", 160)
    sections = []
    for i, (e, stem) in enumerate(zip(evaluations, stems)):
        curves, hist = _curves_png(e), _histogram_png(e)
        save(f"{stem}_curves.png", curves)
        save(f"{stem}_histogram.png", hist)
        examples = list(e.examples)
        if len(examples) > max_examples:
            keep = select_examples([x.score for x in examples], [x.label for x in examples],
                                   max_examples)
            examples = [examples[j] for j in keep]
        cards, grid = _example_cards(e, examples, thumb_px, cmap, alpha)
        if grid is not None:
            save(f"{stem}_examples.png", grid)
        d = e.decisions()
        facts = [("test images", f"{d['n_images']} ({d['n_normal']} normal, "
                                 f"{d['n_anomalous']} anomalous)")]
        if e.model_version:
            facts.append(("model", e.model_version))
        if e.image_size is not None:
            facts.append(("image size", _size_text(e.image_size)))
        if e.threshold is not None:
            facts.append(("threshold", _fmt_score(e.threshold)))
            facts.append(("false alarms", f"{d['fp']}/{d['n_normal']}"))
            facts.append(("misses", f"{d['fn']}/{d['n_anomalous']}"))
        facts += [(k, storage.redact(_meta_value(v))) for k, v in _flatten(e.info)]
        facts_html = "".join(f'<span class="fact">{_e(k)}: <b>{_e(v)}</b></span>'
                             for k, v in facts)
        metric_facts = "".join(
            f'<span class="fact">{_e(h)}: <b>{format_metric(k, e.metric(k))}</b></span>'
            for k, h, _ in METRIC_COLUMNS
        )
        fpfn = ("" if e.threshold is None else
                f" At the threshold {_e(_fmt_score(e.threshold))}: {d['fp']} false alarm(s) "
                f"among {d['n_normal']} normal and {d['fn']} miss(es) among "
                f"{d['n_anomalous']} anomalous test images.")
        sections.append(
            f'<section id="{_anchor(i, e.product)}"><h2>{_e(e.product)}</h2>'
            f'<div class="facts">{facts_html}</div><div class="facts">{metric_facts}</div>'
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

    warn = ""
    if "none" in weights:
        warn = ('<div class="warn"><b>Random backbone weights</b> (weights = none): this run '
                "is a smoke test; its numbers say nothing about detection quality.</div>")
    meta_html = "".join(f"<span><b>{_e(k)}</b> {_e(v)}</span>" for k, v in meta_items)
    body = (
        f"<header><h1>{_e(title)}</h1><div class=\"date\">generated {generated} · "
        f"{len(evaluations)} product(s)</div><div class=\"meta\">{meta_html}</div></header>"
        f"<main>{warn}<section><h2>Results</h2>{_results_table(evaluations)}"
        '<p class="muted">Percentages with one decimal. Image AUROC: image scores vs labels. '
        "Pixel AUROC and pixel AP: all test pixels pooled. AUPRO@0.3: normalised area under "
        "the per-region-overlap curve up to a pixel false-positive rate of 0.3 (MVTec AD "
        "definition). ms/image: inference time per image. Mean: plain mean over the products "
        "(* = over the products where the metric is defined).</p>"
        f'<div class="figs">{_img_tag(summary, "metrics per product")}</div></section>'
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


def write_tables(evaluations: Sequence[ProductEvaluation], out_uri: str,
                 storage_cfg: StorageConfig | None = None) -> dict[str, str]:
    """Convenience for jobs: ``results.json`` and ``results.md`` under ``out_uri``."""
    evaluations = list(evaluations)
    out = {"json": storage.join(out_uri, "results.json"),
           "markdown": storage.join(out_uri, "results.md")}
    storage.write_text(out["json"], json.dumps(results_json(evaluations), indent=2,
                                               allow_nan=False) + "\n", storage_cfg)
    storage.write_text(out["markdown"], markdown_table(evaluations), storage_cfg)
    return out
