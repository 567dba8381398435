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
    k = SUPERSAMPLE
    image = Image.new("RGB", (IMAGE_SIZE * k, IMAGE_SIZE * k), BACKGROUNDS[scene.background])
    cx, cy = POSITIONS[scene.position]
    if rng is not None:
        cx, cy = cx + rng.randint(-JITTER, JITTER), cy + rng.randint(-JITTER, JITTER)
    half = SIZES[scene.size] / 2
    box = [(cx - half) * k, (cy - half) * k, (cx + half) * k, (cy + half) * k]
    draw, fill = ImageDraw.Draw(image), COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif scene.shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # an upright triangle: apex at the top centre, base along the bottom of the box
        draw.polygon([(cx * k, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)


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


@dataclass
class Analysis:
    color: str | None
    background: str
    position: str | None
    shape: str | None


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
    fill = mask.sum() / ((bottom - top) * (right - left))
    middle = (top + bottom) / 2
    bottom_share = (ys + 0.5 > middle).mean()
    if bottom_share >= TRIANGLE_MIN_BOTTOM_SHARE or fill < CIRCLE_MIN_FILL:
        shape = "triangle"
    elif fill >= SQUARE_MIN_FILL:
        shape = "square"
    else:
        shape = "circle"
    return Analysis(color, background, position, shape)
