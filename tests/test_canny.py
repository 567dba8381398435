"""The Canny detector's claims, on pictures whose edges can be worked out by hand: Sobel's sizes on a
step (4 · 255 = 1020 on each of the two pixels beside it), the crest that non-maximum suppression
keeps (OpenCV's tie rule: the left or upper of two equal pixels), hysteresis keeping weak pixels
only when joined to strong ones, the blur removing speckles, and bad input refused in words. Where
OpenCV is installed, the same pixels as cv2.Canny, the ControlNet annotator's detector.
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from sd_scratch.addons.canny import (canny, gaussian_blur, hysteresis, non_maximum_suppression,
                                     quantised_direction, sobel)

# A 20×20 white square on black: it fills rows TOP..BOTTOM and columns LEFT..RIGHT of a 64×64 picture.
SIZE, TOP, LEFT, BOTTOM, RIGHT = 64, 20, 20, 39, 39


def square(size=SIZE) -> np.ndarray:
    image = np.zeros((size, size, 3), np.uint8)
    image[TOP:BOTTOM + 1, LEFT:RIGHT + 1] = 255
    return image


def edge_pixels(picture: Image.Image) -> set[tuple[int, int]]:
    ys, xs = np.nonzero(np.array(picture)[..., 0])
    return set(zip(ys.tolist(), xs.tolist()))


def test_a_white_square_gives_its_outline_drawn_on_the_pixels_above_and_left_of_each_boundary():
    """Across a side, Sobel gives 4 · 255 = 1020 on both pixels beside the boundary and 0 further
    away; the two tie, and the left (upper) one is kept: the pixel outside the square on its left and
    top sides, the square's own last pixel on its right and bottom sides. At a corner the square's
    corner pixel has |g_x| + |g_y| = 3·255 + 3·255 = 1530 on the diagonal: it beats the outer corner
    (255 + 255) and the 1020s beside it lose to it, so the top-left corner is cut by the square's own
    corner pixel, and the top row stops one short of each end."""
    expected = ({(TOP - 1, x) for x in range(LEFT + 1, RIGHT)}       # above the top side, corners cut
                | {(y, LEFT - 1) for y in range(TOP + 1, BOTTOM)}    # left of the left side, corners cut
                | {(y, RIGHT) for y in range(TOP, BOTTOM + 1)}       # the square's last column, whole
                | {(BOTTOM, x) for x in range(LEFT, RIGHT + 1)}      # the square's last row, whole
                | {(TOP, LEFT)})                                     # the top-left corner, cut
    found = edge_pixels(canny(square()))

    assert found == expected
    assert len(found) == 76
    rows = {y for y, x in found}
    cols = {x for y, x in found}
    assert {TOP - 1, BOTTOM} <= rows and {LEFT - 1, RIGHT} <= cols              # every side found
    assert all(TOP - 1 <= y <= BOTTOM and LEFT - 1 <= x <= RIGHT for y, x in found)  # nothing far outside
    assert not any(TOP < y < BOTTOM and LEFT < x < RIGHT for y, x in found)   # nothing inside
    side_rows = [sorted(x for y, x in found if y == r) for r in range(TOP + 2, BOTTOM - 1)]
    assert all(row == [LEFT - 1, RIGHT] for row in side_rows)                  # one pixel thin


def test_a_vertical_step_gives_one_column_from_the_top_row_to_the_bottom_row():
    """Border pixels are repeated, so the first and last rows see the same horizontal gradient as
    the rest: the edge is column 31 (left of the boundary between 31 and 32) in every row."""
    image = np.zeros((SIZE, SIZE), np.uint8)
    image[:, 32:] = 255
    assert edge_pixels(canny(image)) == {(y, 31) for y in range(SIZE)}


def test_sobel_of_a_step_is_1020_on_the_two_pixels_beside_it_and_1530_at_a_corner():
    magnitude, direction = sobel(torch.from_numpy(square()).permute(2, 0, 1).float())
    assert magnitude[30, LEFT - 1] == magnitude[30, LEFT] == 4 * 255
    assert magnitude[30, LEFT - 2] == magnitude[30, LEFT + 1] == 0
    assert direction[30, LEFT] == 0 and direction[TOP, 30] == 2
    assert magnitude[TOP, LEFT] == 6 * 255 and direction[TOP, LEFT] == 1    # g = (765, 765): 45°
    assert magnitude[TOP, RIGHT] == 6 * 255 and direction[TOP, RIGHT] == 3  # g = (-765, 765): 135°
    assert magnitude[TOP - 1, LEFT - 1] == 2 * 255


def test_directions_round_to_the_nearest_of_four_with_opencvs_tan_22_5():
    g = torch.tensor([(1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (-1.0, -1.0), (1.0, -1.0), (-1.0, 1.0),
                      (100.0, 41.0), (100.0, 42.0), (100.0, 241.0), (100.0, 242.0), (0.0, 0.0),
                      # 985/2378 = 0.4142136 lies between tan 22.5° = 0.4142135 and OpenCV's 13573/2^15
                      # = 0.4142151: OpenCV calls it horizontal, and so must we
                      (2378.0, 985.0)])
    assert quantised_direction(g[:, 0], g[:, 1]).tolist() == [0, 0, 2, 1, 1, 3, 3, 0, 1, 1, 2, 1, 0]
    assert 985 / 2378 > math.tan(math.radians(22.5))


def test_non_maximum_suppression_keeps_only_the_ridge_compared_along_the_direction():
    across = torch.tensor([0.0, 10, 60, 100, 60, 10, 0])
    column_ridge = across.expand(7, 7)                         # peaks in column 3, the same in every row
    along_x = torch.zeros(7, 7, dtype=torch.long)
    thin = non_maximum_suppression(column_ridge, along_x)
    assert thin.nonzero()[:, 1].unique().tolist() == [3] and (thin[:, 3] == 100).all()
    thin = non_maximum_suppression(column_ridge.T, along_x + 2)  # the row ridge, gradient along y
    assert thin.nonzero()[:, 0].unique().tolist() == [3]
    # compared down the ridge every pixel ties the one above it; only the top row beats its (outside, 0) one
    thin = non_maximum_suppression(column_ridge, along_x + 2)
    assert thin.nonzero()[:, 0].unique().tolist() == [0]

    y, x = torch.meshgrid(torch.arange(7), torch.arange(7), indexing="ij")
    diagonal_ridge = (100 - 20 * (x + y - 6).abs()).clamp(min=0).float()  # peaks on x + y = 6
    thin = non_maximum_suppression(diagonal_ridge, along_x + 1)
    assert set(map(tuple, thin.nonzero().tolist())) == {(i, 6 - i) for i in range(7)}


def test_of_two_equal_pixels_across_an_edge_the_left_or_upper_one_is_kept_and_on_a_diagonal_neither():
    def kept(pair, code):
        magnitude = torch.zeros(5, 5)
        for y, x in pair:
            magnitude[y, x] = 90
        thin = non_maximum_suppression(magnitude, torch.full((5, 5), code))
        return set(map(tuple, thin.nonzero().tolist()))

    assert kept([(2, 1), (2, 2)], 0) == {(2, 1)}  # side by side, gradient along x: the left one
    assert kept([(1, 2), (2, 2)], 2) == {(1, 2)}  # one above the other, gradient along y: the upper one
    assert kept([(1, 1), (2, 2)], 1) == set()     # on the 45° line: neither
    assert kept([(1, 3), (2, 2)], 3) == set()     # on the 135° line: neither


def test_hysteresis_keeps_weak_pixels_joined_to_strong_ones_and_drops_the_rest():
    thin = torch.zeros(9, 12)
    thin[1, 1:5] = 250  # strong
    thin[2, 5:9] = 150  # weak, touching the strong end (1, 4) at a corner: kept
    thin[3, 9] = 120    # weak, joined through the weak ones above: kept (the growth runs to a fixed point)
    thin[4, 9] = 80     # below low
    thin[5, 9] = 150    # weak, joined only through the pixel below low: dropped
    thin[6, 1:6] = 150  # weak, alone: dropped
    thin[7, 8] = 201    # alone and above high: kept
    thin[7, 10] = 200   # alone and at high, not above it: dropped
    thin[0, 0] = 90     # touching the strong segment but below low: dropped
    edges = hysteresis(thin, 100, 200)
    expected = {(1, x) for x in range(1, 5)} | {(2, x) for x in range(5, 9)} | {(3, 9), (7, 8)}
    assert set(map(tuple, edges.nonzero().tolist())) == expected


def test_a_gaussian_blur_of_one_white_pixel_is_the_sampled_gaussian():
    point = torch.zeros(1, 15, 15)
    point[0, 7, 7] = 1
    k = torch.arange(-3, 4, dtype=torch.float32)
    g = torch.exp(-k**2 / 2)
    g = g / g.sum()                                   # σ = 1: radius 3
    expected = torch.zeros(15, 15)
    expected[4:11, 4:11] = g[:, None] * g[None, :]
    assert torch.allclose(gaussian_blur(point, 1.0)[0], expected, atol=1e-7)
    assert gaussian_blur(point, 0) is point


def test_the_blur_removes_single_pixel_speckles_but_keeps_the_square():
    image = square()
    specks = [(5, 5), (5, 55), (55, 8), (50, 50), (8, 30)]
    for y, x in specks:
        image[y, x] = 255
    near_a_speck = lambda y, x: any(abs(y - sy) <= 1 and abs(x - sx) <= 1 for sy, sx in specks)
    # unblurred, a lone white pixel's eight neighbours have |g| = 2 · 255 = 510 > 200 and are crests
    unblurred = edge_pixels(canny(image))
    assert all((sy + dy, sx + dx) in unblurred for sy, sx in specks for dy in (-1, 0, 1) for dx in (-1, 0, 1)
               if (dy, dx) != (0, 0))
    blurred = edge_pixels(canny(image, sigma=2.0))
    assert not any(near_a_speck(y, x) for y, x in blurred)
    assert all(TOP - 2 <= y <= BOTTOM + 2 and LEFT - 2 <= x <= RIGHT + 2 for y, x in blurred)
    assert not any(TOP + 2 < y < BOTTOM - 2 and LEFT + 2 < x < RIGHT - 2 for y, x in blurred)
    for side in (lambda y, x: y <= TOP, lambda y, x: y >= BOTTOM, lambda y, x: x <= LEFT, lambda y, x: x >= RIGHT):
        assert sum(side(y, x) for y, x in blurred) >= 16   # each side found along most of its 20 pixels


def test_the_output_is_an_rgb_picture_of_the_same_size_in_black_and_white():
    image = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)  # 80 wide, 48 high
    picture = canny(image)
    pixels = np.array(picture)
    assert picture.mode == "RGB" and picture.size == (80, 48)
    assert set(np.unique(pixels)) == {0, 255}
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all()
    # |g_x| + |g_y| of 0-255 values never reaches 2 · 1020, so thresholds there leave nothing
    assert np.array(canny(image, 2040, 2040)).max() == 0


def test_every_input_form_of_one_picture_gives_the_same_edges():
    image = np.random.default_rng(1).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    expected = np.array(canny(image))
    assert (np.array(canny(Image.fromarray(image))) == expected).all()
    assert (np.array(canny(tensor)) == expected).all()
    assert (np.array(canny(tensor[None])) == expected).all()
    grey = image[..., 0]
    assert (np.array(canny(grey)) == np.array(canny(np.stack([grey] * 3, -1)))).all()
    assert (np.array(canny(grey[..., None])) == np.array(canny(Image.fromarray(grey)))).all()


PICTURE = np.zeros((16, 16, 3), np.uint8)


@pytest.mark.parametrize("call, message", [
    (lambda: canny(PICTURE, low_threshold=-1), "low_threshold must be a number ≥ 0"),
    (lambda: canny(PICTURE, 0, high_threshold=-5), "high_threshold must be a number ≥ 0"),
    (lambda: canny(PICTURE, 250, 200), r"low_threshold \(250\) must not exceed high_threshold \(200\)"),
    (lambda: canny(PICTURE, float("nan"), 200), "low_threshold must be a number ≥ 0"),
    (lambda: canny(PICTURE, "100", 200), "low_threshold must be a number ≥ 0"),
    (lambda: canny(PICTURE, sigma=-1.0), "sigma must be a number of pixels ≥ 0"),
    (lambda: hysteresis(torch.zeros(4, 4), 5, 1), r"low \(5\) must not exceed high \(1\)"),
    (lambda: canny(PICTURE.astype(np.float32)), "numpy array must be uint8"),
    (lambda: canny(np.zeros((16, 16, 4), np.uint8)), r"must be \(H, W\), \(H, W, 1\) or \(H, W, 3\)"),
    (lambda: canny(torch.zeros(4, 16, 16)), r"tensor must be \(3, H, W\) or \(1, 3, H, W\)"),
    (lambda: canny(torch.zeros(2, 3, 16, 16)), r"tensor must be \(3, H, W\) or \(1, 3, H, W\)"),
    (lambda: canny(torch.zeros(3, 16, 16, dtype=torch.uint8)), "tensor must be float in"),
    (lambda: canny(torch.full((3, 16, 16), -1.0)), r"tensor must hold values in \[0, 1\], got -1"),
    (lambda: canny(np.zeros((2, 16, 3), np.uint8)), "at least 3×3 pixels, got 16×2"),
    (lambda: canny("photo.png"), "image must be a PIL image, a uint8 numpy array or a float tensor, got str"),
])
def test_bad_input_is_refused_in_words(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_the_same_pixels_as_opencv_canny_the_controlnet_annotator():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(2)
    noise = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    smooth = np.array(Image.fromarray(rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)).resize((97, 70), Image.BILINEAR))
    for image in (noise, smooth, smooth[..., 1], square()):
        for low, high in ((100, 200), (0, 0), (20, 60), (150.5, 150.5)):
            assert (np.array(canny(image, low, high))[..., 0] == cv2.Canny(image, low, high)).all()
