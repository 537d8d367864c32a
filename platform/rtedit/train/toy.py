"""The toy editing world: 128x128 instruction edits whose targets are computed exactly.

Sources are crops of the photos that ship inside scikit-image (`skimage.data`, no download) and procedural scenes
(up to three shapes in a 3x3 grid on a plain, gradient, striped or checked background). Every family's target is a
pure function of the source (and the reference, for the palette family), so a model's output can be scored against
the ground truth. The eval split holds out source photos and some (family, attribute) combinations.

Every example is drawn from its own generator seeded by (seed, split, index): the same seed gives the same data,
and example i does not depend on how many examples are made.

Two worlds share these rules. World 1 (the default, kept byte for byte: models/toy-editor was trained on it) draws
filled, hard-edged shapes in six exact colours on tinted grey backgrounds, worded by TEMPLATES. World 2
(`world=2`, `make_toy_data --world 2`) is a superset: TEMPLATES_2's wordings (every world-1 one plus everyday
ones such as "make it grayscale", and local edits that name the shape's current colour, "make the red circle blue"),
shapes drawn filled, anti-aliased, as a stroke or slightly irregular by hand, in shades of their colour (pure
red is red too), one large shape alone as a user draws it, and white, dark and photo backgrounds. Its targets are
exact too: a recolour repaints the shape's own coverage in the named colour, a removal restores the background.
"""

from __future__ import annotations

import dataclasses
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

# World 2's wordings: every world-1 template, then everyday ones. {old_colour} names the shape's current colour
# (world 2's recolour and remove examples always know it: one shape of each kind per scene).
_MORE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "grayscale": ("make it grayscale", "make it greyscale", "make it gray", "make it grey", "turn it black and white",
                  "convert it to black and white", "make the image black and white", "make the photo grayscale",
                  "make the picture greyscale", "turn it grayscale", "desaturate it", "remove the colours",
                  "remove the colors", "make it monochrome", "convert to grayscale", "make everything grey"),
    "invert": ("invert the colors", "invert colours", "invert the image", "make it a negative",
               "make it look like a negative", "negate the colours", "invert the picture's colors"),
    "hflip": ("flip it", "flip the image", "flip horizontally", "mirror it", "mirror the image",
              "flip it left to right", "flip the image horizontally", "mirror it horizontally"),
    "rotate90": ("rotate it {direction}", "rotate {direction}", "rotate the image 90 degrees {direction}",
                 "turn it 90 degrees {direction}", "rotate it by 90 degrees {direction}",
                 "rotate 90 degrees {direction}", "rotate the picture {direction}"),
    "brighten": ("make it lighter", "brighten it", "make the image brighter", "make the picture brighter",
                 "make the photo brighter", "increase the brightness of the image", "brighten it up"),
    "darken": ("darken it", "make the image darker", "decrease the brightness", "make it dimmer",
               "make the photo darker", "lower the brightness", "darken the picture"),
    "identity": ("keep it the same", "leave it as it is", "change nothing", "leave the image alone",
                 "keep everything as it is"),
    "recolour": ("color the {shape} {colour}", "colour the {shape} {colour}", "recolor the {shape} {colour}",
                 "change the {shape} to {colour}", "make the {shape} {colour} instead",
                 "change the color of the {shape} to {colour}",
                 "make the {old_colour} {shape} {colour}", "recolour the {old_colour} {shape} {colour}",
                 "recolor the {old_colour} {shape} {colour}", "paint the {old_colour} {shape} {colour}",
                 "turn the {old_colour} {shape} {colour}", "change the {old_colour} {shape} to {colour}",
                 "change the colour of the {old_colour} {shape} to {colour}",
                 "colour the {old_colour} {shape} {colour}", "make the {old_colour} {shape} {colour} instead"),
    "remove": ("take away the {shape}", "remove the {shape} from the picture", "delete the {shape} from the image",
               "remove the {old_colour} {shape}", "delete the {old_colour} {shape}", "erase the {old_colour} {shape}",
               "get rid of the {old_colour} {shape}", "take the {old_colour} {shape} away",
               "take away the {old_colour} {shape}"),
    "add": ("add {a} {colour} {shape} to the {position}", "add {a} {colour} {shape} in the {position}",
            "draw {a} {colour} {shape} in the {position}", "put {a} {colour} {shape} at the {position}",
            "insert {a} {colour} {shape} at the {position}"),
    "palette": ("recolor it with the reference palette", "use the reference image's colours",
                "use the colors of the reference", "paint it like the reference image"),
}
TEMPLATES_2: dict[str, tuple[str, ...]] = {f: TEMPLATES[f] + _MORE_TEMPLATES[f] for f in TEMPLATES}
WORLDS = (1, 2)
LATEST_WORLD = 2
# What a newcomer typed that world 1 never said (issue 14): eval_edit checks them beside the model's own examples.
NEWCOMER_INSTRUCTIONS = ("make it grayscale", "make the red circle blue", "remove the red circle")


