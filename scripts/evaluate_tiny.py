"""Measure whether the built-in model draws what its captions say, on combinations it never saw.

    python scripts/evaluate_tiny.py                       # sd_scratch/data/tiny-shapes.safetensors, 200 captions
    python scripts/evaluate_tiny.py --weights other.safetensors --grid weights/tiny-shapes-samples.png

The 200 captions cycle through the 120 held-out combinations of `sd_scratch.training.toy_shapes` in a shuffled
order fixed by --seed; each batch of images is generated with its own fixed seed. Every image is read
back by `toy_shapes.analyse` (pixel arithmetic, no neural judge), and the script prints how often the
colour, the background, the position and the shape agree with the caption, and writes a grid of
the first samples with their prompts.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image

import sd_scratch
from sd_scratch import pipelines
from sd_scratch.lab import visualize
from sd_scratch.training import toy_shapes

REPO = Path(__file__).resolve().parent.parent
ATTRIBUTES = ("color", "background", "position", "shape")
BAR = {"color": 0.90, "background": 0.90, "position": 0.80, "shape": 0.70}  # the quality bar


def held_out_sample(n: int, seed: int) -> list[toy_shapes.Scene]:
    """n held-out scenes: all of them in a shuffled order, repeated as needed."""
    scenes = toy_shapes.held_out_scenes()
    random.Random(seed).shuffle(scenes)
    return [scenes[i % len(scenes)] for i in range(n)]


def generate(sd, scenes: list[toy_shapes.Scene], seed: int, batch: int, **settings) -> list[Image.Image]:
    images = []
    for b in range(0, len(scenes), batch):
        prompts = [s.caption for s in scenes[b:b + batch]]
        images += pipelines.txt2img(sd, prompts, height=toy_shapes.IMAGE_SIZE, width=toy_shapes.IMAGE_SIZE,
                                    seed=seed + b, progress=False, **settings)
    return images


def score(scenes: list[toy_shapes.Scene], images: list[Image.Image]) -> dict[str, float]:
    """The fraction of images whose analysis agrees with the caption, per attribute."""
    hits = dict.fromkeys(ATTRIBUTES, 0)
    for scene, image in zip(scenes, images):
        found = toy_shapes.analyse(image)
        for a in ATTRIBUTES:
            hits[a] += getattr(found, a) == getattr(scene, a)
    return {a: hits[a] / len(scenes) for a in ATTRIBUTES}


def main(argv=None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None, help="default: the built-in model")
    p.add_argument("-n", type=int, default=200, help="captions to generate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--grid", type=Path, default=REPO / "weights" / "tiny-shapes-samples.png")
    p.add_argument("--grid-count", type=int, default=24)
    args = p.parse_args(argv)

    sd = sd_scratch.load(args.weights) if args.weights else sd_scratch.load()
    scenes = held_out_sample(args.n, args.seed)
    images = generate(sd, scenes, args.seed, args.batch, steps=args.steps, guidance_scale=args.guidance,
                      scheduler=args.scheduler)
    result = score(scenes, images)
    print(f"{args.n} held-out captions, {args.steps} {args.scheduler} steps, guidance {args.guidance}, seed {args.seed}")
    for a in ATTRIBUTES:
        verdict = "meets" if result[a] >= BAR[a] else "below"
        print(f"  {a:<10} {100 * result[a]:5.1f}%   ({verdict} the bar of {100 * BAR[a]:.0f}%)")
    if args.grid_count:
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        shown = slice(0, args.grid_count)
        visualize.grid(images[shown], [s.caption for s in scenes[shown]], columns=6, zoom=2).save(args.grid)
        print(f"wrote {args.grid}")
    return result


if __name__ == "__main__":
    main()
