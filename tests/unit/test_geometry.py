"""How images become the model's inputs and their maps come back (prn_ray.geometry): views,
stitching, the automatic tile rule, and the scoring loop that uses them (prn_ray.inference)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from prn_ray.config import DataConfig, TilesConfig
from prn_ray.geometry import (
    VIEW_ALL,
    VIEW_RANDOM,
    Geometry,
    auto_scale,
    axis_positions,
    resize_to,
    resolve,
)
from prn_ray.images import decode_batch, encode_png
from prn_ray.inference import ScoreRule, stitch_items


def pixelwise(views: np.ndarray) -> np.ndarray:
    """A stand-in model whose map at a pixel depends on that pixel only (its red value), so a
    stitched map must equal the same function of the working image wherever tiles overlap."""
    return views[..., 0].astype(np.float32) / 255.0


def test_axis_positions_cover_overlap_and_end_flush():
    for length in (256, 257, 480, 704, 720, 1000, 4096):
        pos = axis_positions(length, 256, 32)
        assert pos[0] == 0 and pos[-1] + 256 == max(length, 256)
        assert (np.diff(pos) <= 256 - 32).all()  # neighbours overlap by >= 32 px
        fewer = np.round(np.linspace(0, length - 256, len(pos) - 1)) if len(pos) > 1 else None
        if fewer is not None and len(fewer) > 1:  # one tile fewer would not overlap enough
            assert (np.diff(fewer) > 256 - 32).any()


def test_one_tile_covering_the_image_gives_the_untiled_views_and_map():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)
    tiled = Geometry((256, 256), scale=256 / 300, overlap=32)
    whole = Geometry((256, 256))
    assert tiled.n_views(300, 300) == 1 and tiled.working_size(300, 300) == (256, 256)
    np.testing.assert_array_equal(tiled.views(img), whole.views(img))
    maps = pixelwise(whole.views(img))
    np.testing.assert_array_equal(tiled.stitch(maps, 300, 300), whole.stitch(maps, 300, 300))


def test_a_defect_across_a_tile_border_is_found_and_stitched_once():
    g = Geometry((64, 64), scale=1.0, overlap=16)
    img = np.full((100, 180, 3), 40, np.uint8)
    img[40:60, 54:74, 0] = 250  # across the right edge of the first column of tiles
    xs = sorted(set(g.boxes(100, 180)[:, 1].tolist()))
    assert any(x < 54 < x + 64 < 74 for x in xs)
    views = g.views(img)
    stitched = g.stitch(pixelwise(views), 100, 180)
    np.testing.assert_allclose(stitched, pixelwise(img[None])[0], atol=1e-6)
    labels, n = ndimage.label(stitched > 0.5)
    assert n == 1 and (labels > 0).sum() == 20 * 20  # one region, its own size: not doubled
    rule = ScoreRule("topk_mean", 100, 9)
    assert rule(stitched) == pytest.approx(250 / 255, abs=1e-6)


def test_blending_weights_keep_values_where_tiles_agree_and_average_where_they_do_not():
    g = Geometry((64, 64), scale=1.0, overlap=16)
    n = g.n_views(64, 100)
    assert n == 2
    a = np.ones((2, 64, 64), np.float32)
    np.testing.assert_allclose(g.stitch(a, 64, 100), 1.0)
    a[1] = 0.0  # the tiles disagree over their overlap: a smooth hand-over, no step
    out = g.stitch(a, 64, 100)
    row = out[32]
    assert row[0] == 1.0 and row[-1] == 0.0
    assert (np.diff(row) <= 1e-6).all()  # monotone across the overlap
    assert np.abs(np.diff(row)).max() < 0.2


def test_pad_keeps_the_aspect_ratio_and_crops_the_map_back():
    g = Geometry((64, 64), fit="pad")
    img = np.zeros((50, 200, 3), np.uint8)
    img[:, :100] = 200
    assert g.working_size(50, 200) == (16, 64)
    view = g.views(img)[0]
    assert view.shape == (64, 64, 3)
    np.testing.assert_array_equal(view[:16], resize_to(img, (16, 64)))
    assert g.stitch(np.ones((1, 64, 64)), 50, 200).shape == (16, 64)


def test_images_smaller_than_a_tile_are_padded_not_failed():
    g = Geometry((64, 64), scale=1.0, overlap=16)
    img = np.random.default_rng(1).integers(0, 256, (20, 300, 3), dtype=np.uint8)
    views = g.views(img)
    assert views.shape[1:] == (64, 64, 3) and len(views) == g.n_views(20, 300) == 6
    np.testing.assert_array_equal(views[0][:20, :64], img[:, :64])
    assert g.stitch(pixelwise(views), 20, 300).shape == (20, 300)


def test_auto_rule_tiles_large_images_only_and_bounds_the_tiles():
    data = DataConfig(image_size=256, tiles=TilesConfig(mode="auto"))
    big = resolve(data, [(1000, 1500)] * 3)
    assert big.tiled and big.n_views(1000, 1500) <= 8
    hs, ws = big.working_size(1000, 1500)
    assert min(hs, ws) > 256 * 1.5  # well above the squash's 256
    assert not resolve(data, [(256, 256)]).tiled
    assert not resolve(data, [(400, 500)]).tiled  # a squash shrinks it by < 2: not worth tiles
    wide = resolve(data, [(256, 4096)])
    assert wide.tiled and wide.n_views(256, 4096) <= 8
    for h, w in ((600, 800), (500, 1240), (3648, 5472)):
        s = auto_scale(h, w, (256, 256), 32, 8)
        g = Geometry((256, 256), scale=s, overlap=32)
        assert 0 < s <= 1 and g.n_views(h, w) <= 8
        # no scale a little larger fits in the same budget of tiles
        bigger = Geometry((256, 256), scale=min(1.0, s * 1.06), overlap=32)
        assert s == 1.0 or bigger.n_views(h, w) > 8 or bigger.n_views(h, w) >= g.n_views(h, w)
    with pytest.raises(ValueError, match="image sizes"):
        resolve(data, None)
    fixed = DataConfig(image_size=[128, 192], tiles=TilesConfig(mode="on", scale=0.5))
    assert resolve(fixed) == Geometry((128, 192), scale=0.5, overlap=32)


def test_geometry_document_roundtrip():
    for g in (Geometry((256, 256)), Geometry((96, 128), fit="pad"),
              Geometry((256, 256), scale=0.469, overlap=24)):
        assert Geometry.from_doc(g.to_doc()) == g


def test_decode_batch_cuts_views_by_the_rows_request(tmp_path):
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (120, 250, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    path.write_bytes(encode_png(img))
    g = Geometry((64, 64), scale=0.5, overlap=8)
    n = g.n_views(120, 250)
    batch = {"image_uri": np.array([str(path)] * 3, dtype=object),
             "view": np.array([VIEW_ALL, 1, VIEW_RANDOM]), "seed": np.array([0, 0, 7]),
             "tag": np.array(["all", "one", "random"], dtype=object)}
    out = decode_batch(batch, geometry=g)
    assert len(out["image"]) == n + 2
    assert out["tag"].tolist() == ["all"] * n + ["one", "random"]
    assert out["view"][:n].tolist() == list(range(n)) and out["view"][n] == 1
    np.testing.assert_array_equal(out["image"][:n], g.views(img))
    np.testing.assert_array_equal(out["image"][n], g.views(img)[1])
    again = decode_batch(batch, geometry=g)
    assert out["view"][-1] == again["view"][-1]  # the seed decides the random view
    assert (out["orig_height"] == 120).all() and (out["orig_width"] == 250).all()


def test_stitched_scores_follow_the_items():
    g = Geometry((64, 64), scale=1.0, overlap=16)
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (64, 100, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    views = np.concatenate([g.views(a), g.views(b)])
    items = np.array([0, 0, 1])
    idx = np.array([0, 1, 0])
    hs, ws = np.array([64, 64, 64]), np.array([100, 100, 64])
    rule = ScoreRule("max", 100, 9)
    got = stitch_items(pixelwise(views), items, idx, hs, ws, g, rule)
    assert [m.item for m in got] == [0, 1]
    np.testing.assert_allclose(got[0].amap, pixelwise(a[None])[0], atol=1e-6)
    assert got[0].score == pytest.approx(pixelwise(a[None]).max())
    # a validation anomaly synthesised on one tile of an image: the best of its views
    part = stitch_items(pixelwise(views[1:2]), np.array([5]), np.array([1]), hs[:1], ws[:1],
                        g, rule)
    assert part[0].score == pytest.approx(pixelwise(views[1:2]).max())


@pytest.mark.parametrize("kind", ["topk_mean", "max", "area"])
def test_score_rule_on_a_stitched_map_is_the_models_image_score(kind):
    """ScoreRule scores stitched maps without the model's full sort (a partition of the top k):
    the same value as ``image_score`` on every size, k larger than the map included, and a map
    with pixels no view reached (NaN) stays NaN, so the scorer turns it into an error row."""
    import torch

    from prn_ray.model.prn import image_score

    rng = np.random.default_rng(3)
    for shape in [(4, 6), (10, 10), (256, 256), (618, 927)]:
        m = (rng.random(shape) ** 4).astype(np.float32)
        want = float(image_score(torch.from_numpy(m)[None, None], kind, 100, 9)[0])
        # from the definition, independently of both implementations
        ref = {"topk_mean": np.sort(m.ravel())[::-1][:100].astype(np.float64).mean(),
               "max": m.max()}.get(kind, want)
        assert ScoreRule(kind, 100, 9)(m) == pytest.approx(want, abs=1e-6)
        assert ScoreRule(kind, 100, 9)(m) == pytest.approx(ref, abs=1e-6)
    m = np.ones((20, 20), np.float32)
    m[3, 3] = np.nan
    assert np.isnan(ScoreRule(kind, 100, 9)(m))
