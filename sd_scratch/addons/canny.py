"""Canny edges (Canny 1986): the white-on-black line picture a Canny ControlNet is conditioned on. No weights.

J. Canny, "A Computational Approach to Edge Detection", IEEE PAMI 8(6), 1986. Four steps, each a
function here so a notebook can show what it does:

    1. gaussian_blur            smooth the picture with a Gaussian of width σ (σ = 0: not at all)
    2. sobel                    the gradient g = (g_x, g_y) by 3×3 Sobel filters; its size |g_x| + |g_y|
                                and its direction, rounded to one of four: 0°, 45°, 90°, 135°
    3. non_maximum_suppression  keep a pixel only where its size beats its two neighbours along the
                                gradient, across the edge: the edges become ridges one pixel thin
    4. hysteresis               keep the ridge pixels above `high`, and those above `low` that are
                                joined to them through such pixels (8-connected)

Shapes: the picture is (C, H, W) float on the 0–255 scale (C = 3 for RGB, 1 for grey); `sobel` picks,
at each pixel, the channel with the largest gradient, so from there on everything is (H, W).

What ControlNet users run: lllyasviel's ControlNet canny annotator calls OpenCV's
`cv2.Canny(image, low_threshold, high_threshold)` on the uint8 RGB picture, 100 and 200 by default,
and HWC3 repeats the one-channel answer into RGB. `canny(image)` gives that picture, and the same
pixels: 3×3 Sobel on 0–255 values with the border pixels repeated, size |g_x| + |g_y| (OpenCV's
default L1), for colour the channel with the largest size (the first on a tie), OpenCV's fixed-point
tan 22.5° for rounding the direction, its tie rule on two-pixel plateaus (the left or upper pixel is
kept; on a diagonal neither), "above a threshold" meaning strictly greater, 8-connected hysteresis,
and no blur (σ = 0); tests/test_canny.py checks it pixel for pixel against cv2.Canny where OpenCV is
installed. It differs in four ways: `sigma` > 0 blurs first (cv2.Canny never blurs; OpenCV users
call cv2.GaussianBlur themselves, whose kernel is not this one); low > high is an error (OpenCV
swaps them); there is only the 3×3 Sobel and the L1 size (no apertureSize 5 or 7, no L2gradient);
a float tensor in [0, 1] is rounded to the 256 levels of a uint8 picture first, so it gives the
edges of the same picture as uint8 would.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# The canny annotator's defaults: the sliders of ControlNet's gradio_canny2image.py start at 100 and 200.
ANNOTATOR_LOW_THRESHOLD = 100
ANNOTATOR_HIGH_THRESHOLD = 200

# Sobel's 3×3 derivative filters (Sobel and Feldman, 1968): a central difference [-1, 0, 1] across,
# smoothed by [1, 2, 1] along. Applied as a correlation, g_x = right − left and g_y = below − above
# (y points down), so a uint8 step from 0 to 255 gives |g| = 4 · 255 = 1020.
SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0],
                        [-2.0, 0.0, 2.0],
                        [-1.0, 0.0, 1.0]])
SOBEL_Y = SOBEL_X.T

# tan 22.5° = √2 − 1 = 0.4142136, as OpenCV's Canny writes it in fixed point (13573 / 2^15 = 0.4142151),
# so the rare gradients between the two round to the same direction. tan 67.5° = √2 + 1 = 2 + tan 22.5°:
# the test for "steeper than 67.5°" is written with that identity, which keeps it exact in float32.
TAN_22_5 = 13573 / 2**15

# The four rounded directions of the gradient, numbered as `sobel` returns them: for each, the
# neighbour before and the one after along the gradient, as (dy, dx) with y down, and whether a
# tie with the one after still keeps the pixel. The tie rule is OpenCV's: on a plateau two pixels
# wide across a vertical or horizontal edge the left (upper) one is kept; on a diagonal neither.
DIRECTIONS = (
    ((0, -1), (0, 1), True),     # 0: ≈ 0°, the gradient along x: left and right
    ((-1, -1), (1, 1), False),   # 1: ≈ 45°, g_x and g_y of one sign: up-left and down-right
    ((-1, 0), (1, 0), True),     # 2: ≈ 90°, the gradient along y: above and below
    ((-1, 1), (1, -1), False),   # 3: ≈ 135°, g_x and g_y of opposite signs: up-right and down-left
)

GAUSSIAN_RADIUS_IN_SIGMAS = 3  # the kernel reaches ⌈3σ⌉ pixels each way: 99.7% of the Gaussian's weight
MIN_SIZE = 3                   # the picture must hold one 3×3 Sobel window


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """(C, H, W) smoothed by a Gaussian of standard deviation `sigma` pixels, one channel at a time.

    The kernel exp(−k²/2σ²) for k = −⌈3σ⌉..⌈3σ⌉, divided by its sum, runs along x and then along y;
    border pixels are repeated. σ = 0 gives the picture back as it is.
    """
    check_sigma(sigma)
    if sigma == 0:
        return image
    radius = math.ceil(GAUSSIAN_RADIUS_IN_SIGMAS * sigma)
    k = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    g = torch.exp(-k**2 / (2 * sigma**2))
    g = g / g.sum()
    x = F.pad(image[:, None], (radius, radius, radius, radius), mode="replicate")  # (C, 1, H + 2r, W + 2r)
    x = F.conv2d(x, g.view(1, 1, 1, -1))                                         # along x
    x = F.conv2d(x, g.view(1, 1, -1, 1))                                         # along y
    return x[:, 0]


def quantised_direction(g_x: torch.Tensor, g_y: torch.Tensor) -> torch.Tensor:
    """The gradient's direction rounded to the nearest of 0°, 45°, 90°, 135°: 0, 1, 2, 3 (see DIRECTIONS).

    |g_y| < tan 22.5° |g_x| is 0; |g_y| > tan 67.5° |g_x| is 2; between (boundaries included) the
    diagonal, 1 where g_x and g_y have one sign (a flat zero gradient lands here too), else 3.
    """
    x, y = g_x.abs(), g_y.abs()
    along_x = y < TAN_22_5 * x
    along_y = y - 2 * x > TAN_22_5 * x  # y > tan 67.5° · x
    diagonal = torch.where(g_x * g_y < 0, 3, 1)
    return torch.where(along_x, 0, torch.where(along_y, 2, diagonal))


def sobel(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, H, W) on the 0–255 scale -> (magnitude, direction), both (H, W).

    magnitude = |g_x| + |g_y| of the channel where it is largest (the first on a tie), in the units
    the thresholds are in; direction is that gradient's `quantised_direction`. Border pixels repeated.
    """
    C, H, W = image.shape
    filters = torch.stack([SOBEL_X, SOBEL_Y])[:, None].to(image)        # (2, 1, 3, 3)
    x = F.pad(image[:, None], (1, 1, 1, 1), mode="replicate")          # (C, 1, H + 2, W + 2)
    g_x, g_y = F.conv2d(x, filters).unbind(1)                          # (C, H, W) each
    size = g_x.abs() + g_y.abs()
    channel = size.argmax(0, keepdim=True)                             # (1, H, W)
    magnitude, g_x, g_y = (t.gather(0, channel)[0] for t in (size, g_x, g_y))  # (H, W) each
    return magnitude, quantised_direction(g_x, g_y)


