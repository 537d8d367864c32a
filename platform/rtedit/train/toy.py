"""The toy editing world: 128x128 instruction edits whose targets are computed exactly.

Sources are crops of the photos that ship inside scikit-image (`skimage.data`, no download) and procedural scenes
(up to three shapes in a 3x3 grid on a plain, gradient, striped or checked background). Every family's target is a
pure function of the source (and the reference, for the palette family), so a model's output can be scored against
the ground truth. The eval split holds out source photos and some (family, attribute) combinations.

Every example is drawn from its own generator seeded by (seed, split, index): the same seed gives the same data,
and example i does not depend on how many examples are made.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from rtedit.train.data import EditExample, encode_png

SIZE = 128

# Photos inside the scikit-image wheel (no download needed); the eval split crops only the held-out ones.
TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                "colorwheel", "logo", "camera", "coins", "moon", "brick", "grass", "gravel", "cell", "page")
EVAL_PHOTOS = ("chelsea", "stereo_motorcycle", "clock")

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 90, 220),
    "yellow": (240, 210, 50), "purple": (150, 70, 200), "orange": (245, 140, 30),
}
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "centre": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}
CELL = SIZE / 3

GLOBAL_FAMILIES = ("grayscale", "invert", "hflip", "rotate90", "brighten", "darken", "identity")
LOCAL_FAMILIES = ("recolour", "remove", "add")
REFERENCE_FAMILIES = ("palette",)
FAMILIES = GLOBAL_FAMILIES + LOCAL_FAMILIES + REFERENCE_FAMILIES

# (family, attributes) combinations that only the eval split contains: an attribute subset matches.
HELD_OUT_COMBOS: tuple[tuple[str, dict[str, str]], ...] = (
    ("recolour", {"shape": "triangle", "colour": "blue"}),
    ("recolour", {"shape": "circle", "colour": "orange"}),
    ("add", {"shape": "diamond", "colour": "green"}),
    ("add", {"shape": "square", "position": "bottom right"}),
)
# Share of eval local-family examples forced onto a held-out combination.
EVAL_HELD_OUT_SHARE = 0.5

TEMPLATES: dict[str, tuple[str, ...]] = {
    "grayscale": ("make it black and white", "convert the image to grayscale", "turn the picture grey",
                  "remove all the colour", "desaturate it completely", "make this a greyscale photo"),
    "invert": ("invert the colours", "make a negative of the image", "invert it",
               "turn it into a photo negative", "swap every colour for its opposite"),
    "hflip": ("flip it horizontally", "mirror the image left to right", "flip the picture left-right",
              "make a mirror image", "reflect it horizontally"),
    "rotate90": ("rotate it 90 degrees {direction}", "turn the picture a quarter turn {direction}",
                 "rotate the image {direction} by 90 degrees", "give it a quarter turn {direction}"),
    "brighten": ("make it brighter", "brighten the image", "increase the brightness", "lighten it up",
                 "make the picture lighter"),
    "darken": ("make it darker", "darken the image", "reduce the brightness", "dim the picture",
               "make the picture darker"),
    "identity": ("leave it unchanged", "keep the image as it is", "do nothing", "no changes please",
                 "return the same picture", "don't change anything"),
    "recolour": ("recolour the {shape} {colour}", "make the {shape} {colour}", "paint the {shape} {colour}",
                 "turn the {shape} {colour}", "change the colour of the {shape} to {colour}"),
    "remove": ("remove the {shape}", "delete the {shape}", "take the {shape} away", "get rid of the {shape}",
               "erase the {shape}"),
    "add": ("add {a} {colour} {shape} at the {position}", "put {a} {colour} {shape} in the {position}",
            "draw {a} {colour} {shape} at the {position}", "place {a} {colour} {shape} at the {position}"),
    "palette": ("paint it in the colours of the reference", "recolour it with the reference palette",
                "use the colours of the reference image", "apply the reference's palette",
                "map its tones onto the reference colours"),
}
# Wording of the rotate90 direction attribute (np.rot90 turns counterclockwise for k=1).
DIRECTIONS = {"clockwise": -1, "counterclockwise": 1}


# ---------------------------------------------------------------------------------------------------------------
# Exact edits


def grayscale(x: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma in integer arithmetic (rounded), repeated on three channels."""
    x = x.astype(np.int32)
    luma = (299 * x[..., 0] + 587 * x[..., 1] + 114 * x[..., 2] + 500) // 1000
    return np.repeat(luma[..., None], 3, axis=2).astype(np.uint8)


