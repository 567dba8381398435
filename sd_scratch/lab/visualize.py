"""Pictures of what happens inside: grids, filmstrips, latents, heatmaps, and a step recorder.

The notebooks (`notebooks/`) show every step of the documents with real tensors; the drawing they
need lives here, tested, instead of being pasted into cells. Everything returns a PIL image, which
a notebook displays as a picture when it is a cell's last value. Only `plot` needs matplotlib (the
optional `notebooks` extra); the rest is PIL and numpy.

    grid(images, labels)                     images side by side, a caption under each
    filmstrip({"x_t": [...], "x0": [...]})    one labelled row per quantity, one column per step
    latent_image(z)                          a latent (4, h, w) as its channels side by side, in grey
    heatmap(values) / overlay(image, values) a 2-D array in colour, alone or over a picture
    StepRecorder                             the pipelines' callback: keeps x_t, x̂₀, ε per step
"""
from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..images import decode
from ..pipelines import StepInfo

if TYPE_CHECKING:
    from ..stable_diffusion import StableDiffusion

MARGIN = 4  # pixels between tiles
LINE_HEIGHT = 11  # PIL's default bitmap font is 11 px tall
# A dark-to-bright colour ramp (dark blue, purple, orange, pale yellow), so low and high values read at
# a glance and the ramp stays legible in greyscale.
RAMP = np.array([(10, 10, 50), (100, 30, 130), (220, 80, 60), (250, 180, 40), (255, 250, 200)], dtype=np.float32)


