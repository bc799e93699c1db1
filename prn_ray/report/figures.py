"""Figures of the evaluation report: heat-map overlays, example grids, ROC/PRO curves, score
histograms and the per-product summary, as PNG bytes.

Heat maps use a fixed 0..1 colour scale (never normalised per image, which would make every
normal image look anomalous). Plotting uses matplotlib's object API (``Figure`` + the Agg
canvas), never ``pyplot``: no GUI backend is needed, the caller's backend is left alone, and no
figure accumulates in a global manager.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence

import cv2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from prn_ray.heatmap import coerce_image, fit, lut
from prn_ray.report.tables import (
    METRIC_COLUMNS,
    NA,
    ExampleImage,
    ProductEvaluation,
    format_metric,
    mean_metrics,
)


def png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def fig_png(fig: Figure, dpi: int = 100) -> bytes:
    FigureCanvasAgg(fig)  # attach the Agg canvas explicitly (no pyplot, no GUI backend)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    fig.clear()
    return buf.getvalue()


_GT_COLOUR = (255, 48, 48)
_GAP = 4


def panels(ex: ExampleImage, thumb_px: int, cmap: str, alpha: float) -> np.ndarray:
    """image | GT contour over image | heat-map overlay with the GT contour, side by side."""
    img = coerce_image(ex.image)
    h0, w0 = img.shape[:2]
    scale = min(1.0, thumb_px / max(h0, w0))
    h, w = max(1, round(h0 * scale)), max(1, round(w0 * scale))
    img = fit(img, h, w, cv2.INTER_AREA)
    amap = np.nan_to_num(np.asarray(ex.anomaly_map, dtype=np.float32).squeeze())
    amap = fit(np.clip(amap, 0.0, 1.0), h, w, cv2.INTER_LINEAR)
    if ex.mask is None:
        mask = np.zeros((h, w), np.uint8)
    else:
        mask = (np.asarray(ex.mask).squeeze() > 0).astype(np.uint8)
        mask = fit(mask, h, w, cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    thick = max(1, round(max(h, w) / 128))
    gt = img.copy()
    if contours:
        cv2.drawContours(gt, contours, -1, _GT_COLOUR, thick, lineType=cv2.LINE_AA)
    heat = lut(cmap)[(amap * 255.0 + 0.5).astype(np.uint8)]
    over = cv2.addWeighted(img, 1.0 - alpha, heat, alpha, 0.0)
    if contours:
        cv2.drawContours(over, contours, -1, (255, 255, 255), thick, lineType=cv2.LINE_AA)
    gap = np.full((h, _GAP, 3), 255, np.uint8)
    return np.concatenate([img, gap, gt, gap, over], axis=1)


def verdict(ex: ExampleImage, threshold: float | None) -> tuple[str, str, bool | None]:
    """(code, words, correct): TP/FP/TN/FN, or '' without a threshold."""
    if threshold is None:
        return "", "no threshold", None
    flagged = float(ex.score) > float(threshold)
    if ex.label:
        return ("TP", "detected", True) if flagged else ("FN", "missed", False)
    return ("FP", "false alarm", False) if flagged else ("TN", "correct normal", True)


def fmt_score(x: float | None) -> str:
    if x is None or not math.isfinite(float(x)):
        return NA
    x = float(x)
    return f"{x:.3f}" if x == 0 or 1e-3 <= abs(x) < 1e4 else f"{x:.3g}"


def ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii")


def grid_png(cards: list[tuple[np.ndarray, str]], per_row: int = 2) -> bytes:
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
        text = ascii(text)
        while text and cv2.getTextSize(text, font, fscale, fth)[0][0] > cw:
            text = text[:-2]
        cv2.putText(canvas, text, (x0, y0 + 14), font, fscale, (20, 20, 20), fth, cv2.LINE_AA)
        canvas[y0 + strip: y0 + strip + card.shape[0], x0: x0 + card.shape[1]] = card
    return png(canvas)


def colourbar_png(cmap: str, width: int = 200, height: int = 12) -> bytes:
    row = lut(cmap)[np.linspace(0, 255, width).round().astype(np.uint8)]
    return png(np.repeat(row[None], height, axis=0))


def _empty_axes(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, color="0.4",
            transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def curves_png(e: ProductEvaluation) -> bytes:
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
    return fig_png(fig)


def histogram_png(e: ProductEvaluation) -> bytes:
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
                       label=f"threshold {fmt_score(e.threshold)}")
        ax.legend(fontsize=8, frameon=False)
        ax.set(xlabel="image score", ylabel="test images")
        ax.grid(alpha=0.3, lw=0.5)
        ax.tick_params(labelsize=8)
    ax.set_title(f"Image scores — image AUROC "
                 f"{format_metric('image_auroc', e.metric('image_auroc'))}%", fontsize=10)
    return fig_png(fig)


def summary_png(evaluations: Sequence[ProductEvaluation]) -> bytes:
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
    return fig_png(fig)