def brighten(x: np.ndarray) -> np.ndarray:
    """Move every channel 40% of the way to white (rounded)."""
    x = x.astype(np.int32)
    return (x + ((255 - x) * 2 + 2) // 5).astype(np.uint8)


def darken(x: np.ndarray) -> np.ndarray:
    """Scale every channel by 0.6 (rounded)."""
    return ((x.astype(np.int32) * 3 + 2) // 5).astype(np.uint8)


def apply_global(family: str, source: np.ndarray, attributes: Mapping[str, Any] | None = None) -> np.ndarray:
    """The exact target of a global family on any uint8 HxWx3 source."""
    attributes = attributes or {}
    if family == "grayscale":
        out = grayscale(source)
    elif family == "invert":
        out = 255 - source
    elif family == "hflip":
        out = source[:, ::-1]
    elif family == "rotate90":
        out = np.rot90(source, k=DIRECTIONS[attributes.get("direction", "counterclockwise")])
    elif family == "brighten":
        out = brighten(source)
    elif family == "darken":
        out = darken(source)
    elif family == "identity":
        out = source
    else:
        raise ValueError(f"family must be one of {GLOBAL_FAMILIES}, got {family!r}")
    return np.ascontiguousarray(out, dtype=np.uint8)


def palette_transfer(source: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Gradient map: the luma of each pixel, in four equal bins, picks the palette colour of that rank."""
    bins = grayscale(source)[..., 0] // 64
    return palette[bins].astype(np.uint8)


def palette_reference(palette: np.ndarray) -> np.ndarray:
    """The reference image of a palette: four horizontal bands, darkest colour on top."""
    return np.repeat(palette, SIZE // len(palette), axis=0)[:, None, :].repeat(SIZE, axis=1).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Photos


@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """One skimage.data photo as uint8 HxWx3 (grey repeated, RGBA composited on white)."""
    import skimage.data

    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):  # stereo_motorcycle returns (left, right, disparity)
        image = image[0]
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.shape[2] == 4:
        alpha = image[..., 3:4].astype(np.int32)
        image = (image[..., :3].astype(np.int32) * alpha + 255 * (255 - alpha) + 127) // 255
    return np.ascontiguousarray(image, dtype=np.uint8)


def photo_crop(rng: np.random.Generator, names: tuple[str, ...]) -> tuple[np.ndarray, dict[str, Any]]:
    """A random square crop of a random photo, resized to SIZE; returns it and where it came from."""
    name = names[rng.integers(len(names))]
    photo = load_photo(name)
    h, w = photo.shape[:2]
    side = int(rng.integers(SIZE, min(h, w, 3 * SIZE) + 1))
    top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
    crop = photo[top:top + side, left:left + side]
    if side != SIZE:
        crop = np.asarray(Image.fromarray(crop).resize((SIZE, SIZE), Image.Resampling.BILINEAR))
    return np.ascontiguousarray(crop), {"photo": name, "crop": [top, left, side]}


# ---------------------------------------------------------------------------------------------------------------
# Procedural scenes


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    position: str
    radius: int
    dx: int
    dy: int


@dataclass(frozen=True)
class Scene:
    background: str
    colours: tuple[tuple[int, int, int], tuple[int, int, int]]
    shapes: tuple[Shape, ...] = field(default_factory=tuple)

    def with_shapes(self, shapes: tuple[Shape, ...]) -> Scene:
        return Scene(self.background, self.colours, tuple(shapes))

    def find(self, kind: str) -> Shape:
        return next(s for s in self.shapes if s.kind == kind)


_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5


def shape_mask(shape: Shape) -> np.ndarray:
    """Boolean SIZE x SIZE mask of one shape, centred in its grid cell plus its jitter."""
    row, col = POSITIONS[shape.position]
    cx, cy = (col + 0.5) * CELL + shape.dx, (row + 0.5) * CELL + shape.dy
    dx, dy, r = _XX - cx, _YY - cy, float(shape.radius)
    if shape.kind == "circle":
        return dx * dx + dy * dy <= r * r
    if shape.kind == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    if shape.kind == "triangle":  # apex up, base at 0.75 r below the centre
        return (dy <= 0.75 * r) & (np.abs(dx) <= (dy + r) / 1.75)
    if shape.kind == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.1 * r
    raise ValueError(f"shape kind must be one of {SHAPES}, got {shape.kind!r}")


def render_background(scene: Scene) -> np.ndarray:
    a, b = (np.array(c, np.float64) for c in scene.colours)
    if scene.background == "solid":
        t = np.zeros((SIZE, SIZE))
    elif scene.background == "vgradient":
        t = _YY / SIZE
    elif scene.background == "hgradient":
        t = _XX / SIZE
    elif scene.background == "stripes":
        t = ((_YY // 16) % 2).astype(np.float64)
    elif scene.background == "checker":
        t = (((_YY // 32) + (_XX // 32)) % 2).astype(np.float64)
    else:
        raise ValueError(f"unknown background {scene.background!r}")
    return np.rint(a + (b - a) * t[..., None]).astype(np.uint8)


def render_scene(scene: Scene) -> np.ndarray:
    """The scene as uint8 SIZE x SIZE x 3; shapes never overlap (one per grid cell)."""
    image = render_background(scene)
    for shape in scene.shapes:
        image[shape_mask(shape)] = COLOURS[shape.colour]
    return image


def _random_shape(rng: np.random.Generator, kind: str, colour: str, position: str) -> Shape:
    return Shape(kind, colour, position, int(rng.integers(11, 18)), int(rng.integers(-3, 4)),
                 int(rng.integers(-3, 4)))


def random_scene(rng: np.random.Generator, kinds: list[str], colours: list[str] | None = None,
                 free: tuple[str, ...] = ()) -> Scene:
    """A scene with one shape of each kind given, in distinct cells, leaving the `free` positions empty."""
    background = ("solid", "vgradient", "hgradient", "stripes", "checker")[rng.integers(5)]
    # Backgrounds are greys with a slight tint, so saturated shape colours always stand out.
    pair = []
    for _ in range(2):
        grey = int(rng.integers(60, 201))
        pair.append(tuple(int(np.clip(grey + rng.integers(-20, 21), 0, 255)) for _ in range(3)))
    cells = [p for p in POSITIONS if p not in free]
    chosen = rng.permutation(len(cells))[:len(kinds)]
    names = list(COLOURS)
    shapes = []
    for i, kind in enumerate(kinds):
        colour = colours[i] if colours and colours[i] else names[rng.integers(len(names))]
        shapes.append(_random_shape(rng, kind, colour, cells[chosen[i]]))
    return Scene(background, (pair[0], pair[1]), tuple(shapes))


def _random_kinds(rng: np.random.Generator, count: int, include: str | None = None,
                  exclude: str | None = None) -> list[str]:
    pool = [k for k in SHAPES if k not in (include, exclude)]
    kinds = [pool[i] for i in rng.permutation(len(pool))[:count - (include is not None)]]
    if include is not None:
        kinds.insert(int(rng.integers(len(kinds) + 1)), include)
    return kinds


# ---------------------------------------------------------------------------------------------------------------
# Examples


@dataclass
class ToyExample:
    """One toy edit with its arrays; `attributes` says exactly which edit it is."""

    id: str
    family: str
    instruction: str
    attributes: dict[str, Any]
    source: np.ndarray
    target: np.ndarray
    references: list[np.ndarray]
    split: str
    origin: dict[str, Any]

    def to_edit_example(self) -> EditExample:
        attributes = {**self.attributes, "origin": self.origin}
        return EditExample(id=self.id, source=encode_png(self.source), instruction=self.instruction,
                           family=self.family, target=encode_png(self.target), attributes=attributes,
                           references=[encode_png(r) for r in self.references], split=self.split)


def is_held_out(family: str, attributes: Mapping[str, Any]) -> bool:
    """Whether (family, attributes) matches a held-out combination (an attribute subset)."""
    return any(family == f and all(attributes.get(k) == v for k, v in combo.items())
               for f, combo in HELD_OUT_COMBOS)


def _wording(rng: np.random.Generator, family: str, attributes: Mapping[str, Any]) -> str:
    templates = TEMPLATES[family]
    article = "an" if str(attributes.get("colour", "x"))[:1] in "aeiou" else "a"
    return templates[rng.integers(len(templates))].format(a=article, **attributes)


def _pick(rng: np.random.Generator, options) -> Any:
    options = list(options)
    return options[rng.integers(len(options))]


def _local_attributes(rng: np.random.Generator, family: str, held_out: bool) -> dict[str, str]:
    """Attributes of a local edit: a held-out combination completed at random, or any combination that is not."""
    while True:
        if held_out:
            combos = [c for f, c in HELD_OUT_COMBOS if f == family]
            if not combos:  # no combination of this family is held out
                held_out = False
                continue
            attributes = dict(_pick(rng, combos))
        else:
            attributes = {}
        attributes.setdefault("shape", _pick(rng, SHAPES))
        if family in ("recolour", "add"):
            attributes.setdefault("colour", _pick(rng, COLOURS))
        if family == "add":
            attributes.setdefault("position", _pick(rng, POSITIONS))
        if held_out or not is_held_out(family, attributes):
            return attributes


def _local_example(rng: np.random.Generator, family: str, held_out: bool):
    attributes = _local_attributes(rng, family, held_out)
    shape = attributes["shape"]
    if family == "recolour":
        kinds = _random_kinds(rng, int(rng.integers(1, 4)), include=shape)
        others = [c for c in COLOURS if c != attributes["colour"]]
        colours = [_pick(rng, others) if k == shape else None for k in kinds]
        scene = random_scene(rng, kinds, colours)
        edited = scene.with_shapes(tuple(
            Shape(s.kind, attributes["colour"], s.position, s.radius, s.dx, s.dy) if s.kind == shape else s
            for s in scene.shapes))
    elif family == "remove":
        scene = random_scene(rng, _random_kinds(rng, int(rng.integers(1, 4)), include=shape))
        edited = scene.with_shapes(tuple(s for s in scene.shapes if s.kind != shape))
    else:  # add
        scene = random_scene(rng, _random_kinds(rng, int(rng.integers(0, 3)), exclude=shape),
                             free=(attributes["position"],))
        added = _random_shape(rng, shape, attributes["colour"], attributes["position"])
        edited = scene.with_shapes(scene.shapes + (added,))
    origin = {"scene": [[s.kind, s.colour, s.position] for s in scene.shapes], "background": scene.background}
    return attributes, render_scene(scene), render_scene(edited), [], origin


def _source(rng: np.random.Generator, split: str, photo_share: float) -> tuple[np.ndarray, dict[str, Any]]:
    if rng.random() < photo_share:
        return photo_crop(rng, TRAIN_PHOTOS if split == "train" else EVAL_PHOTOS)
    scene = random_scene(rng, _random_kinds(rng, int(rng.integers(0, 4))))
    return render_scene(scene), {"scene": [[s.kind, s.colour, s.position] for s in scene.shapes],
                                 "background": scene.background}


def make_example(seed: int, split: str, index: int, families: tuple[str, ...] = FAMILIES) -> ToyExample:
    """Example `index` of a split: a pure function of (seed, split, index, families)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, ("train", "eval").index(split), index]))
    family = families[rng.integers(len(families))]
    if family in GLOBAL_FAMILIES:
        attributes = {"direction": _pick(rng, DIRECTIONS)} if family == "rotate90" else {}
        source, origin = _source(rng, split, photo_share=0.6)
        target, references = apply_global(family, source, attributes), []
    elif family in LOCAL_FAMILIES:
        held_out = split == "eval" and rng.random() < EVAL_HELD_OUT_SHARE
        attributes, source, target, references, origin = _local_example(rng, family, held_out)
    elif family == "palette":
        attributes = {}
        source, origin = _source(rng, split, photo_share=0.5)
        palette = rng.integers(0, 256, size=(4, 3))
        palette = palette[np.argsort(grayscale(palette[None].astype(np.uint8))[0, :, 0], kind="stable")]
        target, references = palette_transfer(source, palette), [palette_reference(palette)]
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return ToyExample(id=f"{split}-{seed}-{index:07d}", family=family,
                      instruction=_wording(rng, family, attributes), attributes=attributes, source=source,
                      target=target, references=references, split=split, origin=origin)


def generate(n: int, seed: int, split: str, families: tuple[str, ...] = FAMILIES) -> Iterator[ToyExample]:
    """The first n examples of a split."""
    for index in range(n):
        yield make_example(seed, split, index, families)


def describe(examples: list[ToyExample]) -> dict[str, Any]:
    """Counts per family and how many examples sit on held-out combinations (for the data manifest)."""
    families: dict[str, int] = {}
    held = 0
    for e in examples:
        families[e.family] = families.get(e.family, 0) + 1
        held += is_held_out(e.family, e.attributes)
    return {"n": len(examples), "families": dict(sorted(families.items())), "held_out_combos": held}