def _text_lines(text: str, width_px: int) -> list[str]:
    """`text` wrapped to fit `width_px` (about 6 px per character in PIL's default font)."""
    return textwrap.wrap(text, max(4, width_px // 6)) if text else []


def _zoomed(image: Image.Image, zoom: int) -> Image.Image:
    """Enlarge by an integer factor with nearest-neighbour, so every pixel stays the model's own."""
    return image if zoom == 1 else image.resize((image.width * zoom, image.height * zoom), Image.NEAREST)


def grid(images: Sequence[Image.Image], labels: Sequence[str] | None = None, columns: int | None = None,
         zoom: int = 1, title: str | None = None) -> Image.Image:
    """Images in rows of `columns` (default: all in one row), each with its label wrapped below."""
    if not images:
        raise ValueError("grid needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"labels: got {len(labels)} for {len(images)} images")
    tiles = [_zoomed(im.convert("RGB"), zoom) for im in images]
    columns = columns or len(tiles)
    tile_w, tile_h = max(t.width for t in tiles), max(t.height for t in tiles)
    wrapped = [_text_lines(label, tile_w) for label in labels] if labels else [[] for _ in tiles]
    text_h = LINE_HEIGHT * max(len(lines) for lines in wrapped) + (2 if labels else 0)
    title_h = LINE_HEIGHT + MARGIN if title else 0
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (MARGIN + columns * (tile_w + MARGIN),
                              title_h + MARGIN + rows * (tile_h + text_h + MARGIN)), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((MARGIN, MARGIN), title, fill="black")
    for i, (tile, lines) in enumerate(zip(tiles, wrapped)):
        x = MARGIN + (i % columns) * (tile_w + MARGIN)
        y = title_h + MARGIN + (i // columns) * (tile_h + text_h + MARGIN)
        sheet.paste(tile, (x, y))
        draw.multiline_text((x, y + tile.height + 2), "\n".join(lines), fill="black", spacing=0)
    return sheet


def filmstrip(rows: dict[str, Sequence[Image.Image]], column_labels: Sequence[str] | None = None,
              zoom: int = 1, title: str | None = None) -> Image.Image:
    """One row per entry of `rows` (its name written at the left), one column per frame."""
    if not rows:
        raise ValueError("filmstrip needs at least one row")
    lengths = {len(frames) for frames in rows.values()}
    if len(lengths) != 1:
        raise ValueError(f"every row needs the same number of frames, got {sorted(lengths)}")
    n = lengths.pop()
    tiles = {name: [_zoomed(im.convert("RGB"), zoom) for im in frames] for name, frames in rows.items()}
    tile_w = max(t.width for frames in tiles.values() for t in frames)
    tile_h = max(t.height for frames in tiles.values() for t in frames)
    label_w = 6 * max(len(name) for name in rows) + 2 * MARGIN
    header_h = (LINE_HEIGHT + 2 if column_labels else 0) + (LINE_HEIGHT + MARGIN if title else 0)
    sheet = Image.new("RGB", (label_w + n * (tile_w + MARGIN) + MARGIN,
                              header_h + MARGIN + len(rows) * (tile_h + MARGIN)), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((MARGIN, MARGIN), title, fill="black")
    if column_labels:
        for c, label in enumerate(column_labels[:n]):
            draw.text((label_w + c * (tile_w + MARGIN), header_h - LINE_HEIGHT - 2), str(label)[:tile_w // 6],
                      fill="black")
    for r, (name, frames) in enumerate(tiles.items()):
        y = header_h + MARGIN + r * (tile_h + MARGIN)
        draw.text((MARGIN, y + tile_h // 2 - LINE_HEIGHT // 2), name, fill="black")
        for c, tile in enumerate(frames):
            sheet.paste(tile, (label_w + c * (tile_w + MARGIN), y))
    return sheet


def _normalise(values: np.ndarray, low: float | None, high: float | None) -> np.ndarray:
    low = float(values.min()) if low is None else low
    high = float(values.max()) if high is None else high
    return np.clip((values - low) / (high - low), 0, 1) if high > low else np.zeros_like(values)


def _as_array(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float32)


def latent_image(latent: torch.Tensor, zoom: int = 4, low: float | None = None,
                 high: float | None = None) -> Image.Image:
    """A latent (C, h, w), e.g. SD's 4×64×64, as its C channels side by side in grey, all on one
    scale (default: the latent's own min to max), so channels can be compared with one another."""
    values = _as_array(latent)
    if values.ndim != 3:
        raise ValueError(f"latent must be (channels, height, width), got shape {tuple(values.shape)}")
    grey = (_normalise(values, low, high) * 255).round().astype(np.uint8)
    channels = [Image.fromarray(c).convert("RGB") for c in grey]
    return grid(channels, labels=[f"ch {i}" for i in range(len(channels))], zoom=zoom)


def heatmap(values, size: tuple[int, int] | None = None, low: float | None = None,
            high: float | None = None) -> Image.Image:
    """A 2-D array in the RAMP colours, low = dark; `size` (width, height) enlarges it smoothly."""
    values = _as_array(values)
    if values.ndim != 2:
        raise ValueError(f"heatmap needs a 2-D array, got shape {tuple(values.shape)}")
    position = _normalise(values, low, high) * (len(RAMP) - 1)
    below = np.floor(position).astype(int).clip(0, len(RAMP) - 2)
    frac = (position - below)[..., None]
    rgb = RAMP[below] * (1 - frac) + RAMP[below + 1] * frac
    image = Image.fromarray(rgb.round().astype(np.uint8))
    return image.resize(size, Image.BILINEAR) if size else image


def overlay(image: Image.Image, values, alpha: float = 0.6, low: float | None = None,
            high: float | None = None) -> Image.Image:
    """`heatmap(values)` stretched over `image` and blended with weight `alpha`."""
    heat = heatmap(values, size=image.size, low=low, high=high)
    return Image.blend(image.convert("RGB"), heat, alpha)


def plot(curves: dict[str, tuple[Sequence[float], Sequence[float]]], title: str = "", xlabel: str = "",
         ylabel: str = "", logy: bool = False, size: tuple[float, float] = (5.0, 3.2)):
    """Line plots, `{name: (xs, ys)}`, on one matplotlib figure, which a notebook shows. Needs the
    `notebooks` extra (matplotlib)."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plot needs matplotlib: pip install 'sd-scratch[notebooks]'") from None
    figure, axes = plt.subplots(figsize=size)
    for name, (xs, ys) in curves.items():
        axes.plot(list(xs), list(ys), label=name)
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logy:
        axes.set_yscale("log")
    if len(curves) > 1:
        axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    plt.close(figure)  # the figure is returned and shown once, not again at the end of the cell
    return figure


class StepRecorder:
    """A pipeline `callback` that keeps every step's StepInfo (on the CPU), then draws them.

        recorder = StepRecorder()
        sd.txt2img("a red circle", callback=recorder, steps=10)
        recorder.filmstrip(sd)     # rows x_t, x̂₀ (decoded), ε_cond, ε_cond − ε_uncond
    """

    def __init__(self):
        self.steps: list[StepInfo] = []

    def __call__(self, info: StepInfo) -> None:
        cpu = lambda x: None if x is None else x.detach().float().cpu()  # noqa: E731
        self.steps.append(StepInfo(info.step, info.t, cpu(info.x_t), cpu(info.x0_pred), cpu(info.eps_cond),
                                   cpu(info.eps_uncond)))

    @property
    def timesteps(self) -> list[int | float]:
        return [s.t for s in self.steps]

    def guidance_gap(self) -> list[float]:
        """Per step, ‖ε_cond − ε_uncond‖ / ‖ε_cond‖ over the batch: how much the prompt changes the UNet's
        answer (0 without guidance)."""
        return [0.0 if s.eps_uncond is None else
                float((s.eps_cond - s.eps_uncond).norm() / s.eps_cond.norm()) for s in self.steps]

    def decoded(self, sd: StableDiffusion, which: str = "x0_pred", index: int = 0,
                steps: Sequence[int] | None = None, preview=None) -> list[Image.Image]:
        """Image `index` of the batch, decoded by the VAE at every step (or at the recorded `steps`
        given); `which` is x_t or x0_pred. `preview`: a preview decoder instead of the VAE
        (`addons.preview.load_preview_decoder()`, several times faster; its `.pictures(latents)` is used)."""
        chosen = self.steps if steps is None else [self.steps[k] for k in steps]
        latents = torch.stack([getattr(s, which)[index] for s in chosen])  # (steps, 4, h, w)
        if preview is not None:
            return preview.pictures(latents)
        return decode(sd, latents.to(sd.device, sd.dtype))

    def channel_images(self, which: str = "eps_cond", channel: int = 0, index: int = 0,
                       zoom: int = 4) -> list[Image.Image]:
        """One latent channel of `which` per step as a heatmap, on one scale across all steps;
        `which` may also be "gap" (ε_cond − ε_uncond)."""
        def pick(s: StepInfo) -> np.ndarray:
            x = s.eps_cond - s.eps_uncond if which == "gap" else getattr(s, which)
            return _as_array(x[index, channel])
        frames = [pick(s) for s in self.steps]
        low, high = min(f.min() for f in frames), max(f.max() for f in frames)
        return [_zoomed(heatmap(f, low=low, high=high), zoom) for f in frames]

    def filmstrip(self, sd: StableDiffusion, every: int = 1, index: int = 0, zoom: int = 2,
                  tile: int | None = None, preview=None) -> Image.Image:
        """The x-ray of one image: x_t and x̂₀ decoded, ε_cond's first channel, and the guidance
        difference ε_cond − ε_uncond (when guided), for every `every`-th step. Frames are the decoded
        image's size times `zoom`, or `tile` pixels wide when given (to shrink 512×512 frames);
        `preview`: a preview decoder for the x_t and x̂₀ rows instead of the VAE (see `decoded`)."""
        keep = list(range(0, len(self.steps), every))
        if keep[-1] != len(self.steps) - 1:
            keep.append(len(self.steps) - 1)
        pick = lambda frames: [frames[k] for k in keep]  # noqa: E731
        latent_zoom = zoom * sd.vae.config.factor  # a latent pixel covers factor × factor image pixels
        decoded = lambda which: [_zoomed(im, zoom) for im in self.decoded(sd, which, index, keep, preview)]  # noqa: E731
        rows = {"x_t": decoded("x_t"), "x0_pred": decoded("x0_pred"),
                "eps_ch0": pick(self.channel_images("eps_cond", index=index, zoom=latent_zoom))}
        if self.steps[0].eps_uncond is not None:
            rows["cond-uncond"] = pick(self.channel_images("gap", index=index, zoom=latent_zoom))
        if tile is not None:
            rows = {name: [f.resize((tile, round(tile * f.height / f.width)), Image.NEAREST) for f in frames]
                    for name, frames in rows.items()}
        return filmstrip(rows, column_labels=[f"t={self.steps[k].t}" for k in keep])
