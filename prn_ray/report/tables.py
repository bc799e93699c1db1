"""Evaluation results as numbers: per-product evaluations, the paper's table (Markdown), a JSON
document, the examples worth looking at. (Figures: :mod:`.figures`; the page: :mod:`.html`.)

Conventions: an image is flagged anomalous iff ``score > threshold``; AUROC / AUPRO / AP as
percentages with one decimal (as in the PRN paper), ms per image with one decimal, ``n/a``
where a metric is undefined. The mean row is the plain mean over the products where the metric
is defined; a ``*`` marks a mean that left products out.
"""

from __future__ import annotations

import json
import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from prn_ray import metrics as M
from prn_ray import storage
from prn_ray.config import StorageConfig
from prn_ray.thresholds import held_out_counts, own_rule

# (key, table header, kind) — the paper's columns
METRIC_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("image_auroc", "Image AUROC (%)", "pct"),
    ("pixel_auroc", "Pixel AUROC (%)", "pct"),
    ("aupro", "AUPRO@0.3 (%)", "pct"),
    ("pixel_ap", "Pixel AP (%)", "pct"),
    ("ms_per_image", "ms/image", "ms"),
)
KIND = {k: kind for k, _, kind in METRIC_COLUMNS}
NA = "n/a"
DEFAULT_TITLE = "PRN anomaly detection — evaluation report"


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
    # The model's calibration (calibration.json): its rule and the false-alarm rate / recall it
    # expected on held-out images, set beside the same figures on the test split.
    calibration: Mapping[str, Any] = field(default_factory=dict)

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

    def at_threshold(self) -> dict[str, Any]:
        """The threshold's rule and its false-alarm rate / recall on the held-out images it
        was chosen on (expected) and on this test split (measured), each with its count."""
        d, c = self.decisions(), self.calibration
        if d["fp"] is None:
            return {}
        n_normal, n_defects = held_out_counts(c)
        return {
            "rule": own_rule(c),
            "held_out_false_alarm_rate": json_float(c.get("val_fpr")),
            "held_out_normals": n_normal,
            "held_out_recall": json_float(c.get("val_tpr")),
            "held_out_anomalies": n_defects,
            "test_false_alarm_rate": json_float(d["fp"] / d["n_normal"] if d["n_normal"]
                                                else math.nan),
            "test_normals": d["n_normal"],
            "test_recall": json_float(d["tp"] / d["n_anomalous"] if d["n_anomalous"]
                                      else math.nan),
            "test_anomalies": d["n_anomalous"],
        }


def format_metric(key: str, value: Any) -> str:
    """Table text of one value: percentages with one decimal, ms with one decimal, ``n/a``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return NA
    if not math.isfinite(v):
        return NA
    return f"{100.0 * v:.1f}" if KIND.get(key, "pct") == "pct" else f"{v:.1f}"


def mean_metrics(evaluations: Sequence[ProductEvaluation]) -> dict[str, tuple[float, int]]:
    """``{key: (mean over products where defined, number of such products)}``."""
    out = {}
    for key, _, _ in METRIC_COLUMNS:
        vals = [e.metric(key) for e in evaluations]
        vals = [v for v in vals if math.isfinite(v)]
        out[key] = (float(np.mean(vals)) if vals else math.nan, len(vals))
    return out


def mean_cells(evaluations: Sequence[ProductEvaluation]) -> list[str]:
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
    mean = mean_cells(evaluations)
    lines.append("| " + " | ".join(["**Mean**", *mean]) + " |")
    text = "\n".join(lines) + "\n"
    if any(c.endswith("*") for c in mean):
        text += "\n\\* mean over the products where the metric is defined\n"
    return text


def threshold_table(evaluations: Sequence[ProductEvaluation]) -> str:
    """Markdown: per product, the threshold's rule and its false-alarm rate and recall on the
    held-out images it was chosen on against the test split's ("" without thresholds)."""
    text = ""
    rows = [(e.product, e.at_threshold()) for e in evaluations]
    rows = [(name, a) for name, a in rows if a]
    if rows:
        text += ("\n| Product | threshold rule | false alarms: held out | test | "
                 "defects caught: held out | test |\n|---|---|---:|---:|---:|---:|\n")
        for name, a in rows:
            text += (f"| {name.replace('|', chr(92) + '|')} | {a['rule'] or '-'} | "
                     f"{_share(a['held_out_false_alarm_rate'], a['held_out_normals'])} | "
                     f"{_share(a['test_false_alarm_rate'], a['test_normals'])} | "
                     f"{_share(a['held_out_recall'], a['held_out_anomalies'])} | "
                     f"{_share(a['test_recall'], a['test_anomalies'])} |\n")
    return text