def templates(world: int = 1) -> dict[str, tuple[str, ...]]:
    """The wording templates of a world, per family."""
    if world not in WORLDS:
        raise ValueError(f"world must be one of {WORLDS}, got {world!r}")
    return TEMPLATES if world == 1 else TEMPLATES_2


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
    # World 2 only (the defaults draw world 1's filled, hard-edged shape in the colour's exact RGB):
    style: str = "filled"
    """One of STYLES: filled or a stroke ("outline"), hard-edged or anti-aliased ("soft"), regular or "hand"-drawn."""
    rgb: tuple[int, int, int] | None = None
    """The shade it is drawn in (None: COLOURS[colour])."""
    stroke: float = 0.0
    """Stroke width in pixels of an outline style."""
    wobble: tuple[tuple[int, float, float], ...] = ()
    """(harmonic, relative amplitude, phase) terms bending a hand-drawn outline."""


@dataclass(frozen=True)
class Scene:
    background: str
    colours: tuple[tuple[int, int, int], tuple[int, int, int]]
    shapes: tuple[Shape, ...] = field(default_factory=tuple)
    backdrop: np.ndarray | None = field(default=None, compare=False)
    """World 2's photo background (uint8 SIZE x SIZE x 3), drawn instead of `background` when set."""

    def with_shapes(self, shapes: tuple[Shape, ...]) -> Scene:
        return Scene(self.background, self.colours, tuple(shapes), self.backdrop)

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
    image = scene.backdrop.copy() if scene.backdrop is not None else render_background(scene)
    for shape in scene.shapes:
        if shape.style == "filled" and shape.rgb is None and not shape.wobble:  # world 1's shapes, bit for bit
            image[shape_mask(shape)] = COLOURS[shape.colour]
            continue
        alpha = shape_alpha(shape)[..., None]
        colour = np.array(shape.rgb if shape.rgb is not None else COLOURS[shape.colour], np.float64)
        image = np.rint(image * (1.0 - alpha) + colour * alpha).astype(np.uint8)
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
# World 2: drawn shapes of several styles, shades, white / dark / photo backgrounds

STYLES = ("filled", "soft", "outline", "soft outline", "hand", "hand outline")
STYLE_WEIGHTS = (0.3, 0.2, 0.15, 0.1, 0.15, 0.1)
SUPERSAMPLE = 4  # an anti-aliased ("soft") style's coverage: the share of 4x4 sub-pixel samples inside
# Shades a user's paint program gives each colour name, beside COLOURS' own.
SHADES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "red": ((255, 0, 0), (200, 0, 0)), "green": ((0, 255, 0), (0, 128, 0)), "blue": ((0, 0, 255), (0, 100, 255)),
    "yellow": ((255, 255, 0), (255, 220, 0)), "purple": ((128, 0, 128), (160, 32, 240)),
    "orange": ((255, 165, 0), (255, 128, 0)),
}
_SUB = (np.arange(SIZE * SUPERSAMPLE, dtype=np.float64) + 0.5) / SUPERSAMPLE
_YY_SUB, _XX_SUB = np.meshgrid(_SUB, _SUB, indexing="ij")


