"""A captioned toy world for the built-in model: one coloured shape on a plain background.

Every image is drawn from five attributes, and its caption says all five in a fixed template:

    "a small red circle at the top left on a white background"
       size  colour shape  position             background

There are 8 colours × 3 shapes × 5 positions × 2 sizes × 4 backgrounds = 960 combinations. One in
eight (`is_held_out`) never appears in training, so the evaluation asks for pictures the model has
never seen. The hold-out rule is a sum modulo 8, which keeps every *pair* of attribute values in the
training set (e.g. purple triangles and triangles at the bottom right are both seen): what is new
is only the combination.

The second half of the file reads an image back into attributes with plain pixel arithmetic (no
neural judge): the background is the colour of the border, the shape is every pixel far from it;
its mean colour, its centroid, and how it fills its bounding box give colour, position and shape.
Both halves are deterministic: `render` takes an explicit `random.Random` for the small jitter.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
# Drawn at 4× and downsampled with a box filter, so edges are anti-aliased like a photo's.
SUPERSAMPLE = 4

# Vivid, well separated RGB values; the names are the words the captions use.
COLORS = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 220, 30), "green": (40, 170, 50),
    "cyan": (40, 210, 220), "blue": (30, 60, 220), "purple": (140, 40, 190), "pink": (250, 130, 200),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128), "brown": (110, 70, 40)}
SHAPES = ("circle", "square", "triangle")
# A shape the built-in model never saw, drawn only for the example LoRA (scripts/train_examples.py):
# a circle's outline whose band is RING_BAND of its width.
NEW_SHAPE, RING_BAND = "ring", 0.25
# Centre of the shape in pixels of the 64×64 image, with the caption's words for it.
POSITIONS = {"at the top left": (17, 17), "at the top right": (47, 17), "in the center": (32, 32),
             "at the bottom left": (17, 47), "at the bottom right": (47, 47)}
# Side of the shape's bounding box, in pixels. The built-in model's VAE has f = 8, so one latent
# cell covers 8×8 pixels and a small shape spans 2.5 cells. At 14 px (1.75 cells), the first sizes
# tried, the 1.5 M-parameter VAE decoded small triangles and squares as round blobs: only 38% of
# held-out small shapes were read back right after an encode/decode round trip, against 98% of the
# large ones (26 px then). SD's own VAE has the same limit at its scale: details under two latent
# cells (16 px at 512×512) come back smudged.
SIZES = {"small": 20, "large": 30}
JITTER = 2  # the centre moves by up to ±2 px, so a combination is not one fixed picture
HOLD_OUT_EVERY = 8


@dataclass(frozen=True)
class Scene:
    size: str
    color: str
    shape: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.color} {self.shape} {self.position} on a {self.background} background"


def all_scenes() -> list[Scene]:
    """The 960 combinations, in a fixed order."""
    return [Scene(*c) for c in itertools.product(SIZES, COLORS, SHAPES, POSITIONS, BACKGROUNDS)]


def is_held_out(scene: Scene) -> bool:
    """One combination in eight is kept out of training: the sum of the attribute indices modulo 8."""
    indices = (list(SIZES).index(scene.size), list(COLORS).index(scene.color), SHAPES.index(scene.shape),
               list(POSITIONS).index(scene.position), list(BACKGROUNDS).index(scene.background))
    return sum(indices) % HOLD_OUT_EVERY == 0


def train_scenes() -> list[Scene]:
    return [s for s in all_scenes() if not is_held_out(s)]


def held_out_scenes() -> list[Scene]:
    return [s for s in all_scenes() if is_held_out(s)]


def render(scene: Scene, rng: random.Random | None = None) -> Image.Image:
    """Draw `scene` as a 64×64 RGB image; `rng` jitters the centre by up to ±JITTER pixels."""
    cx, cy = POSITIONS[scene.position]
    if rng is not None:
        cx, cy = cx + rng.randint(-JITTER, JITTER), cy + rng.randint(-JITTER, JITTER)
    thing = Thing(scene.size, scene.color, scene.shape, (cx, cy))
    return draw(Picture(scene.background, (thing,))).image


# ---- pictures of several things, with their depth and edge maps -----------------------------------

@dataclass(frozen=True)
class Thing:
    """One shape: its size and colour words, and where its centre is, in pixels of the 64×64 image."""
    size: str
    color: str
    shape: str
    center: tuple[float, float]


@dataclass(frozen=True)
class Picture:
    """A background and the things on it, drawn back to front: the last one is in front."""
    background: str
    things: tuple[Thing, ...]


@dataclass
class Drawing:
    image: Image.Image
    depth: np.ndarray  # (64, 64) float32 in [0, 1]: nearness (MiDaS' relative inverse depth), 0 = background
    edges: np.ndarray  # (64, 64) bool: where a pixel's neighbour belongs to another thing or the background
    owner: np.ndarray  # (64, 64) int: 0 for the background, k for things[k - 1]


# Nearness of each thing in the depth map: a lone thing, or the back and front of an overlapping pair.
# The background is 0 (farthest); the depth-to-image pipeline normalises every map to [-1, 1] anyway.
NEARNESS_ALONE, NEARNESS_BACK, NEARNESS_FRONT = 0.8, 0.6, 1.0


def _overlaps(a: Thing, b: Thing) -> bool:
    reach = (SIZES[a.size] + SIZES[b.size]) / 2
    return abs(a.center[0] - b.center[0]) < reach and abs(a.center[1] - b.center[1]) < reach


def draw(picture: Picture) -> Drawing:
    """Draw `picture` at SUPERSAMPLE× and box-filter it down; the owner map says which thing (or the
    background) covers each pixel's centre, and the depth and edge maps are read off it."""
    k, size = SUPERSAMPLE, IMAGE_SIZE * SUPERSAMPLE
    image = Image.new("RGB", (size, size), BACKGROUNDS[picture.background])
    owner = Image.new("L", (size, size), 0)
    painters = ImageDraw.Draw(image), ImageDraw.Draw(owner)
    for index, thing in enumerate(picture.things, start=1):
        cx, cy = thing.center
        half = SIZES[thing.size] / 2
        box = [(cx - half) * k, (cy - half) * k, (cx + half) * k, (cy + half) * k]
        for painter, fill in zip(painters, (COLORS[thing.color], index)):
            if thing.shape == "circle":
                painter.ellipse(box, fill=fill)
            elif thing.shape == NEW_SHAPE:
                painter.ellipse(box, outline=fill, width=round(RING_BAND * SIZES[thing.size] * k))
            elif thing.shape == "square":
                painter.rectangle(box, fill=fill)
            else:  # an upright triangle: apex at the top centre, base along the bottom of the box
                painter.polygon([(cx * k, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    owners = np.asarray(owner)[k // 2::k, k // 2::k].astype(np.int64)  # the owner at each pixel's centre
    nearness = np.zeros(len(picture.things) + 1, dtype=np.float32)
    for index, thing in enumerate(picture.things, start=1):
        others = [t for t in picture.things if t is not thing and _overlaps(t, thing)]
        nearness[index] = NEARNESS_ALONE if not others else (NEARNESS_FRONT if index == len(picture.things)
                                                             else NEARNESS_BACK)
    edges = np.zeros_like(owners, dtype=bool)
    edges[:, 1:] |= owners[:, 1:] != owners[:, :-1]
    edges[:, :-1] |= owners[:, 1:] != owners[:, :-1]
    edges[1:] |= owners[1:] != owners[:-1]
    edges[:-1] |= owners[1:] != owners[:-1]
    return Drawing(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX), nearness[owners], edges, owners)


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) float32 in [-1, 1], the VAE's input range."""
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images])  # (B, H, W, 3) in 0..255
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def make_dataset(scenes: list[Scene], variants: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """`variants` jittered drawings of each scene: images (N, 3, 64, 64) in [-1, 1] and captions."""
    rng = random.Random(seed)
    drawn = [(render(s, rng), s.caption) for s in scenes for _ in range(variants)]
    return to_tensor([im for im, _ in drawn]), [c for _, c in drawn]


# ---- reading an image back into attributes -------------------------------------------------------

# A pixel belongs to the shape when it is this far (RGB Euclidean, 0..255) from the background.
FOREGROUND_DISTANCE = 60.0
BORDER = 2  # the background colour is the median of this many pixels around the edge
# Fill of the bounding box: a square fills 1, a circle π/4 ≈ 0.79, a triangle 1/2. Blur rounds a
# square's corners, so the cut between square and circle sits a little below the midpoint.
SQUARE_MIN_FILL = 0.88
CIRCLE_MIN_FILL = 0.64
# An upright triangle puts most of its pixels in the lower half of its box; a circle or square half.
TRIANGLE_MIN_BOTTOM_SHARE = 0.62
SIZE_CUT = (SIZES["small"] + SIZES["large"]) / 2  # a bounding box wider or taller than this is "large"


def _shape_of(mask: np.ndarray) -> str:
    """circle, square or triangle by how the shape fills its bounding box and how much of it is in
    the box's lower half; a ring (NEW_SHAPE) when the box's centre is empty."""
    ys, xs = np.nonzero(mask)
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    fill = mask.sum() / ((bottom - top) * (right - left))
    bottom_share = (ys + 0.5 > (top + bottom) / 2).mean()
    if fill < CIRCLE_MIN_FILL and not mask[(top + bottom) // 2, (left + right) // 2]:
        return NEW_SHAPE  # every other shape covers the centre of its box
    if bottom_share >= TRIANGLE_MIN_BOTTOM_SHARE or fill < CIRCLE_MIN_FILL:
        return "triangle"
    return "square" if fill >= SQUARE_MIN_FILL else "circle"


@dataclass
class Analysis:
    color: str | None
    background: str
    position: str | None
    shape: str | None
    size: str | None = None


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = [np.linalg.norm(rgb - np.asarray(palette[n], dtype=np.float32)) for n in names]
    return names[int(np.argmin(distances))]


def analyse(image: Image.Image) -> Analysis:
    """Read the background colour, the shape's colour, its position and its shape off the pixels."""
    pixels = np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.float32)
    edge = np.concatenate([pixels[:BORDER].reshape(-1, 3), pixels[-BORDER:].reshape(-1, 3),
                           pixels[:, :BORDER].reshape(-1, 3), pixels[:, -BORDER:].reshape(-1, 3)])
    background_rgb = np.median(edge, axis=0)
    background = _nearest(background_rgb, BACKGROUNDS)

    mask = np.linalg.norm(pixels - background_rgb, axis=-1) > FOREGROUND_DISTANCE
    if mask.sum() < 8:
        return Analysis(None, background, None, None)
    ys, xs = np.nonzero(mask)
    color = _nearest(np.median(pixels[mask], axis=0), COLORS)

    cx, cy = xs.mean(), ys.mean()
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)

    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    shape = _shape_of(mask)
    size = "large" if max(bottom - top, right - left) > SIZE_CUT else "small"
    return Analysis(color, background, position, shape, size)


