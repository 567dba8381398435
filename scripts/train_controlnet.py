"""Train an edge ControlNet for the built-in model (sd_scratch/training/controlnet.py), then measure it.

    python scripts/train_controlnet.py                 # train (resumable: run it again to go on), then evaluate
    python scripts/train_controlnet.py --evaluate-only # only the measurement, on the saved file

Pictures: the built-in world (`captions.make_world`: one or two shapes at the five positions) and as
many one-shape pictures with the shape anywhere (off the five positions the model was trained on),
each with its edge map (`toy_shapes.draw`), the hint a Canny preprocessor would give. Captions
never say where a free-placed shape is, and half are dropped, so where and how big come from the hint.

The measurement, on held-out combinations placed anywhere: the prompt "a <colour> <shape>" (no
position, no size), one picture with the ControlNet given the scene's edge map and one without, same
seed; the IoU of the drawn shape (the largest region unlike the background) with the hint's shape,
and how often the colour is still the prompt's.

Checkpoints every 250 steps in runs/tiny-controlnet/ (git-ignored); the result is written to --out.
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import sd_scratch
from sd_scratch import Control
from sd_scratch.addons.controlnet import controlnet_state_dict
from sd_scratch.training import captions
from sd_scratch.training.controlnet import controlnet_from_unet, edge_hints, train_controlnet
from sd_scratch.training.toy_shapes import (BACKGROUNDS, FOREGROUND_DISTANCE, IMAGE_SIZE, SIZES, Picture, Thing,
                                            analyse, draw, largest_component, to_tensor)
from sd_scratch.vae import LATENT_SCALE

RUNS = Path("runs/tiny-controlnet")
MARGIN = 2  # pixels kept free between a free-placed shape and the picture's edge


def free_scene(rng: random.Random, held_out: bool = False):
    """A one-shape scene whose shape is anywhere: (Scene, Picture)."""
    scene = captions.random_scene(rng, held_out)
    half = SIZES[scene.size] / 2
    center = tuple(rng.uniform(half + MARGIN, IMAGE_SIZE - half - MARGIN) for _ in range(2))
    return scene, Picture(scene.background, (Thing(scene.size, scene.color, scene.shape, center),))


def free_caption(scene, rng: random.Random) -> str:
    said = {a for a, p in captions.SAY_PROBABILITY.items() if a != "position" and rng.random() < p}
    return captions.describe(scene, said, comma=rng.random() < 0.4, short_background=rng.random() < 0.5)


def make_data(sd, n: int, seed: int):
    """(latents, hints, a caption function): half the world's pictures, half free-placed shapes."""
    rng = random.Random(seed)
    world = captions.make_world(n // 2, seed)
    free = [free_scene(rng) for _ in range(n - n // 2)]
    drawings = [draw(picture) for _, picture in free]
    images = torch.cat([world.images, to_tensor([d.image for d in drawings])])
    edges = torch.cat([world.edges, torch.from_numpy(np.stack([d.edges for d in drawings]).astype(np.float32))[:, None]])
    with torch.no_grad():
        latents = torch.cat([sd.vae.encode(images[i:i + 256]).mean for i in range(0, len(images), 256)]) * LATENT_SCALE
    scenes = world.scenes + [scene for scene, _ in free]
    first_free = len(world.scenes)

    def caption(index: torch.Tensor, step: int) -> list[str]:
        step_rng = random.Random(seed * 1_000_003 + step)
        return [free_caption(scenes[i], step_rng) if i >= first_free else captions.random_caption(scenes[i], step_rng)
                for i in index.tolist()]

    return latents, edge_hints(edges), caption


def drawn_mask(image: Image.Image) -> np.ndarray:
    """The largest region of pixels unlike the background (the shape the model drew)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    background = np.asarray(BACKGROUNDS[analyse(image).background], np.float32)
    return largest_component(np.linalg.norm(pixels - background, axis=-1) > FOREGROUND_DISTANCE)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def evaluate(sd, net, n: int, seed: int, steps: int, guidance: float) -> dict:
    rng = random.Random(seed + 12345)
    scores = {"with": [], "without": []}
    colours = {"with": 0, "without": 0}
    for k in range(n):
        scene, picture = free_scene(rng, held_out=True)
        drawing = draw(picture)
        hint = Image.fromarray((drawing.edges * 255).astype(np.uint8)).convert("RGB")
        prompt = f"{captions.article(scene.color)} {scene.color} {scene.shape}"
        for name, control in (("with", Control(net, hint)), ("without", None)):
            image = sd.txt2img(prompt, steps=steps, guidance_scale=guidance, seed=seed + k, progress=False,
                               height=IMAGE_SIZE, width=IMAGE_SIZE, control=control)[0]
            scores[name].append(iou(drawn_mask(image), drawing.owner == 1))
            colours[name] += analyse(image).color == scene.color
    return {name: (float(np.mean(v)), float(np.mean(np.array(v) > 0.5)), colours[name] / n) for name, v in scores.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=RUNS / "tiny-shapes-controlnet-edges.safetensors")
    p.add_argument("--pictures", type=int, default=8000)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--evaluate-only", action="store_true")
    p.add_argument("-n", type=int, default=100, help="held-out scenes in the measurement")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    sd = sd_scratch.load()

    if not args.evaluate_only:
        RUNS.mkdir(parents=True, exist_ok=True)
        resume = RUNS / "checkpoint.pt"
        net, state, start = controlnet_from_unet(sd), None, 0
        if resume.is_file():
            saved = torch.load(resume, weights_only=True)
            net.load_state_dict(saved["net"])
            state, start = saved["optimizer"], saved["step"]
            print(f"resuming at step {start}", flush=True)
        latents, hints, caption = make_data(sd, args.pictures, args.seed)
        began, losses = time.time(), []

        def log(step: int, loss: float) -> None:
            losses.append(loss)
            if step % 50 == 0:
                print(f"step {step}/{args.steps}  loss {np.mean(losses[-50:]):.4f}  ({time.time() - began:.0f} s)", flush=True)

        def checkpoint(step: int, net, optimizer_state) -> None:
            torch.save({"net": net.state_dict(), "optimizer": optimizer_state, "step": step}, resume)

        net, _ = train_controlnet(sd, latents, hints, caption, steps=args.steps, batch=args.batch, lr=args.lr,
                                  seed=args.seed, log=log, net=net, start_step=start, optimizer_state=state,
                                  checkpoint=checkpoint)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.half() for k, v in controlnet_state_dict(net, "compvis").items()}, str(args.out))
        print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) after {time.time() - began:.0f} s", flush=True)

    net = sd.load_controlnet(args.out)
    result = evaluate(sd, net, args.n, args.seed, args.sample_steps, args.guidance)
    print(f"held-out scenes placed anywhere, prompt 'a <colour> <shape>', n = {args.n}:")
    for name, (mean_iou, share, colour) in result.items():
        print(f"  {name:7s} ControlNet: mean IoU with the hint's shape {mean_iou:.2f}, IoU > 0.5 in {share:.0%}, "
              f"colour right {colour:.0%}")


if __name__ == "__main__":
    main()
