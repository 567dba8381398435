"""The built-in model's world as people describe it: one or two shapes, captions in many phrasings.

`toy_shapes` draws; this file decides *what* is drawn and *how it is said*. Two kinds of scene:

    Scene  one shape: size, colour, shape, position, background (toy_shapes.Scene, 960 combinations)
    Pair   two shapes in a relation: "a red circle above a blue square", "... in front of ..."

A caption says only some of the attributes, in one of several phrasings:

    "a small red circle at the top left on a white background"    the template, everything said
    "a red circle"                                                 colour and shape only
    "red circle, top left, black background"                       comma style, as people type prompts
    "a blue square on gray at the bottom right"                    another order

An attribute the caption leaves out is drawn at random for the picture, so the model learns that
it is free: the same prompt with another seed gives another size, place or background.

Held out for the evaluation: the one-shape combinations of `toy_shapes.is_held_out` (never drawn in
training, whatever the caption says), and the pairs whose (colour, shape, relation, colour, shape)
indices sum to a multiple of HOLD_OUT_EVERY.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from .toy_shapes import (BACKGROUNDS, COLORS, HOLD_OUT_EVERY, IMAGE_SIZE, JITTER, POSITIONS, SHAPES, SIZES,
                         Picture, Scene, Thing, draw, is_held_out, to_tensor)

# What a comma-style prompt says for each position.
SHORT_POSITIONS = {"at the top left": "top left", "at the top right": "top right", "in the center": "center",
                   "at the bottom left": "bottom left", "at the bottom right": "bottom right"}
RELATIONS = ("above", "below", "to the left of", "to the right of", "in front of", "behind")
SPATIAL_RELATIONS = RELATIONS[:4]  # the ones whose two shapes do not overlap
# How often a caption says each attribute when it is not the full template.
SAY_PROBABILITY = {"color": 0.8, "size": 0.4, "position": 0.5, "background": 0.5}
TEMPLATE_SHARE = 0.3  # captions that are the old template, everything said
PAIR_SHARE = 0.35  # scenes with two shapes
PAIR_SAYS_COLOR = 0.9  # a pair's caption names each shape's colour this often
LANES = (17, 32, 47)  # the row or column two shapes share when one is above or beside the other
OVERLAP_OFFSET = 11  # pixels between the centres of a pair that overlaps, along each axis


@dataclass(frozen=True)
class Pair:
    """Two shapes: `first` stands in `relation` to `second`. Each is (size, colour, shape)."""
    first: tuple[str, str, str]
    relation: str
    second: tuple[str, str, str]
    background: str

    @property
    def caption(self) -> str:
        return describe_pair(self, said_color=True, said_size=True, said_background=True)


def is_held_out_pair(pair: Pair) -> bool:
    indices = (list(COLORS).index(pair.first[1]), SHAPES.index(pair.first[2]), RELATIONS.index(pair.relation),
               list(COLORS).index(pair.second[1]), SHAPES.index(pair.second[2]))
    return sum(indices) % HOLD_OUT_EVERY == 0


# ---- choosing scenes -----------------------------------------------------------------------------------

def random_scene(rng: random.Random, held_out: bool = False) -> Scene:
    """A one-shape scene, every attribute uniform, from the training (or the held-out) combinations."""
    while True:
        scene = Scene(rng.choice(list(SIZES)), rng.choice(list(COLORS)), rng.choice(SHAPES),
                      rng.choice(list(POSITIONS)), rng.choice(list(BACKGROUNDS)))
        if is_held_out(scene) == held_out:
            return scene


def random_pair(rng: random.Random, held_out: bool = False) -> Pair:
    """Two shapes of different colours in a relation, from the training (or the held-out) combinations."""
    while True:
        first_color, second_color = rng.sample(list(COLORS), 2)
        pair = Pair((rng.choice(list(SIZES)), first_color, rng.choice(SHAPES)), rng.choice(RELATIONS),
                    (rng.choice(list(SIZES)), second_color, rng.choice(SHAPES)), rng.choice(list(BACKGROUNDS)))
        if is_held_out_pair(pair) == held_out:
            return pair


def place(scene: Scene | Pair, rng: random.Random) -> Picture:
    """Where the shapes go: a Scene's position word; a Pair shares a lane (above/below: a column,
    beside: a row) or overlaps near the centre, the one in front drawn last. Centres jitter by ±JITTER."""
    def jitter(x: float, y: float) -> tuple[float, float]:
        return x + rng.randint(-JITTER, JITTER), y + rng.randint(-JITTER, JITTER)

    if isinstance(scene, Scene):
        return Picture(scene.background, (Thing(scene.size, scene.color, scene.shape,
                                                jitter(*POSITIONS[scene.position])),))
    lane, near, far = rng.choice(LANES), min(LANES), max(LANES)
    if scene.relation in ("above", "below"):
        top, bottom = (scene.first, scene.second) if scene.relation == "above" else (scene.second, scene.first)
        placed = [(top, jitter(lane, near)), (bottom, jitter(lane, far))]
    elif scene.relation in ("to the left of", "to the right of"):
        left, right = (scene.first, scene.second) if scene.relation == "to the left of" else (scene.second, scene.first)
        placed = [(left, jitter(near, lane)), (right, jitter(far, lane))]
    else:  # overlapping: the back one first
        back, front = (scene.second, scene.first) if scene.relation == "in front of" else (scene.first, scene.second)
        dx, dy = rng.choice((-1, 1)) * OVERLAP_OFFSET, rng.choice((-1, 1)) * OVERLAP_OFFSET
        middle = IMAGE_SIZE / 2
        placed = [(back, jitter(middle - dx / 2, middle - dy / 2)), (front, jitter(middle + dx / 2, middle + dy / 2))]
    return Picture(scene.background, tuple(Thing(size, color, shape, center) for (size, color, shape), center in placed))


# ---- saying it ----------------------------------------------------------------------------------------

def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(scene: Scene, said: set[str], comma: bool = False, order: tuple[str, ...] = ("position", "background"),
             short_background: bool = False) -> str:
    """The caption of a one-shape scene that says the attributes in `said` (the shape is always said).
    comma: "red circle, top left, white background"; else a sentence, position and background in `order`."""
    words = [getattr(scene, a) for a in ("size", "color") if a in said] + [scene.shape]
    if comma:
        parts = [" ".join(words)]
        for a in order:
            if a in said:
                parts.append(SHORT_POSITIONS[scene.position] if a == "position" else f"{scene.background} background")
        return ", ".join(parts)
    text = [article(words[0]) + " " + " ".join(words)]
    for a in order:
        if a == "position" and a in said:
            text.append(scene.position)
        elif a == "background" and a in said:
            text.append(f"on {scene.background}" if short_background else f"on a {scene.background} background")
    return " ".join(text)


def describe_pair(pair: Pair, said_color: bool, said_size: bool, said_background: bool) -> str:
    def thing(size: str, color: str, shape: str) -> str:
        words = ([size] if said_size else []) + ([color] if said_color else []) + [shape]
        return article(words[0]) + " " + " ".join(words)
    text = f"{thing(*pair.first)} {pair.relation} {thing(*pair.second)}"
    return text + (f" on a {pair.background} background" if said_background else "")


def random_caption(scene: Scene | Pair, rng: random.Random) -> str:
    """One of the ways a person might describe `scene`: the template, or a subset in some phrasing."""
    if isinstance(scene, Pair):
        return describe_pair(scene, rng.random() < PAIR_SAYS_COLOR, rng.random() < SAY_PROBABILITY["size"],
                             rng.random() < SAY_PROBABILITY["background"])
    if rng.random() < TEMPLATE_SHARE:
        return scene.caption
    said = {a for a, p in SAY_PROBABILITY.items() if rng.random() < p}
    order = ("position", "background") if rng.random() < 0.5 else ("background", "position")
    return describe(scene, said, comma=rng.random() < 0.4, order=order, short_background=rng.random() < 0.5)


# ---- a training set -------------------------------------------------------------------------------------

@dataclass
class WorldData:
    images: torch.Tensor  # (N, 3, 64, 64) in [-1, 1]
    depth: torch.Tensor  # (N, 1, 64, 64) nearness in [0, 1]
    edges: torch.Tensor  # (N, 1, 64, 64) 0 or 1
    scenes: list  # the Scene or Pair each image shows; captions are drawn from it per step


def make_world(n: int, seed: int, held_out: bool = False) -> WorldData:
    """n pictures from the training (or held-out) combinations, PAIR_SHARE of them with two shapes."""
    rng = random.Random(seed)
    scenes = [random_pair(rng, held_out) if rng.random() < PAIR_SHARE else random_scene(rng, held_out)
              for _ in range(n)]
    drawings = [draw(place(s, rng)) for s in scenes]
    return WorldData(to_tensor([d.image for d in drawings]),
                     torch.from_numpy(np.stack([d.depth for d in drawings]))[:, None],
                     torch.from_numpy(np.stack([d.edges for d in drawings]).astype(np.float32))[:, None],
                     scenes)