# How fast each kind's gauge grows per pixel across its outline, times the radius (the triangle's slanted sides).
GAUGE_SLOPE = {"circle": 1.0, "square": 1 / 0.85, "triangle": float(np.hypot(1.75, 1.0)), "diamond": 2**0.5 / 1.1}


def shape_centre(shape: Shape) -> tuple[float, float]:
    row, col = POSITIONS[shape.position]
    return (col + 0.5) * CELL + shape.dx, (row + 0.5) * CELL + shape.dy


def shape_gauge(kind: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """How far out a point lies, as the factor the shape must be scaled by about its centre to reach it (1 on the
    outline): world 1's masks are exactly gauge <= 1."""
    if kind == "circle":
        return np.sqrt(dx * dx + dy * dy) / r
    if kind == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) / (0.85 * r)
    if kind == "triangle":  # apex up at -r, base at 0.75 r below the centre
        return np.maximum(dy / (0.75 * r), (1.75 * np.abs(dx) - dy) / r)
    if kind == "diamond":
        return (np.abs(dx) + np.abs(dy)) / (1.1 * r)
    raise ValueError(f"shape kind must be one of {SHAPES}, got {kind!r}")


def shape_alpha(shape: Shape) -> np.ndarray:
    """SIZE x SIZE coverage in [0, 1] of a shape in its style: 0 or 1 when hard-edged, the sub-pixel share when soft."""
    if shape.style not in STYLES:
        raise ValueError(f"shape style must be one of {STYLES}, got {shape.style!r}")
    cx, cy = shape_centre(shape)
    soft = "soft" in shape.style
    xx, yy = (_XX_SUB, _YY_SUB) if soft else (_XX, _YY)
    dx, dy, r = xx - cx, yy - cy, float(shape.radius)
    gauge = shape_gauge(shape.kind, dx, dy, r)
    if shape.wobble:
        theta = np.arctan2(dy, dx)
        gauge = gauge / (1.0 + sum(a * np.sin(k * theta + phase) for k, a, phase in shape.wobble))
    if "outline" in shape.style:
        half = shape.stroke * GAUGE_SLOPE[shape.kind] / (2.0 * r)  # a stroke about `stroke` pixels wide
        inside = (gauge <= 1.0 + half) & (gauge >= 1.0 - half)
    else:
        inside = gauge <= 1.0
    if not soft:
        return inside.astype(np.float64)
    return inside.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean(axis=(1, 3))


def _shade(rng: np.random.Generator, colour: str) -> tuple[int, int, int] | None:
    """A shade of the named colour: its exact COLOURS value (None), a paint program's, or a jittered one."""
    draw = rng.random()
    if draw < 0.4:
        return None
    if draw < 0.7:
        return SHADES[colour][rng.integers(len(SHADES[colour]))]
    return tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in COLOURS[colour])


def _styled_shape(rng: np.random.Generator, kind: str, colour: str, position: str, big: bool = False,
                  style: str | None = None, shade: bool = True) -> Shape:
    """A world-2 shape: a grid cell's size (11-20 px) or, `big`, one large shape (20-44 px) near the centre."""
    radius = int(rng.integers(20, 45)) if big else int(rng.integers(11, 21))
    jitter = 10 if big else 3
    dx, dy = int(rng.integers(-jitter, jitter + 1)), int(rng.integers(-jitter, jitter + 1))
    if style is None:
        style = STYLES[rng.choice(len(STYLES), p=STYLE_WEIGHTS)]
    stroke = float(rng.uniform(2.0, max(2.5, min(7.0, radius / 3)))) if "outline" in style else 0.0
    wobble: tuple[tuple[int, float, float], ...] = ()
    if "hand" in style:
        wobble = tuple((k, float(rng.uniform(0.01, 0.06)), float(rng.uniform(0, 2 * np.pi))) for k in (2, 3, 5))
    rgb = _shade(rng, colour) if shade else None
    return Shape(kind, colour, "centre" if big else position, radius, dx, dy, style, rgb, stroke, wobble)


