"""Score a file or a folder with one product's registered model, without Ray.

For each file under the input: its score and decision (``score > threshold``, the scoring
job's rule), a 16-bit anomaly map PNG at the image's own resolution (the scores contract's
encoding, :func:`prn_ray.scoring.table.map_to_png`) and a heat-map overlay PNG
(:func:`prn_ray.heatmap.overlay`); then ``predictions.csv`` with one row per file. Decoding is
the scoring job's (:func:`prn_ray.images.decode_batch`, tiles cut by the model's geometry), the
model is run and its maps stitched the scoring actors' way (:mod:`prn_ray.inference`), so the
scores equal the nightly job's. A file
that cannot be read or decoded -- a broken image, a text file -- becomes a row with the reason
(``"<reason>: <message>"``) and the run goes on.

Output layout::

    <out>/predictions.csv                      file, score, is_anomaly, threshold, map_png,
                                               overlay_png, error, model_version
    <out>/maps/<relative path>.png             16-bit grey, 65535 = probability 1
    <out>/overlays/<relative path>.png         8-bit RGB, the image with its heat map
"""

from __future__ import annotations

import csv
import io
import posixpath
from collections import Counter
from dataclasses import asdict, dataclass, fields

import numpy as np

from prn_ray import images, registry, storage
from prn_ray.config import Config
from prn_ray.heatmap import overlay
from prn_ray.inference import ScoreRule, in_batches, stitch_items
from prn_ray.scoring.table import map_to_png

CSV_NAME = "predictions.csv"


@dataclass
class Prediction:
    """One row of ``predictions.csv``: ``file`` as listed (absolute path or URI), the PNGs
    relative to the output folder."""

    file: str
    score: float | None = None
    is_anomaly: bool | None = None
    threshold: float | None = None
    map_png: str | None = None
    overlay_png: str | None = None
    error: str | None = None
    model_version: str | None = None


CSV_COLUMNS = tuple(f.name for f in fields(Prediction))


@dataclass
class PredictSummary:
    product: str
    version: str
    threshold: float
    out: str
    rows: list[Prediction]

    @property
    def counts(self) -> dict[str, int]:
        scored = [r for r in self.rows if r.error is None]
        return {"files": len(self.rows), "scored": len(scored),
                "anomalous": sum(bool(r.is_anomaly) for r in scored),
                "errors": len(self.rows) - len(scored)}

    def errors_by_reason(self) -> dict[str, int]:
        return dict(Counter(r.error.split(":", 1)[0] for r in self.rows if r.error))


def input_files(input_uri: str, storage_cfg=None) -> tuple[list[str], str]:
    """(every file under ``input_uri``, sorted; the folder names are relative to). A single
    file is its own list. Hidden files (``.name``) are skipped; everything else gets a row."""
    files = storage.list_files(input_uri, storage_cfg)
    if len(files) == 1 and storage.is_file(input_uri, storage_cfg):
        return files, posixpath.dirname(files[0])
    base = storage.resolve(input_uri, storage_cfg).uri()
    return [f for f in files if not posixpath.basename(f).startswith(".")], base


def output_names(files: list[str], base: str) -> dict[str, str]:
    """File -> output name: its path relative to ``base`` with the extension replaced by
    ``.png`` (kept, as ``name.jpg.png``, when two inputs would otherwise share a name)."""
    rel = {f: posixpath.relpath(f, base) if base else posixpath.basename(f) for f in files}
    stems = Counter(posixpath.splitext(r)[0] for r in rel.values())
    return {f: (posixpath.splitext(r)[0] if stems[posixpath.splitext(r)[0]] == 1 else r) + ".png"
            for f, r in rel.items()}


def predict(cfg: Config, product: str, input_uri: str, out_uri: str, *,
            version: str | None = None, batch_size: int | None = None, threads: int = 1,
            say=lambda msg: None) -> PredictSummary:
    """Score every file under ``input_uri`` and write maps, overlays and ``predictions.csv``
    under ``out_uri``. Raises :class:`~prn_ray.registry.RegistryError` when the product or
    version is not registered; a file's failure is its row's ``error``."""
    from prn_ray.runner import RegisteredModels

    scfg = cfg.storage
    version, geometry, threshold = registry.describe(scfg, product, version,
                                                     cfg.score.threshold_rule)
    if cfg.score.threshold is not None:
        threshold = float(cfg.score.threshold)
    runner = RegisteredModels(scfg, threads=threads, runtime=cfg.score.runtime,  # a GPU if any
                              precision=cfg.score.precision)
    model = runner.get(product, version)
    rule = ScoreRule.of(model)
    files, base = input_files(input_uri, scfg)
    names = output_names(files, base)
    rows: list[Prediction] = []
    step = max(1, int(batch_size or cfg.score.batch_size))
    for start in range(0, len(files), step):
        chunk = files[start:start + step]
        batch = images.decode_batch({"image_uri": np.array(chunk, dtype=object),
                                     "item": np.arange(len(chunk))},
                                    storage_cfg=scfg, data_cfg=cfg.data, geometry=geometry)
        ok = images.error_free(batch["error"])
        results = {}
        if ok.any():
            probs, _ = in_batches(lambda v: runner.probabilities(model, v), batch["image"][ok],
                                  step)
            results = {m.item: m for m in stitch_items(
                probs, batch["item"][ok], batch["view"][ok], batch["orig_height"][ok],
                batch["orig_width"][ok], geometry, rule)}
        for i, uri in enumerate(chunk):
            row = Prediction(file=uri, threshold=threshold, model_version=version)
            if i not in results:
                row.error = str(batch["error"][np.flatnonzero(batch["item"] == i)[0]])
            else:
                write_outputs(row, uri, results[i].amap, results[i].score, names[uri],
                              out_uri, cfg)
            rows.append(row)
        say(f"{min(start + step, len(files))}/{len(files)} files")
    storage.write_text(storage.join(out_uri, CSV_NAME), to_csv(rows), scfg)
    return PredictSummary(product, version, threshold, out_uri, rows)


def write_outputs(row: Prediction, uri: str, prob: np.ndarray, score: float, name: str,
                  out_uri: str, cfg: Config) -> None:
    """Fill a scored row and write its map and overlay at the image's own resolution."""
    if not np.isfinite(score):
        row.error = "scoring_failed: the model returned a non-finite score"
        return
    try:
        # The model saw the resized image; the outputs cover the original one (re-read: it
        # decoded a moment ago, and only good files get here).
        img = images.decode_image(storage.read_bytes(uri, cfg.storage),
                                  cfg.data.max_image_pixels, cfg.data.min_image_side)
        h, w = img.shape[:2]
        png = map_to_png(prob, h, w)
        map_rel, over_rel = f"maps/{name}", f"overlays/{name}"
        storage.write_bytes(storage.join(out_uri, map_rel), png, cfg.storage)
        storage.write_bytes(storage.join(out_uri, over_rel),
                            images.encode_png(overlay(img, prob)), cfg.storage)
    except Exception as exc:  # noqa: BLE001 - the row says why, the run goes on
        row.error = storage.redact(f"unreadable: {type(exc).__name__}: {exc}")
        return
    row.score = score
    row.is_anomaly = bool(score > row.threshold)
    row.map_png, row.overlay_png = map_rel, over_rel


def to_csv(rows: list[Prediction]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in asdict(r).items()})
    return buf.getvalue()