def non_maximum_suppression(magnitude: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """(H, W) magnitude, where it beats its two neighbours along the rounded direction, else 0.

    A step edge's gradient is wide (two pixels for Sobel's 3×3); only its crest survives, so the
    edges are one pixel thin. Pixels outside the picture count as 0. Ties follow DIRECTIONS.
    """
    H, W = magnitude.shape
    padded = F.pad(magnitude, (1, 1, 1, 1))  # (H + 2, W + 2)

    def neighbour(dy: int, dx: int) -> torch.Tensor:
        return padded[1 + dy:1 + dy + H, 1 + dx:1 + dx + W]

    crest = torch.zeros_like(magnitude, dtype=torch.bool)
    for code, (before, after, keeps_tie) in enumerate(DIRECTIONS):
        beats_after = magnitude >= neighbour(*after) if keeps_tie else magnitude > neighbour(*after)
        crest |= (direction == code) & (magnitude > neighbour(*before)) & beats_after
    return torch.where(crest, magnitude, torch.zeros_like(magnitude))


def hysteresis(thin: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """(H, W) thinned magnitude -> (H, W) bool edges: the strong pixels (> high) and every weak one
    (> low) joined to a strong one through weak ones, 8-connected.

    The strong set is dilated by a 3×3 max-pool and cut back to the pixels above `low`, until it no
    longer grows. "Above" is strictly greater, as in OpenCV; for whole-number magnitudes (no blur)
    > 200 is ≥ 201.
    """
    check_thresholds(low, high, "low", "high")
    candidate = thin > low
    edges = thin > high
    while True:
        grown = F.max_pool2d(edges[None].float(), 3, stride=1, padding=1)[0] > 0
        grown &= candidate
        if torch.equal(grown, edges):
            return edges
        edges = grown


def canny(image, low_threshold: float = ANNOTATOR_LOW_THRESHOLD, high_threshold: float = ANNOTATOR_HIGH_THRESHOLD,
          sigma: float = 0.0) -> Image.Image:
    """Canny edges of `image` as an RGB PIL picture of the same size: white (255) edges on black.

    `image`: a PIL image, an (H, W) or (H, W, 1 or 3) uint8 array, or a (3, H, W) or (1, 3, H, W) float
    tensor in [0, 1]. The thresholds are on |g_x| + |g_y| of 0–255 values, as cv2.Canny's are; the
    defaults are ControlNet's annotator's. `sigma`: a Gaussian blur first, in pixels (0 = none).
    """
    check_thresholds(low_threshold, high_threshold, "low_threshold", "high_threshold")
    check_sigma(sigma)
    pixels = image_to_pixels(image)                       # (C, H, W), 0–255
    magnitude, direction = sobel(gaussian_blur(pixels, sigma))
    edges = hysteresis(non_maximum_suppression(magnitude, direction), low_threshold, high_threshold)
    white = edges.cpu().numpy().astype(np.uint8) * 255    # (H, W)
    return Image.fromarray(np.stack([white] * 3, axis=-1), "RGB")


def check_thresholds(low: float, high: float, low_name: str, high_name: str) -> None:
    """Refuse negative (or NaN) thresholds and low > high, naming the parameters."""
    for name, value in ((low_name, low), (high_name, high)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
            raise ValueError(f"{name} must be a number ≥ 0 (a gradient size on the 0–255 scale), got {value!r}")
    if low > high:
        raise ValueError(f"{low_name} ({low}) must not exceed {high_name} ({high})")


def check_sigma(sigma: float) -> None:
    """Refuse a negative (or NaN) blur width, naming the parameter."""
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not sigma >= 0:
        raise ValueError(f"sigma must be a number of pixels ≥ 0 (0 = no blur), got {sigma!r}")


def image_to_pixels(image) -> torch.Tensor:
    """A PIL image, a uint8 array or a float tensor in [0, 1] -> (C, H, W) float32 on the 0–255 scale."""
    if isinstance(image, Image.Image):
        pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"image: a numpy array must be uint8 (0–255), got {image.dtype}")
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3))):
            raise ValueError(f"image: a numpy array must be (H, W), (H, W, 1) or (H, W, 3), got shape {image.shape}")
        pixels = torch.from_numpy(image.reshape(*image.shape[:2], -1).copy()).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        if not image.is_floating_point():
            raise ValueError(f"image: a tensor must be float in [0, 1], got {image.dtype}")
        if not (image.ndim == 3 or (image.ndim == 4 and image.shape[0] == 1)) or image.shape[-3] != 3:
            raise ValueError(f"image: a tensor must be (3, H, W) or (1, 3, H, W), got shape {tuple(image.shape)}")
        if image.numel() and not (image.min() >= 0 and image.max() <= 1):
            raise ValueError(f"image: a tensor must hold values in [0, 1], got {image.min().item():g} to "
                             f"{image.max().item():g} (a VAE picture in [-1, 1] is (x + 1) / 2 first)")
        pixels = (image.reshape(image.shape[-3:]).float() * 255).round()  # the 256 levels of a uint8 picture
    else:
        raise ValueError("image must be a PIL image, a uint8 numpy array or a float tensor, "
                         f"got {type(image).__name__}")
    C, H, W = pixels.shape
    if H < MIN_SIZE or W < MIN_SIZE:
        raise ValueError(f"image must be at least {MIN_SIZE}×{MIN_SIZE} pixels, got {W}×{H} (width × height)")
    return pixels.float()