def _backdrop_2(rng: np.random.Generator, split: str) -> tuple[str, tuple, np.ndarray | None, dict[str, Any]]:
    """World 2's background: tinted grey as world 1 (55 %), near white (25 %), near black (10 %) or a photo."""
    kind = rng.choice(4, p=(0.55, 0.25, 0.1, 0.1))
    if kind == 3:
        photo, where = photo_crop(rng, TRAIN_PHOTOS if split == "train" else EVAL_PHOTOS)
        return "photo", ((0, 0, 0), (0, 0, 0)), photo, where
    low, high, tint = ((60, 200, 20), (215, 255, 6), (0, 50, 8))[kind]
    pair = []
    for _ in range(2):
        grey = int(rng.integers(low, high + 1))
        pair.append(tuple(int(np.clip(grey + rng.integers(-tint, tint + 1), 0, 255)) for _ in range(3)))
    plain = kind == 1 and rng.random() < 0.6  # paper: mostly one flat colour
    background = "solid" if plain else ("solid", "vgradient", "hgradient", "stripes", "checker")[rng.integers(5)]
    return background, (pair[0], pair[1]), None, {}


def random_scene_2(rng: np.random.Generator, kinds: list[str], colours: list[str | None] | None = None,
                   free: tuple[str, ...] = (), split: str = "train", big: bool = False,
                   backdrop: np.ndarray | None = None) -> tuple[Scene, dict[str, Any]]:
    """A world-2 scene (one shape of each kind given, styled) and where its background came from. `big`: a single
    large shape (len(kinds) must be 1); `backdrop`: this photo as the background."""
    background, pair, photo, where = _backdrop_2(rng, split)
    if backdrop is not None:
        background, photo, where = "photo", backdrop, {}
    names = list(COLOURS)
    shapes = []
    if big and len(kinds) != 1:
        raise ValueError(f"a big shape is drawn alone, got kinds {kinds}")
    cells = [p for p in POSITIONS if p not in free]
    chosen = rng.permutation(len(cells))[:len(kinds)]
    for i, kind in enumerate(kinds):
        colour = colours[i] if colours and colours[i] else names[rng.integers(len(names))]
        shapes.append(_styled_shape(rng, kind, colour, cells[chosen[i]], big=big))
    return Scene(background, pair, tuple(shapes), photo), where


def _origin_2(scene: Scene, where: dict[str, Any]) -> dict[str, Any]:
    return {"scene": [[s.kind, s.colour, s.position, s.style] for s in scene.shapes],
            "background": scene.background, **({"backdrop": where} if where else {})}


def _local_example_2(rng: np.random.Generator, family: str, attributes: dict[str, str], split: str,
                     backdrop: np.ndarray | None = None):
    """A world-2 local edit with the given attributes; recolour and remove attributes gain the shape's old_colour."""
    shape = attributes["shape"]
    if family in ("recolour", "remove"):
        big = rng.random() < 0.25
        kinds = [shape] if big else _random_kinds(rng, int(rng.integers(1, 4)), include=shape)
        old = attributes.get("old_colour") or _pick(rng, [c for c in COLOURS if c != attributes.get("colour")])
        attributes["old_colour"] = old
        scene, where = random_scene_2(rng, kinds, [old if k == shape else None for k in kinds], split=split, big=big,
                                      backdrop=backdrop)
        if family == "recolour":  # the shape's own coverage, repainted in the named colour's exact RGB
            edited = scene.with_shapes(tuple(
                dataclasses.replace(s, colour=attributes["colour"], rgb=None) if s.kind == shape else s
                for s in scene.shapes))
        else:
            edited = scene.with_shapes(tuple(s for s in scene.shapes if s.kind != shape))
    else:  # add: a filled, hard-edged shape in the exact colour (what the instruction names, no more)
        scene, where = random_scene_2(rng, _random_kinds(rng, int(rng.integers(0, 3)), exclude=shape),
                                      free=(attributes["position"],), split=split, backdrop=backdrop)
        added = _styled_shape(rng, shape, attributes["colour"], attributes["position"], style="filled", shade=False)
        edited = scene.with_shapes(scene.shapes + (added,))
    return attributes, render_scene(scene), render_scene(edited), [], _origin_2(scene, where)


