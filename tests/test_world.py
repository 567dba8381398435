"""The built-in model's world (sd_scratch/training/captions.py, toy_shapes.py): what it draws, what its
captions say, what it holds out, and that its pixel analysis reads its own drawings back."""
import random

import numpy as np
import pytest

from sd_scratch.training import captions, toy_shapes
from sd_scratch.training.captions import Pair
from sd_scratch.training.toy_shapes import Scene

VOCABULARY = (set(toy_shapes.SIZES) | set(toy_shapes.COLORS) | set(toy_shapes.SHAPES) | set(toy_shapes.BACKGROUNDS)
              | {w for p in toy_shapes.POSITIONS for w in p.split()} | {w for r in captions.RELATIONS for w in r.split()}
              | {"a", "an", "on", "background", "center"})


def test_a_caption_says_only_what_the_picture_shows_in_the_worlds_words():
    rng = random.Random(0)
    for _ in range(300):
        scene = captions.random_scene(rng)
        text = captions.random_caption(scene, rng)
        words = set(text.replace(",", "").split())
        assert words <= VOCABULARY, text
        assert scene.shape in words, text
        for palette in (toy_shapes.COLORS, toy_shapes.SIZES):
            assert words & set(palette) <= {scene.color, scene.size}, text
        said_background = words & set(toy_shapes.BACKGROUNDS)
        assert said_background <= {scene.background}, text


def test_captions_vary_and_leave_attributes_unsaid():
    rng = random.Random(1)
    scene = Scene("small", "red", "circle", "at the top left", "white")
    texts = {captions.random_caption(scene, rng) for _ in range(200)}
    assert scene.caption in texts  # the old template is one of them
    assert "a red circle" in texts and any("," in t for t in texts)
    assert len(texts) > 20


def test_the_held_out_combinations_are_never_drawn_for_training():
    rng = random.Random(2)
    assert not any(toy_shapes.is_held_out(captions.random_scene(rng)) for _ in range(500))
    assert all(toy_shapes.is_held_out(captions.random_scene(rng, held_out=True)) for _ in range(100))
    assert not any(captions.is_held_out_pair(captions.random_pair(rng)) for _ in range(500))
    assert all(captions.is_held_out_pair(captions.random_pair(rng, held_out=True)) for _ in range(100))


def test_a_pair_always_has_two_colours_and_a_caption_with_its_relation():
    rng = random.Random(3)
    for _ in range(100):
        pair = captions.random_pair(rng)
        assert pair.first[1] != pair.second[1]
        assert f" {pair.relation} " in captions.random_caption(pair, rng)


def test_the_one_shape_drawing_is_the_old_render():
    scene = Scene("large", "blue", "triangle", "at the bottom right", "gray")
    picture = captions.place(scene, random.Random(4))
    (thing,) = picture.things
    cx, cy = toy_shapes.POSITIONS[scene.position]
    assert abs(thing.center[0] - cx) <= toy_shapes.JITTER and abs(thing.center[1] - cy) <= toy_shapes.JITTER
    found = toy_shapes.analyse(toy_shapes.draw(picture).image)
    assert (found.color, found.shape, found.position, found.background) == ("blue", "triangle", scene.position, "gray")


@pytest.mark.parametrize("relation", captions.SPATIAL_RELATIONS)
def test_the_analysis_reads_back_both_shapes_and_their_relation(relation):
    rng = random.Random(5)
    hits = 0
    for _ in range(40):
        pair = captions.random_pair(rng)
        pair = Pair(pair.first, relation, pair.second, pair.background)
        background, found = toy_shapes.analyse_things(toy_shapes.draw(captions.place(pair, rng)).image)
        by_color = {f.color: f for f in found}
        first, second = by_color.get(pair.first[1]), by_color.get(pair.second[1])
        hits += (background == pair.background and first is not None and second is not None
                 and (first.shape, second.shape) == (pair.first[2], pair.second[2])
                 and toy_shapes.relation_of(first, second) == relation)
    assert hits == 40


def test_depth_puts_the_front_shape_nearest_and_edges_outline_the_shapes():
    front = toy_shapes.Thing("large", "red", "square", (36, 36))
    back = toy_shapes.Thing("large", "blue", "square", (26, 26))
    drawing = toy_shapes.draw(toy_shapes.Picture("white", (back, front)))
    assert drawing.depth[36, 36] == toy_shapes.NEARNESS_FRONT
    assert drawing.depth[15, 15] == toy_shapes.NEARNESS_BACK
    assert drawing.depth[2, 2] == 0.0
    lone = toy_shapes.draw(toy_shapes.Picture("white", (front,)))
    assert lone.depth[36, 36] == toy_shapes.NEARNESS_ALONE
    # the edge map is the boundary of the owner map: on the outline, never inside or far outside
    assert lone.edges[36, 21] and lone.edges[21, 36] and not lone.edges[36, 36] and not lone.edges[5, 5]
    assert lone.edges.sum() == pytest.approx(4 * 30 * 2, rel=0.1)  # two pixels thick around a 30-px square


def test_make_world_gives_images_depth_and_edges_of_the_same_pictures():
    data = captions.make_world(20, seed=0)
    assert data.images.shape == (20, 3, 64, 64) and data.depth.shape == data.edges.shape == (20, 1, 64, 64)
    assert data.images.min() >= -1 and data.images.max() <= 1
    foreground = (data.depth > 0).float()
    # wherever there is a shape the image differs from its corner colour, and the edges lie on its border
    corner = data.images[:, :, :1, :1]
    differs = ((data.images - corner).abs().amax(1, keepdim=True) > 0.2).float()
    assert ((differs - foreground).abs().mean() < 0.03).item()
    assert np.isclose(data.edges.max().item(), 1.0)
