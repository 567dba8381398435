"""The notebooks' drawing helpers (sd_scratch/visualize.py): sizes, errors, colours, and the
StepRecorder as the callback of a real generation on the built-in model."""
import numpy as np
import pytest
import torch
from PIL import Image

import sd_scratch
from sd_scratch.samplers import make_sampler
from sd_scratch.lab.visualize import MARGIN, RAMP, StepRecorder, filmstrip, grid, heatmap, latent_image, overlay, plot

RED, GREEN, BLUE = (200, 0, 0), (0, 200, 0), (0, 0, 200)


def solid(colour, size=(10, 6)) -> Image.Image:
    return Image.new("RGB", size, colour)


def count(image: Image.Image, colour) -> int:
    """How many pixels of `image` are exactly `colour`."""
    return int((np.asarray(image) == np.array(colour, dtype=np.uint8)).all(axis=-1).sum())


# ---- grid and filmstrip ---------------------------------------------------------------------------

def test_grid_puts_every_image_in_one_row_by_default_with_margins_between():
    sheet = grid([solid(RED), solid(GREEN), solid(BLUE)])
    assert sheet.size == (MARGIN + 3 * (10 + MARGIN), MARGIN + 6 + MARGIN)
    assert [count(sheet, c) for c in (RED, GREEN, BLUE)] == [60, 60, 60]  # each tile pasted whole


def test_grid_wraps_into_rows_and_zoom_enlarges_every_tile():
    sheet = grid([solid(RED), solid(GREEN), solid(BLUE)], columns=2, zoom=3)
    assert sheet.size == (MARGIN + 2 * (30 + MARGIN), MARGIN + 2 * (18 + MARGIN))
    assert [count(sheet, c) for c in (RED, GREEN, BLUE)] == [540, 540, 540]


def test_grid_labels_and_title_add_height_not_width():
    plain = grid([solid(RED), solid(GREEN)])
    labelled = grid([solid(RED), solid(GREEN)], labels=["red", "green"], title="two tiles")
    assert labelled.width == plain.width and labelled.height > plain.height


@pytest.mark.parametrize("labels", [["only one"], ["a", "b", "c"]])
def test_grid_refuses_a_label_count_that_does_not_match(labels):
    with pytest.raises(ValueError, match="labels"):
        grid([solid(RED), solid(GREEN)], labels=labels)


def test_grid_refuses_no_images():
    with pytest.raises(ValueError):
        grid([])


def test_filmstrip_has_one_row_per_name_and_one_column_per_frame():
    one_row = filmstrip({"x": [solid(RED), solid(GREEN), solid(BLUE)]})
    two_rows = filmstrip({"x": [solid(RED), solid(GREEN), solid(BLUE)], "y": [solid(BLUE)] * 3})
    assert two_rows.width == one_row.width
    assert two_rows.height - one_row.height == 6 + MARGIN  # one more tile and its margin
    four_frames = filmstrip({"x": [solid(RED), solid(GREEN), solid(BLUE), solid(RED)]})
    assert four_frames.width - one_row.width == 10 + MARGIN
    assert count(two_rows, BLUE) == 4 * 60


def test_filmstrip_column_labels_add_a_header():
    frames = {"x": [solid(RED), solid(GREEN)]}
    assert filmstrip(frames, column_labels=["t=999", "t=1"]).height > filmstrip(frames).height


def test_filmstrip_refuses_rows_of_unequal_length_and_no_rows():
    with pytest.raises(ValueError, match="same number of frames"):
        filmstrip({"x": [solid(RED), solid(GREEN)], "y": [solid(BLUE)]})
    with pytest.raises(ValueError):
        filmstrip({})


# ---- latents, heatmaps, overlays ------------------------------------------------------------------

def test_latent_image_draws_each_channel_as_a_grey_tile_on_one_shared_scale():
    z = torch.arange(4.0)[:, None, None].expand(4, 8, 8)  # channel c is constant c
    picture = latent_image(z, zoom=4)
    assert picture.width == MARGIN + 4 * (32 + MARGIN)
    tiles = picture.crop((0, 0, picture.width, MARGIN + 32))  # the row of tiles, without the labels
    # 0..3 spread over 0..255 on one scale: the channels are 0, 85, 170, 255 grey, 32×32 pixels each
    for grey in (0, 85, 170, 255):
        assert count(tiles, (grey, grey, grey)) >= 32 * 32
    assert count(tiles, (85, 85, 85)) == count(tiles, (170, 170, 170)) == 32 * 32


@pytest.mark.parametrize("shape", [(8, 8), (1, 4, 8, 8)])
def test_latent_image_refuses_a_latent_that_is_not_channels_height_width(shape):
    with pytest.raises(ValueError, match="channels, height, width"):
        latent_image(torch.zeros(shape))


def test_heatmap_maps_the_minimum_to_the_first_ramp_colour_and_the_maximum_to_the_last():
    values = np.linspace(-3.0, 5.0, 12).reshape(3, 4)  # (H, W): minimum top left, maximum bottom right
    picture = heatmap(values)
    assert picture.size == (4, 3)  # PIL sizes are (width, height)
    pixels = np.asarray(picture)
    assert tuple(pixels[0, 0]) == tuple(RAMP[0].astype(np.uint8))
    assert tuple(pixels[-1, -1]) == tuple(RAMP[-1].astype(np.uint8))