def _source_2(rng: np.random.Generator, split: str, photo_share: float) -> tuple[np.ndarray, dict[str, Any]]:
    if rng.random() < photo_share:
        return photo_crop(rng, TRAIN_PHOTOS if split == "train" else EVAL_PHOTOS)
    big = rng.random() < 0.2
    kinds = [_pick(rng, SHAPES)] if big else _random_kinds(rng, int(rng.integers(0, 4)))
    scene, where = random_scene_2(rng, kinds, split=split, big=big)
    return render_scene(scene), _origin_2(scene, where)


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


def _wording(rng: np.random.Generator, family: str, attributes: Mapping[str, Any], world: int = 1) -> str:
    options = templates(world)[family]
    return fill_template(options[rng.integers(len(options))], attributes)


def fill_template(template: str, attributes: Mapping[str, Any]) -> str:
    article = "an" if str(attributes.get("colour", "x"))[:1] in "aeiou" else "a"
    return template.format(a=article, **attributes)


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


def make_example(seed: int, split: str, index: int, families: tuple[str, ...] = FAMILIES,
                 world: int = 1) -> ToyExample:
    """Example `index` of a split: a pure function of (seed, split, index, families, world)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if world not in WORLDS:
        raise ValueError(f"world must be one of {WORLDS}, got {world!r}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, ("train", "eval").index(split), index]))
    family = families[rng.integers(len(families))]
    source_of = _source if world == 1 else _source_2
    if family in GLOBAL_FAMILIES:
        attributes = {"direction": _pick(rng, DIRECTIONS)} if family == "rotate90" else {}
        source, origin = source_of(rng, split, photo_share=0.6)
        target, references = apply_global(family, source, attributes), []
    elif family in LOCAL_FAMILIES:
        held_out = split == "eval" and rng.random() < EVAL_HELD_OUT_SHARE
        if world == 1:
            attributes, source, target, references, origin = _local_example(rng, family, held_out)
        else:
            attributes = _local_attributes(rng, family, held_out)
            attributes, source, target, references, origin = _local_example_2(rng, family, attributes, split)
    elif family == "palette":
        attributes = {}
        source, origin = source_of(rng, split, photo_share=0.5)
        palette = rng.integers(0, 256, size=(4, 3))
        palette = palette[np.argsort(grayscale(palette[None].astype(np.uint8))[0, :, 0], kind="stable")]
        target, references = palette_transfer(source, palette), [palette_reference(palette)]
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if world != 1:
        origin = {**origin, "world": world}
    return ToyExample(id=f"{split}-{seed}-{index:07d}", family=family,
                      instruction=_wording(rng, family, attributes, world), attributes=attributes, source=source,
                      target=target, references=references, split=split, origin=origin)


def generate(n: int, seed: int, split: str, families: tuple[str, ...] = FAMILIES,
             world: int = 1) -> Iterator[ToyExample]:
    """The first n examples of a split."""
    for index in range(n):
        yield make_example(seed, split, index, families, world)


def describe(examples: list[ToyExample]) -> dict[str, Any]:
    """Counts per family and how many examples sit on held-out combinations (for the data manifest)."""
    families: dict[str, int] = {}
    held = 0
    for e in examples:
        families[e.family] = families.get(e.family, 0) + 1
        held += is_held_out(e.family, e.attributes)
    return {"n": len(examples), "families": dict(sorted(families.items())), "held_out_combos": held}


# ---------------------------------------------------------------------------------------------------------------
# Checks of single instructions (jobs.eval_edit): what an instruction means, cases with exact targets and the
# targets of the edits it could be mistaken for, hand-drawn probes and whole photos

FILLS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": tuple(COLOURS), "position": tuple(POSITIONS),
                                     "direction": tuple(DIRECTIONS), "old_colour": tuple(COLOURS)}
# Photos the photo check edits whole (centre square, resized): the held-out ones, then three seen only in crops.
CHECK_PHOTOS = EVAL_PHOTOS + ("astronaut", "coffee", "camera")


@functools.lru_cache(maxsize=4)
def instruction_table(world: int = LATEST_WORLD) -> dict[str, tuple[str, str, dict[str, str]]]:
    """Every instruction a world can word: its text -> (family, template, attributes)."""
    import itertools

    table: dict[str, tuple[str, str, dict[str, str]]] = {}
    for family, options in templates(world).items():
        for template in options:
            names = [n for n in FILLS if "{" + n + "}" in template]
            for values in itertools.product(*(FILLS[n] for n in names)):
                attributes = dict(zip(names, values))
                if "old_colour" in attributes and attributes["old_colour"] == attributes.get("colour"):
                    continue
                table.setdefault(fill_template(template, attributes), (family, template, attributes))
    return table


def parse_instruction(text: str, world: int = LATEST_WORLD) -> tuple[str, str, dict[str, str]] | None:
    """(family, template, attributes) of an instruction a world words, or None."""
    return instruction_table(world).get(" ".join(text.strip().lower().split()))


def template_of(family: str, instruction: str, attributes: Mapping[str, Any]) -> str | None:
    """The template an example's instruction was worded from (world 2's templates include world 1's), or None."""
    for template in TEMPLATES_2.get(family, ()):
        try:
            if fill_template(template, attributes) == instruction:
                return template
        except KeyError:  # a template naming an attribute this example lacks (old_colour in world-1 data)
            continue
    return None