def _share(rate: float | None, n: int | None) -> str:
    """``1.0 % of 100``."""
    return NA if rate is None or n is None else f"{100 * rate:.1f} % of {n}"


def json_float(v: Any) -> float | None:
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


def size_text(size: Any) -> str:
    size = _json_size(size)
    if isinstance(size, int):
        return f"{size} px"
    if isinstance(size, list):
        return " × ".join(str(v) for v in size) + " px"
    return str(size)


def defect_rows(e: ProductEvaluation) -> list[dict[str, Any]]:
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
                               "mean_score": json_float(s.mean()) if s.size else None}
        row["flagged"] = None if pred is None else int(pred[sel].sum())
        auc = None
        if lab and normal_scores.size and s.size:
            y = np.r_[np.zeros(normal_scores.size, bool), np.ones(s.size, bool)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", M.UndefinedMetricWarning)
                auc = json_float(M.image_auroc(y, np.r_[normal_scores, s]))
        row["image_auroc_vs_normal"] = auc
        rows.append(row)
    return rows


def results_json(evaluations: Sequence[ProductEvaluation]) -> dict[str, Any]:
    """JSON-ready dict (undefined values are ``null``): per product metrics, threshold,
    decision counts and per-defect-type rows; the mean row; column definitions."""
    products: dict[str, Any] = {}
    for e in evaluations:
        d: dict[str, Any] = {k: json_float(e.metric(k)) for k, _, _ in METRIC_COLUMNS}
        d.update(model_version=e.model_version or None, image_size=_json_size(e.image_size),
                 threshold=json_float(e.threshold), decisions=e.decisions(),
                 at_threshold=e.at_threshold(),
                 defect_types=defect_rows(e))
        if "image_auroc_map_rule" in e.metrics:  # a model with an image head: its ablation
            d["image_auroc_map_rule"] = json_float(e.metric("image_auroc_map_rule"))
        products[e.product] = d
    means = mean_metrics(evaluations)
    return {
        "columns": {k: h for k, h, _ in METRIC_COLUMNS},
        "products": products,
        "mean": {k: json_float(m) for k, (m, _) in means.items()},
        "mean_counts": {k: n for k, (_, n) in means.items()},
        "notes": {
            "units": "image_auroc, pixel_auroc, aupro, pixel_ap are fractions in [0, 1]; "
                     "ms_per_image in milliseconds",
            "aupro": "normalised area under the PRO curve up to FPR 0.3 (MVTec definition)",
            "decision_rule": "anomalous iff score > threshold",
            "mean": "plain mean over the products where the metric is defined",
        },
    }


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


def write_tables(evaluations: Sequence[ProductEvaluation], out_uri: str,
                 storage_cfg: StorageConfig | None = None) -> dict[str, str]:
    """Convenience for jobs: ``results.json`` and ``results.md`` under ``out_uri``."""
    evaluations = list(evaluations)
    out = {"json": storage.join(out_uri, "results.json"),
           "markdown": storage.join(out_uri, "results.md")}
    storage.write_text(out["json"], json.dumps(results_json(evaluations), indent=2,
                                               allow_nan=False) + "\n", storage_cfg)
    storage.write_text(out["markdown"], markdown_table(evaluations) + threshold_table(evaluations),
                       storage_cfg)
    return out
