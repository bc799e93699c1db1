"""How an image of any size becomes the model's inputs (views), and how their maps come back.

The model always sees inputs of one size, ``size`` = (h, w) (``data.image_size``): its
prototypes are whole feature maps of that size (Zhang et al., CVPR 2023, Sec. 3.2), and a
batch must be one shape. A :class:`Geometry` says how a camera image of any size maps onto
such inputs, one way for every job (reference, training, validation, scoring, evaluation,
predict, export):

* **untiled**, ``fit="stretch"``: the whole image resized to ``size`` (the aspect ratio is
  lost; a 1500 x 1000 photo becomes 256 x 256). One view.
* **untiled**, ``fit="pad"``: resized to fit inside ``size`` with its aspect ratio kept, the
  rest padded by reflecting the image (top-left aligned). Padding rather than a different
  input shape per image, because the input shape is fixed; reflected content rather than
  black, because a black band is an edge the model would have to learn is normal. The padded
  band's map is discarded. One view.
* **tiled** (``scale`` set): the image resized by ``scale`` (1 = native pixels), padded the
  same way up to at least one tile, then cut into a grid of ``size`` tiles that overlap by at
  least ``overlap`` pixels (the last tile of a row or column is flush with the border, the
  others spread evenly). Maps come back blended over the overlaps (:meth:`Geometry.stitch`):
  each tile's weight falls linearly over ``overlap`` pixels towards its edges, where the
  convolutions' zero padding and the prior's blur see less of the image, so a defect on a
  tile border is counted once, from the tiles that see it best.

Every map comes back at the image's *working size* (the image at the model's scale: ``size``
when stretched, the fitted content when padded, the image times ``scale`` when tiled); the
scores contract then resizes it to the image's own resolution.

:func:`resolve` turns ``data.image_size`` / ``data.resize`` / ``data.tiles`` into a
Geometry, choosing tiles and their scale from a product's image sizes when ``tiles.mode`` is
``auto`` (:func:`auto_scale`). numpy + OpenCV only (no torch, no Ray).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np

Size = tuple[int, int]
VIEW_ALL = -2  # a row's ``view``: expand to every view of its image
VIEW_RANDOM = -1  # a row's ``view``: one grid view drawn from the row's seed
_VIEW_TAG = 0x56494557  # "VIEW": separates the view draw from the row's synthesis draws


def as_size(value: int | Sequence[int]) -> Size:
    """``256`` -> (256, 256); ``[h, w]`` -> (h, w)."""
    if isinstance(value, (int, np.integer)):
        return (int(value), int(value))
    h, w = value
    return (int(h), int(w))


def resize_to(img: np.ndarray, size: Size, nearest: bool = False) -> np.ndarray:
    """``img`` resized to ``size`` = (h, w). Images: INTER_AREA on a shrinking axis,
    INTER_LINEAR on an enlarging one (an image shrunk on one axis and enlarged on the other
    is resized in two passes, each axis with its own interpolation). Masks (``nearest``):
    nearest neighbour, values kept."""
    h, w = img.shape[:2]
    th, tw = int(size[0]), int(size[1])
    if (h, w) == (th, tw):
        return np.ascontiguousarray(img)
    if nearest:
        return cv2.resize(img, (tw, th), interpolation=cv2.INTER_NEAREST_EXACT)
    shrink_w, shrink_h = tw < w, th < h
    if shrink_w == shrink_h:
        interp = cv2.INTER_AREA if shrink_w else cv2.INTER_LINEAR
        return cv2.resize(img, (tw, th), interpolation=interp)
    if shrink_w:
        tmp = cv2.resize(img, (tw, h), interpolation=cv2.INTER_AREA)
        return cv2.resize(tmp, (tw, th), interpolation=cv2.INTER_LINEAR)
    tmp = cv2.resize(img, (w, th), interpolation=cv2.INTER_AREA)
    return cv2.resize(tmp, (tw, th), interpolation=cv2.INTER_LINEAR)


def pad_to(img: np.ndarray, size: Size, reflect: bool = True) -> np.ndarray:
    """``img`` padded at the bottom and right up to ``size`` (never cropped): mirrored
    content for images, zeros for masks (``reflect=False``)."""
    h, w = img.shape[:2]
    ph, pw = max(0, size[0] - h), max(0, size[1] - w)
    if not (ph or pw):
        return img
    if not reflect:
        return cv2.copyMakeBorder(img, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=0)
    out = img
    while out.shape[0] < size[0] or out.shape[1] < size[1]:
        # Reflection cannot reach farther than the image itself: grow in steps.
        h, w = out.shape[:2]
        ph, pw = min(size[0] - h, max(h - 1, 0)), min(size[1] - w, max(w - 1, 0))
        if ph == 0 and pw == 0:  # a 1-pixel image: repeat it
            return cv2.copyMakeBorder(out, 0, size[0] - h, 0, size[1] - w, cv2.BORDER_REPLICATE)
        out = cv2.copyMakeBorder(out, 0, ph, 0, pw, cv2.BORDER_REFLECT_101)
    return out


def axis_positions(length: int, tile: int, overlap: int) -> np.ndarray:
    """Tile origins along one side of ``length`` pixels: the fewest tiles of ``tile`` pixels
    that overlap by at least ``overlap``, spread evenly, the last flush with the end."""
    if length <= tile:
        return np.zeros(1, np.int64)
    step = tile - overlap
    n = math.ceil((length - overlap) / step)
    return np.round(np.linspace(0, length - tile, n)).astype(np.int64)


def ramp(length: int, overlap: int) -> np.ndarray:
    """Blending weight across one tile side: 1 inside, falling linearly towards both edges
    over ``overlap`` pixels (never 0, so a pixel that one tile alone covers keeps its value)."""
    d = np.minimum(np.arange(length), np.arange(length)[::-1]).astype(np.float32)
    return np.minimum(1.0, (d + 1.0) / (overlap + 1.0)).astype(np.float32)


def view_seed(seed: int, n: int) -> int:
    """The grid view a training row draws (uniform over ``n``), independent of its synthesis."""
    state = np.random.SeedSequence([int(seed) & ((1 << 63) - 1), _VIEW_TAG]).generate_state(1)
    return int(state[0] % max(1, n))


@dataclass(frozen=True)
class Geometry:
    """Model input size and how an image maps onto it (see the module doc)."""

    size: Size = (256, 256)
    fit: Literal["stretch", "pad"] = "stretch"  # untiled only
    scale: float | None = None  # tiled: the cut scale (1.0 = native pixels); None = untiled
    overlap: int = 32  # tiled: minimum overlap of neighbouring tiles, pixels at the cut scale

    @property
    def tiled(self) -> bool:
        return self.scale is not None

    # -- sizes ---------------------------------------------------------------------------

    def working_size(self, h: int, w: int) -> Size:
        """The image at the model's scale (its map comes back at this size)."""
        if self.scale is not None:
            return (max(1, round(h * self.scale)), max(1, round(w * self.scale)))
        if self.fit == "stretch":
            return self.size
        r = min(self.size[0] / h, self.size[1] / w)
        return (max(1, min(self.size[0], round(h * r))), max(1, min(self.size[1], round(w * r))))

    def canvas_size(self, h: int, w: int) -> Size:
        """The working image padded to hold at least one view."""
        hs, ws = self.working_size(h, w)
        return (max(hs, self.size[0]), max(ws, self.size[1]))

    def boxes(self, h: int, w: int) -> np.ndarray:
        """View origins (y0, x0) in the canvas, row-major: ``n x 2`` int64."""
        if self.scale is None:
            return np.zeros((1, 2), np.int64)
        ch, cw = self.canvas_size(h, w)
        ys = axis_positions(ch, self.size[0], self.overlap)
        xs = axis_positions(cw, self.size[1], self.overlap)
        return np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)

    def n_views(self, h: int, w: int) -> int:
        return len(self.boxes(h, w))

    # -- cutting -------------------------------------------------------------------------

    def canvas(self, image: np.ndarray, nearest: bool = False) -> np.ndarray:
        """The image (or a mask, ``nearest``) at its working size, padded to the canvas."""
        h, w = image.shape[:2]
        out = resize_to(image, self.working_size(h, w), nearest=nearest)
        return pad_to(out, self.canvas_size(h, w), reflect=not nearest)

    def crop(self, canvas: np.ndarray, origin: Sequence[int]) -> np.ndarray:
        y, x = int(origin[0]), int(origin[1])
        return np.ascontiguousarray(canvas[y:y + self.size[0], x:x + self.size[1]])

    def views(self, image: np.ndarray, which: Sequence[int] | None = None,
              nearest: bool = False) -> np.ndarray:
        """``n x h x w (x 3)`` views of an image (or mask) at the model's size: all of them,
        or the grid indices ``which``."""
        h, w = image.shape[:2]
        boxes = self.boxes(h, w)
        idx = range(len(boxes)) if which is None else which
        c = self.canvas(image, nearest)
        return np.stack([self.crop(c, boxes[i]) for i in idx])

    def defect_views(self, image: np.ndarray, mask: np.ndarray, max_views: int = 8
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
        """(view, mask view) pairs that show a defect at the model's scale: untiled, the one
        view; tiled, the grid tiles its mask reaches (what scoring will see, defects cut at
        tile borders included) and one tile centred on each defect region (the whole defect,
        away from any border), at most ``max_views``, grid tiles first. A defect whose mask
        is empty gives its first view, as an untiled one would."""
        if self.scale is None:
            return [(self.views(image)[0], self.views(mask, nearest=True)[0])]
        h, w = image.shape[:2]
        boxes = self.boxes(h, w)
        img_c, mask_c = self.canvas(image), self.canvas(mask, nearest=True)
        th, tw = self.size
        origins = [tuple(int(v) for v in b) for b in boxes
                   if mask_c[b[0]:b[0] + th, b[1]:b[1] + tw].any()]
        n, _, stats, centres = cv2.connectedComponentsWithStats(
            (mask_c > 0).astype(np.uint8), connectivity=8)
        ch, cw = mask_c.shape[:2]
        for k in np.argsort(-stats[1:, cv2.CC_STAT_AREA]) + 1:  # largest regions first
            cx, cy = centres[k]
            origin = (int(np.clip(round(cy - th / 2), 0, ch - th)),
                      int(np.clip(round(cx - tw / 2), 0, cw - tw)))
            if origin not in origins:
                origins.append(origin)
        origins = origins[:max_views] or [tuple(int(v) for v in boxes[0])]
        return [(self.crop(img_c, o), self.crop(mask_c, o)) for o in origins]

    # -- stitching -----------------------------------------------------------------------

    def weights(self) -> np.ndarray:
        """A tile's blending weights (``size``), see :func:`ramp`."""
        return np.outer(ramp(self.size[0], self.overlap), ramp(self.size[1], self.overlap))

    def stitch(self, maps: np.ndarray, h: int, w: int, which: Sequence[int] | None = None
               ) -> np.ndarray:
        """One map at the working size from the views' maps (``n x size``, float): blended
        over the overlaps (tiled), the padding cut off. ``which``: the grid indices of the
        given maps when they are not all of them (pixels no given view covers are NaN)."""
        maps = np.asarray(maps, np.float32)
        hs, ws = self.working_size(h, w)
        if self.scale is None:
            return np.ascontiguousarray(maps[0][:hs, :ws])
        boxes = self.boxes(h, w)
        idx = list(range(len(boxes))) if which is None else list(which)
        if len(idx) != len(maps):
            raise ValueError(f"{len(maps)} maps for {len(idx)} views")
        if len(boxes) == 1:  # one tile covers the image: its map, exactly
            return np.ascontiguousarray(maps[0][:hs, :ws])
        ch, cw = self.canvas_size(h, w)
        acc = np.zeros((ch, cw), np.float32)
        tot = np.zeros((ch, cw), np.float32)
        wt = self.weights()
        th, tw = self.size
        for m, i in zip(maps, idx):
            y, x = boxes[i]
            acc[y:y + th, x:x + tw] += m * wt
            tot[y:y + th, x:x + tw] += wt
        with np.errstate(invalid="ignore", divide="ignore"):
            out = acc / tot  # 0/0 = NaN where no given view reaches
        return np.ascontiguousarray(out[:hs, :ws])

    # -- documents -----------------------------------------------------------------------

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"size": list(self.size)}
        if self.scale is None:
            doc["fit"] = self.fit
        else:
            doc.update(tiles=True, scale=self.scale, overlap=self.overlap)
        return doc

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Geometry:
        size = as_size(doc["size"])
        if doc.get("tiles"):
            return cls(size, scale=float(doc["scale"]), overlap=int(doc["overlap"]))
        return cls(size, fit=doc.get("fit", "stretch"))

    def describe(self, h: int | None = None, w: int | None = None) -> str:
        """``"tiles of 256x256 at 0.469x (704x469: 6 tiles), overlap >= 32 px"``."""
        s = f"{self.size[0]}x{self.size[1]}"
        if self.scale is None:
            return (f"whole image to {s}" if self.fit == "stretch"
                    else f"whole image fitted into {s}, aspect kept, padded")
        where = "native" if self.scale == 1.0 else f"{self.scale:g}x"
        text = f"tiles of {s} at {where}"
        if h and w:
            hs, ws = self.working_size(h, w)
            text += f" ({ws}x{hs} from {w}x{h}: {self.n_views(h, w)} tiles)"
        return text + f", overlap >= {self.overlap} px"