def _case_rng(seed: int, split: str, index: int, family: str) -> np.random.Generator:
    # The family's position in FAMILIES, not its attributes: every variant of one case draws the same scene.
    return np.random.default_rng(np.random.SeedSequence([seed, ("train", "eval").index(split), index, 7,
                                                          FAMILIES.index(family) if family in LOCAL_FAMILIES else 0]))


def instruction_case(family: str, attributes: Mapping[str, str], index: int, seed: int = 0, split: str = "eval",
                     backdrop: np.ndarray | None = None, instruction: str | None = None) -> ToyExample:
    """Case `index` of one instruction's meaning on world-2 sources of a split (a photo as the background or the
    source when `backdrop` is given): a pure function of its arguments. The recolour and remove cases of one
    index share their scene, whatever colours they name, and so do the add cases of one shape and position."""
    rng = _case_rng(seed, split, index, "recolour" if family == "remove" else family)
    attributes = dict(attributes)
    if family in GLOBAL_FAMILIES:
        source, origin = (backdrop, {}) if backdrop is not None else _source_2(rng, split, photo_share=0.5)
        target, references = apply_global(family, source, attributes), []
    elif family in LOCAL_FAMILIES:
        if family in ("recolour", "remove") and not attributes.get("old_colour"):
            # Any colour but the one named: drawn from its own stream, so the scene's draws stay the same.
            own = np.random.default_rng(np.random.SeedSequence([seed, index, 11]))
            attributes["old_colour"] = _pick(own, [c for c in COLOURS if c != attributes.get("colour")])
        attributes, source, target, references, origin = _local_example_2(rng, family, attributes, split, backdrop)
    else:
        raise ValueError(f"no single-instruction case for family {family!r}")
    return ToyExample(id=f"case-{family}-{index}", family=family, instruction=instruction or family,
                      attributes=attributes,
                      source=source, target=target, references=references, split=split, origin=origin)