def test_heatmap_resizes_to_the_size_asked_for_and_accepts_tensors():
    assert heatmap(torch.randn(8, 8), size=(64, 32)).size == (64, 32)


def test_heatmap_clips_to_a_given_low_and_high():
    pixels = np.asarray(heatmap(np.array([[-10.0, 0.5, 10.0]]), low=0.0, high=1.0))
    assert tuple(pixels[0, 0]) == tuple(RAMP[0].astype(np.uint8))
    assert tuple(pixels[0, 2]) == tuple(RAMP[-1].astype(np.uint8))


def test_heatmap_refuses_anything_but_two_dimensions():
    with pytest.raises(ValueError, match="2-D"):
        heatmap(np.zeros((2, 3, 4)))


def test_overlay_keeps_the_image_size_and_blends_by_alpha():
    image = solid(RED, size=(48, 32))
    values = np.random.default_rng(0).random((4, 6))
    assert overlay(image, values).size == (48, 32)
    assert np.array_equal(np.asarray(overlay(image, values, alpha=0.0)), np.asarray(image))
    assert np.array_equal(np.asarray(overlay(image, values, alpha=1.0)),
                          np.asarray(heatmap(values, size=(48, 32))))


def test_plot_returns_a_matplotlib_figure_with_one_line_per_curve():
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    figure = plot({"a": ([0, 1, 2], [1, 10, 100]), "b": ([0, 1, 2], [3, 2, 1])}, title="t", logy=True)
    assert isinstance(figure, Figure)
    (axes,) = figure.axes
    assert len(axes.lines) == 2 and axes.get_yscale() == "log"


# ---- the step recorder on a real generation -------------------------------------------------------

STEPS = 3
PROMPT = "a large red circle in the center on a white background"


@pytest.fixture(scope="module")
def builtin():
    return sd_scratch.load()


@pytest.fixture(scope="module")
def recorded(builtin):
    recorder = StepRecorder()
    images = builtin.txt2img(PROMPT, height=64, width=64, steps=STEPS, guidance_scale=7.5, seed=0,
                             scheduler="ddim", callback=recorder, progress=False)
    return recorder, images


def test_the_recorder_keeps_one_entry_per_step_at_the_samplers_timesteps(recorded):
    recorder, _ = recorded
    assert [s.step for s in recorder.steps] == list(range(STEPS))
    assert recorder.timesteps == [int(t) for t in make_sampler("ddim", STEPS).timesteps]
    for s in recorder.steps:
        assert s.x_t.shape == s.x0_pred.shape == s.eps_cond.shape == s.eps_uncond.shape == (1, 4, 8, 8)
        assert s.x_t.device.type == "cpu"


def test_the_guidance_gap_is_positive_when_guided(recorded):
    recorder, _ = recorded
    gap = recorder.guidance_gap()
    assert len(gap) == STEPS and all(g > 0 for g in gap)


def test_the_last_recorded_latent_decodes_to_the_generated_image(recorded, builtin):
    recorder, images = recorded
    decoded = recorder.decoded(builtin, "x_t")
    assert len(decoded) == STEPS and decoded[0].size == (64, 64)
    # The recorder decodes all steps as one batch, the pipeline one image: convolution kernels may
    # round a float differently by batch size and thread count, so a pixel may move by one level.
    difference = np.abs(np.asarray(decoded[-1], dtype=int) - np.asarray(images[0], dtype=int))
    assert difference.max() <= 1


def test_the_recorders_filmstrip_is_a_picture_with_four_rows_when_guided(recorded, builtin):
    recorder, _ = recorded
    strip = recorder.filmstrip(builtin)
    assert isinstance(strip, Image.Image)
    tile = 64 * 2  # zoom 2
    assert strip.height >= 4 * (tile + MARGIN) and strip.width >= STEPS * (tile + MARGIN)


def test_without_guidance_the_recorder_has_no_unconditional_eps_a_zero_gap_and_one_row_less(recorded, builtin):
    guided, _ = recorded
    recorder = StepRecorder()
    builtin.txt2img(PROMPT, height=64, width=64, steps=2, guidance_scale=1.0, seed=0, callback=recorder,
                    progress=False)
    assert all(s.eps_uncond is None for s in recorder.steps)
    assert recorder.guidance_gap() == [0.0, 0.0]
    rows_height = guided.filmstrip(builtin).height - recorder.filmstrip(builtin).height
    assert rows_height == 64 * 2 + MARGIN  # no "cond-uncond" row


def test_the_recorders_filmstrip_shrinks_frames_to_tile(recorded, builtin):
    recorder, _ = recorded
    zoomed, tiled = recorder.filmstrip(builtin, zoom=2), recorder.filmstrip(builtin, tile=32)
    # four rows of frames 128 px tall (zoom 2) against 32 px (tile), the same header and margins
    assert zoomed.height - tiled.height == 4 * (128 - 32)
    assert zoomed.width - tiled.width == STEPS * (128 - 32)