@dataclass
class Found:
    color: str
    shape: str
    center: tuple[float, float]  # centroid in pixels
    pixels: int


# A colour counts as a thing when at least this many foreground pixels are nearest to it: a small
# circle has about 300, a half-hidden one over 100, and the blended rim between two shapes a few dozen.
MIN_THING_PIXELS = 60


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (a flood fill from each unvisited pixel)."""
    seen, best = np.zeros_like(mask), np.zeros_like(mask)
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        region, todo = [], [start]
        seen[start] = True
        while todo:
            y, x = todo.pop()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    todo.append((ny, nx))
        if len(region) > best.sum():
            best = np.zeros_like(mask)
            best[tuple(np.array(region).T)] = True
    return best


def analyse_things(image: Image.Image, most: int = 2) -> tuple[str, list[Found]]:
    """The background and up to `most` things, largest first: each foreground pixel goes to its
    nearest palette colour, and a colour whose largest connected region has MIN_THING_PIXELS or
    more is a thing (the region, not every pixel of that colour: the blended rims of other shapes
    are scattered). A thing half hidden behind another reads back with the shape of what is left of it."""
    pixels = np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.float32)
    background = analyse(image).background
    foreground = np.linalg.norm(pixels - np.asarray(BACKGROUNDS[background], np.float32), axis=-1) > FOREGROUND_DISTANCE
    palette = np.asarray(list(COLORS.values()), dtype=np.float32)
    nearest = np.linalg.norm(pixels[:, :, None] - palette[None, None], axis=-1).argmin(-1)
    found = []
    for index, name in enumerate(COLORS):
        mask = foreground & (nearest == index)
        if mask.sum() < MIN_THING_PIXELS:
            continue
        mask = largest_component(mask)
        if mask.sum() >= MIN_THING_PIXELS:
            ys, xs = np.nonzero(mask)
            found.append(Found(name, _shape_of(mask), (xs.mean(), ys.mean()), int(mask.sum())))
    return background, sorted(found, key=lambda f: -f.pixels)[:most]


def relation_of(a: Found, b: Found) -> str:
    """Where a is with respect to b, by the larger offset of their centroids."""
    dx, dy = a.center[0] - b.center[0], a.center[1] - b.center[1]
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "to the left of" if dx < 0 else "to the right of"