def case_alternatives(family: str, attributes: Mapping[str, str], index: int, seed: int = 0, split: str = "eval",
                      backdrop: np.ndarray | None = None) -> list[np.ndarray]:
    """Targets of the local edits a local case could be mistaken for, on its own source: the shape in each other
    colour or removed (recolour, remove), the added shape in each other colour (add). Empty for global families."""
    if family not in LOCAL_FAMILIES:
        return []
    case = instruction_case(family, attributes, index, seed, split, backdrop)
    old = case.attributes.get("old_colour")
    variants: list[tuple[str, dict[str, str]]] = []
    if family in ("recolour", "remove"):
        base = {"shape": case.attributes["shape"], "old_colour": old}
        named = case.attributes.get("colour")
        variants += [("recolour", {**base, "colour": c}) for c in COLOURS if c not in (old, named)]
        if family == "recolour":
            variants.append(("remove", base))
    else:
        variants += [("add", {**case.attributes, "colour": c}) for c in COLOURS if c != case.attributes["colour"]]
    return [instruction_case(f, a, index, seed, split, backdrop).target for f, a in variants]


def whole_photo(name: str) -> np.ndarray:
    """A skimage photo as a user would send it: its centre square, resized to SIZE."""
    photo = load_photo(name)
    h, w = photo.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = photo[top:top + side, left:left + side]
    return np.ascontiguousarray(Image.fromarray(crop).resize((SIZE, SIZE), Image.Resampling.BILINEAR))


# Hand-drawn probes, drawn as a user draws them (PIL, hard edges, pure red on white), each with the instructions
# a newcomer typed on it; the drawn shape is every pixel that is not the white paper.
PROBE_INSTRUCTIONS = ("make the red circle blue", "remove the red circle", "make it grayscale",
                      "make the circle blue", "remove the circle", "make it black and white")


def drawn_probes() -> dict[str, np.ndarray]:
    """Red circles on white 128x128 paper: filled (the README's circle.png), outlined, and a wobbly hand stroke."""
    from PIL import ImageDraw

    probes = {}
    image = Image.new("RGB", (SIZE, SIZE), "white")
    ImageDraw.Draw(image).ellipse((32, 32, 96, 96), fill="red")
    probes["filled red circle"] = image
    image = Image.new("RGB", (SIZE, SIZE), "white")
    ImageDraw.Draw(image).ellipse((24, 28, 100, 104), outline="red", width=5)
    probes["outlined red circle"] = image
    image = Image.new("RGB", (SIZE, SIZE), "white")
    t = np.linspace(0, 2 * np.pi, 60)
    r = 38 * (1 + 0.05 * np.sin(3 * t + 1.0) + 0.03 * np.sin(5 * t))
    points = [(float(64 + r[i] * np.cos(t[i])), float(62 + r[i] * np.sin(t[i]))) for i in range(len(t))]
    ImageDraw.Draw(image).line(points + points[:2], fill=(230, 20, 20), width=4, joint="curve")
    probes["hand-drawn red circle"] = image
    return {name: np.asarray(im, dtype=np.uint8).copy() for name, im in probes.items()}


def probe_target(probe: np.ndarray, family: str, attributes: Mapping[str, str]) -> np.ndarray:
    """The exact target of an instruction on a drawn probe: the drawn pixels recoloured or erased to white, or the
    global edit."""
    if family in GLOBAL_FAMILIES:
        return apply_global(family, probe, attributes)
    drawn = np.any(probe != 255, axis=2)
    out = probe.copy()
    if family == "recolour":
        out[drawn] = COLOURS[attributes["colour"]]
    elif family == "remove":
        out[drawn] = 255
    else:
        raise ValueError(f"no probe target for family {family!r}")
    return out


def probe_alternatives(probe: np.ndarray, family: str, attributes: Mapping[str, str]) -> list[np.ndarray]:
    """The local edits an instruction on a probe could be mistaken for: each other colour, or the removal."""
    if family not in LOCAL_FAMILIES:
        return []
    alternatives = [probe_target(probe, "recolour", {"colour": c}) for c in COLOURS
                    if c not in ("red", attributes.get("colour"))]
    if family == "recolour":
        alternatives.append(probe_target(probe, "remove", {}))
    return alternatives
