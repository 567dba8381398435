"""Measure whether the built-in model shows what the documents teach, on combinations it never saw.

    python scripts/evaluate_tiny.py                       # every section, sd_scratch/data/tiny-shapes.safetensors
    python scripts/evaluate_tiny.py --sections full,pairs --weights other.safetensors

Every caption describes a held-out combination (`sd_scratch.training.captions`: one-shape scenes and
pairs never drawn in training). Every image is read back by the world's own pixel analysis
(`toy_shapes.analyse`, `analyse_things`: no neural judge). The sections, each with its bar:

    full      the template caption, every attribute said: colour, background ≥ 95%, shape, position ≥ 90%
    partial   partial and reworded captions ("a red circle", "red circle, top left, gray background", ...):
              each said attribute; colour ≥ 90%
    pairs     "a red circle above a blue square": both shapes right (colour and shape) ≥ 80%, the
              relation; overlapping pairs ("in front of") reported beside them
    seeds     a partial caption at two seeds: the pictures differ in an unsaid attribute ≥ 80%
    guidance  the share of images with every said attribute right at w = 1, 3, 5, 7.5, 10:
              the best w > 1, and ≥ 5 points above w = 1
    img2img   distance to the start picture against strength (no cliff: no 0.05 step of strength
              carries more than CLIFF_SHARE of the whole change), for a prompt that only names the
              start's shape and for a recolouring one; and at strength 0.5 the recolouring prompt
              changes the colour and keeps the shape and position
    classifier  classifier guidance alone: the empty prompt, no CFG, steered by the shipped noisy-latent
              classifier to "red" or to "triangle"; how often the picture has the attribute, by scale

Each batch of images has its own fixed seed, so a run is reproducible.
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
from PIL import Image

import sd_scratch
from sd_scratch import pipelines
from sd_scratch.lab import visualize
from sd_scratch.training import captions, toy_shapes
from sd_scratch.training.captions import Pair
from sd_scratch.training.toy_shapes import Scene

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("full", "partial", "pairs", "seeds", "guidance", "img2img", "classifier")
ATTRIBUTES = ("color", "background", "position", "shape")
EVERYTHING = {"size", "color", "position", "background"}
BAR = {"full": {"color": 0.95, "background": 0.95, "shape": 0.90, "position": 0.90}, "partial": {"color": 0.90},
       "pairs": 0.80, "seeds": 0.80, "guidance_gain": 0.05}
GUIDANCE_SCALES = (1.0, 3.0, 5.0, 7.5, 10.0)
STRENGTHS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
CLIFF_SHARE = 0.25
CLASSIFIER_SCALES = (0.0, 1.0, 3.0, 10.0, 30.0)
STEERED = ({"color": "red"}, {"shape": "triangle"})
# The partial and reworded captions: which attributes each says, and how.
PARTIAL_FORMS = {
    "colour and shape": dict(said={"color"}),
    "no size, no position": dict(said={"color", "background"}),
    "comma style, everything": dict(said=EVERYTHING, comma=True),
    "another order, short background": dict(said=EVERYTHING, order=("background", "position"), short_background=True),
    "position only": dict(said={"color", "position"}),
}


def held_out(n: int, seed: int, pairs: bool = False, relations=captions.RELATIONS) -> list:
    """n held-out scenes (or pairs in `relations`), drawn with a fixed seed."""
    rng = random.Random(seed)
    if not pairs:
        return [captions.random_scene(rng, held_out=True) for _ in range(n)]
    out = []
    while len(out) < n:
        pair = captions.random_pair(rng, held_out=True)
        if pair.relation in relations:
            out.append(pair)
    return out


def generate(sd, prompts: list[str], seed: int, batch: int, **settings) -> list[Image.Image]:
    images = []
    for b in range(0, len(prompts), batch):
        images += pipelines.txt2img(sd, prompts[b:b + batch], height=toy_shapes.IMAGE_SIZE,
                                    width=toy_shapes.IMAGE_SIZE, seed=seed + b, progress=False, **settings)
    return images


def said_attributes_right(scene: Scene, said: set[str], image: Image.Image) -> dict[str, bool]:
    found = toy_shapes.analyse(image)
    return {a: getattr(found, a) == getattr(scene, a) for a in ("shape", *sorted(said))}


def pair_right(pair: Pair, image: Image.Image) -> dict[str, bool]:
    """Both shapes (colour and shape), the relation between them, and for overlapping pairs the front one."""
    background, found = toy_shapes.analyse_things(image)
    by_color = {f.color: f for f in found}
    first, second = by_color.get(pair.first[1]), by_color.get(pair.second[1])
    both_colors = first is not None and second is not None
    if pair.relation in captions.SPATIAL_RELATIONS:
        both = both_colors and (first.shape, second.shape) == (pair.first[2], pair.second[2])
        relation = both_colors and toy_shapes.relation_of(first, second) == pair.relation
        return {"both shapes": both, "relation": relation, "background": background == pair.background}
    front = pair.first if pair.relation == "in front of" else pair.second  # a hidden shape has no shape to read
    front_found = by_color.get(front[1])
    return {"both colours": both_colors, "front shape": front_found is not None and front_found.shape == front[2],
            "background": background == pair.background}


def rates(results: list[dict[str, bool]]) -> dict[str, float]:
    keys = sorted({k for r in results for k in r})
    return {k: np.mean([r[k] for r in results if k in r]) for k in keys}


def line(name: str, value: float, bar: float | None = None) -> str:
    verdict = "" if bar is None else ("  meets the bar of" if value >= bar else "  BELOW the bar of") + f" {100 * bar:.0f}%"
    return f"  {name:<34} {100 * value:5.1f}%{verdict}"


# ---- the sections -------------------------------------------------------------------------------------

def full(sd, args) -> list[str]:
    scenes = held_out(args.n, args.seed)
    images = generate(sd, [s.caption for s in scenes], args.seed, args.batch, **args.settings)
    result = rates([said_attributes_right(s, EVERYTHING - {"size"}, im) for s, im in zip(scenes, images)])
    save_grid(images[:24], [s.caption for s in scenes[:24]], args.grid)
    return [line(a, result[a], BAR["full"][a]) for a in ATTRIBUTES]


def partial(sd, args) -> list[str]:
    lines = []
    for k, (form, how) in enumerate(PARTIAL_FORMS.items()):
        scenes = held_out(args.n // len(PARTIAL_FORMS), args.seed + 100 * k)
        prompts = [captions.describe(s, **how) for s in scenes]
        images = generate(sd, prompts, args.seed, args.batch, **args.settings)
        result = rates([said_attributes_right(s, how["said"] - {"size"}, im) for s, im in zip(scenes, images)])
        said = ", ".join(f"{a} {100 * v:.0f}%" for a, v in result.items())
        lines.append(f"  {form:<34} ({prompts[0]!r}): {said}" + (
            "" if result["color"] >= BAR["partial"]["color"] else "  colour BELOW the bar"))
    return lines


def pairs(sd, args) -> list[str]:
    lines = []
    for name, relations in (("beside or above", captions.SPATIAL_RELATIONS), ("overlapping", captions.RELATIONS[4:])):
        chosen = held_out(args.n // 2, args.seed, pairs=True, relations=relations)
        images = generate(sd, [p.caption for p in chosen], args.seed, args.batch, **args.settings)
        result = rates([pair_right(p, im) for p, im in zip(chosen, images)])
        lines += [line(f"{name}: {k}", v, BAR["pairs"] if k == "both shapes" else None) for k, v in result.items()]
        if name == "beside or above":
            save_grid(images[:24], [p.caption for p in chosen[:24]], args.grid.with_name(args.grid.stem + "-pairs.png"))
    return lines


def seeds(sd, args) -> list[str]:
    scenes = held_out(args.n // 2, args.seed)
    prompts = [captions.describe(s, {"color"}) for s in scenes]  # size, position, background unsaid
    a = generate(sd, prompts, args.seed, args.batch, **args.settings)
    b = generate(sd, prompts, args.seed + 10_000, args.batch, **args.settings)
    differ = [any(getattr(x, u) != getattr(y, u) for u in ("size", "position", "background"))
              for x, y in zip(map(toy_shapes.analyse, a), map(toy_shapes.analyse, b))]
    return [line("two seeds differ in an unsaid attribute", np.mean(differ), BAR["seeds"])]


def guidance(sd, args) -> list[str]:
    third = args.n // 3
    scenes = held_out(third, args.seed + 1)
    forms = list(PARTIAL_FORMS.values())
    hows = [forms[i % len(forms)] for i in range(third)]
    chosen = held_out(third, args.seed + 2, pairs=True, relations=captions.SPATIAL_RELATIONS)
    prompts = ([s.caption for s in scenes] + [captions.describe(s, **h) for s, h in zip(scenes, hows)]
               + [p.caption for p in chosen])
    accuracy = {}
    for w in GUIDANCE_SCALES:
        images = generate(sd, prompts, args.seed, args.batch, **{**args.settings, "guidance_scale": w})
        right = ([all(said_attributes_right(s, EVERYTHING - {"size"}, im).values()) for s, im in zip(scenes, images)]
                 + [all(said_attributes_right(s, h["said"] - {"size"}, im).values())
                    for s, h, im in zip(scenes, hows, images[third:])]
                 + [pair_right(p, im)["both shapes"] for p, im in zip(chosen, images[2 * third:])])
        accuracy[w] = float(np.mean(right))
    best = max(accuracy, key=accuracy.get)
    gain = accuracy[best] - accuracy[1.0]
    lines = [f"  w = {w:<4}  every said attribute right {100 * v:5.1f}%" for w, v in accuracy.items()]
    verdict = "meets" if best > 1 and gain >= BAR["guidance_gain"] else "BELOW"
    return lines + [f"  best w = {best}, {100 * gain:+.1f} points over w = 1 ({verdict} the bar: best w > 1, ≥ +5)"]


def img2img(sd, args) -> list[str]:
    """Two prompts per start picture: its shape alone ("a circle": nothing in it contradicts the
    picture, so what changes is what strength lets the model redraw) and a recolouring caption
    (everything the same but the colour)."""
    rng = random.Random(args.seed)
    scenes = held_out(args.n // 10, args.seed + 3)
    starts = [toy_shapes.draw(captions.place(s, rng)).image for s in scenes]
    recolour = [Scene(s.size, rng.choice([c for c in toy_shapes.COLORS if c != s.color]), s.shape, s.position,
                      s.background) for s in scenes]
    prompts = {"its shape alone": [captions.describe(s, set()) for s in scenes],
               "a recolouring caption": [t.caption for t in recolour]}
    lines = []
    for kind, texts in prompts.items():
        distance, recoloured = {}, {}
        for strength in STRENGTHS:
            out = []
            for start, text in zip(starts, texts):
                out += pipelines.img2img(sd, text, start, strength=strength, seed=args.seed, progress=False,
                                         **args.settings)
            distance[strength] = np.mean([np.abs(np.asarray(o, np.float32) - np.asarray(s, np.float32)).mean()
                                          for o, s in zip(out, starts)])
            found = list(map(toy_shapes.analyse, out))
            recoloured[strength] = np.mean([f.color == t.color and f.shape == t.shape and f.position == t.position
                                            for f, t in zip(found, recolour)])
        values = [distance[s] for s in STRENGTHS]
        span = max(values[-1] - values[0], 1e-6)
        steps = [(b - a) / span for a, b in zip(values, values[1:])]
        worst = max(d for s, d in zip(STRENGTHS[1:], steps) if s <= 0.2)  # the 0.05-wide steps up to 0.2
        lines += [f"  {kind} ({texts[0]!r}): mean |start − result| (0–255) by strength: "
                  + "  ".join(f"{s}: {distance[s]:.0f}" for s in STRENGTHS),
                  f"    largest 0.05 step of strength up to 0.2 carries {100 * worst:.0f}% of the change "
                  f"({'meets' if worst <= CLIFF_SHARE else 'BELOW'} the bar: ≤ {100 * CLIFF_SHARE:.0f}%)"]
        if kind == "a recolouring caption":
            lines += ["    new colour, same shape and place, by strength: "
                      + "  ".join(f"{s}: {100 * recoloured[s]:.0f}%" for s in STRENGTHS),
                      line("    at strength 0.5", recoloured[0.5])]
    return lines


def classifier(sd, args) -> list[str]:
    from sd_scratch.training.classifier import load_classifier

    judge = load_classifier(args.classifier) if args.classifier else load_classifier()
    lines = []
    for wanted in STEERED:
        (attribute, value), = wanted.items()
        row = []
        for scale in CLASSIFIER_SCALES:
            images = generate(sd, [""] * (args.n // 4), args.seed, args.batch, **{**args.settings, "guidance_scale": 1.0},
                              classifier=lambda x, t: judge.log_prob(x, t, wanted), classifier_scale=scale)
            share = np.mean([getattr(toy_shapes.analyse(im), attribute) == value for im in images])
            row.append(f"s = {scale:g}: {100 * share:.0f}%")
        lines.append(f"  the empty prompt steered to {attribute} {value!r}: " + "  ".join(row))
    return lines


def save_grid(images, labels, path: Path) -> None:
    if path is None or not images:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    visualize.grid(images, labels, columns=6, zoom=2).save(path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None, help="default: the built-in model")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    p.add_argument("-n", type=int, default=200, help="captions per section (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--classifier", default=None, help="the classifier file (default: the shipped one)")
    p.add_argument("--grid", type=Path, default=REPO / "weights" / "tiny-shapes-samples.png",
                   help="where the full captions' samples go (the pairs' beside it, -pairs.png)")
    args = p.parse_args(argv)
    sections = args.sections.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"--sections: unknown {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    args.settings = dict(steps=args.steps, guidance_scale=args.guidance, scheduler=args.scheduler)

    sd = sd_scratch.load(args.weights) if args.weights else sd_scratch.load()
    print(f"{args.weights or 'the built-in model'}: {args.n} held-out captions per section, {args.steps} "
          f"{args.scheduler} steps, guidance {args.guidance}, seed {args.seed}")
    for name in sections:
        began = time.time()
        lines = globals()[name](sd, args)
        print(f"{name} ({time.time() - began:.0f} s)")
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