# ----------------------------------------------------------------------------- the rule


def auto_scale(h: int, w: int, size: Size, overlap: int, max_tiles: int) -> float:
    """The cut scale for an ``h x w`` image: the largest scale (at most native) whose tile
    grid has at most ``max_tiles`` tiles, or, within 5 % of that scale, the one with the
    fewest tiles (a 1500 x 1000 image with 256-pixel tiles: 8 tiles at 0.48, 6 at 0.469).
    So the cost per image is bounded (about ``max_tiles`` squashed images) and the
    resolution is the most that cost buys, for any camera."""
    th, tw = size
    span = lambda n, t: n * (t - overlap) + overlap  # noqa: E731 - longest side n tiles cover
    best: list[tuple[float, int]] = []
    for n_h in range(1, max_tiles + 1):
        for n_w in range(1, max_tiles // n_h + 1):
            s = min(1.0, span(n_h, th) / h, span(n_w, tw) / w)
            s = math.floor(s * 1000) / 1000  # a readable factor, never more tiles than counted
            best.append((s, Geometry(size, scale=s, overlap=overlap).n_views(h, w)))
    top = max(s for s, _ in best)
    near = [(n, -s) for s, n in best if s >= 0.95 * top and n <= max_tiles]
    n, neg_s = min(near)
    return -neg_s


def shrink_factor(h: int, w: int, size: Size) -> float:
    """How much a squash to ``size`` shrinks an image: the geometric mean of its sides over
    the model's (2: a quarter of the pixels survive)."""
    return math.sqrt((h * w) / (size[0] * size[1]))


def resolve(data_cfg: Any, image_sizes: Sequence[Size] | None = None) -> Geometry:
    """The Geometry of ``data.image_size``, ``data.resize`` and ``data.tiles``.

    ``tiles.mode: auto`` needs the product's image sizes (a sample is enough: the median
    counts): tiles when a squash would shrink the median image by at least
    ``tiles.auto_ratio`` (:func:`shrink_factor`), else the untiled fit. ``tiles.scale:
    auto`` is :func:`auto_scale` of the median image."""
    size = as_size(data_cfg.image_size)
    tc = data_cfg.tiles
    untiled = Geometry(size, fit=data_cfg.resize)
    median: Size | None = None
    if image_sizes:
        arr = np.asarray(list(image_sizes), np.float64)
        median = (int(np.median(arr[:, 0])), int(np.median(arr[:, 1])))
    if tc.mode == "off":
        return untiled
    if tc.mode == "auto":
        if median is None:
            raise ValueError("data.tiles.mode auto needs the product's image sizes")
        if shrink_factor(*median, size) < tc.auto_ratio:
            return untiled
    if tc.scale == "native":
        scale = 1.0
    elif tc.scale == "auto":
        if median is None:
            raise ValueError("data.tiles.scale auto needs the product's image sizes")
        scale = auto_scale(*median, size, tc.overlap, tc.max_tiles)
    else:
        scale = float(tc.scale)
    return Geometry(size, scale=scale, overlap=tc.overlap)


def pinned(data_cfg: Any, geometry: Geometry) -> dict[str, Any]:
    """Config overrides that pin ``geometry`` (what ``auto`` chose) into a product's config,
    so its registered model, its checkpoints and every later job read the same choice."""
    if geometry.scale is None:
        return {"data.tiles.mode": "off", "data.resize": geometry.fit}
    return {"data.tiles.mode": "on", "data.tiles.scale": geometry.scale,
            "data.tiles.overlap": geometry.overlap}
