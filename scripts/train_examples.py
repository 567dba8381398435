"""Train the two example add-ons on the built-in world, and measure each before and after.

    python scripts/train_examples.py            # writes sd_scratch/data/examples/{my-scene,ring}.safetensors

1. **Textual inversion** (`004 · 嵌入`): 8 drawings of one held-out scene ("a large pink triangle at
   the bottom left on a brown background", a combination the model never saw) teach the new word
   `my-scene` two vectors; nothing else changes. Measured: of 16 pictures drawn from the prompt
   "my-scene", how many show that scene (all five attributes read back), before and after.
2. **LoRA** (`004 · LoRA`), rank 4 on the UNet's attention and ResNet convolutions (LoCon) and the
   text encoder's layers: 400 drawings of rings, a shape the model never saw, with the world's
   captions, and as many drawings of the shapes it knows (kohya's "regularisation images", so
   that the LoRA learns what "ring" means instead of turning every shape into one). Measured: of 24 pictures of "a <colour> ring <position> on a <background> background",
   how many are read back as rings of that colour, before and after; and what the LoRA does to a
   prompt it was not trained on (a circle stays a circle?).

Both are seeded; minutes on two CPU cores. The files are what users download from Civitai, in
kohya's layouts, and load with `sd.load_textual_inversion` / `sd.load_lora`.
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import sd_scratch
from sd_scratch.training import captions, toy_shapes
from sd_scratch.training.adapters import train_embedding, train_lora
from sd_scratch.training.toy_shapes import NEW_SHAPE, Scene
from sd_scratch.vae import LATENT_SCALE

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "sd_scratch" / "data" / "examples"
CONCEPT = Scene("large", "pink", "triangle", "at the bottom left", "brown")
WORD, INIT_WORD = "my-scene", "shape"
MEASURE_SETTINGS = dict(steps=25, guidance_scale=7.5, scheduler="ddim", progress=False)


def encode(sd, images) -> torch.Tensor:
    with torch.no_grad():
        return sd.vae.encode(toy_shapes.to_tensor(images)).mean * LATENT_SCALE


ATTRIBUTES = ("size", "color", "shape", "position", "background")


def attributes_right(scene: Scene, images) -> str:
    """How many images show the whole scene, then each attribute's count."""
    found = list(map(toy_shapes.analyse, images))
    whole = sum(all(getattr(f, a) == getattr(scene, a) for a in ATTRIBUTES) for f in found)
    each = ", ".join(f"{a} {sum(getattr(f, a) == getattr(scene, a) for f in found)}" for a in ATTRIBUTES)
    return f"{whole}/{len(images)} show the whole scene ({each})"


def forget_embeddings(sd) -> None:
    """Drop every loaded textual-inversion word (its tokenizer entry and its vectors)."""
    sd.tokenizer.embeddings.clear()
    sd.text_encoder.embeddings.extra_vectors = None


def textual_inversion(sd, args) -> None:
    assert toy_shapes.is_held_out(CONCEPT), "the concept should be a combination the model never saw"
    rng = random.Random(args.seed)
    latents = encode(sd, [toy_shapes.draw(captions.place(CONCEPT, rng)).image for _ in range(8)])
    before = sd.txt2img([WORD] * 16, seed=args.seed, **MEASURE_SETTINGS)
    began = time.time()
    vectors = train_embedding(sd, latents, lambda g: [WORD] * args.batch, WORD, INIT_WORD, steps=args.ti_steps,
                              batch=args.batch, lr=args.ti_lr, seed=args.seed)
    path = EXAMPLES / f"{WORD}.safetensors"
    save_file({"emb_params": vectors.to(torch.float16).contiguous()}, str(path))
    print(f"textual inversion: {len(vectors)} vectors for {WORD!r}, {args.ti_steps} steps, {time.time() - began:.0f} s "
          f"-> {path.relative_to(REPO)}")
    forget_embeddings(sd)
    sd.load_textual_inversion(path)  # as a user would: from the file
    after = sd.txt2img([WORD] * 16, seed=args.seed, **MEASURE_SETTINGS)
    print(f"  the scene: {CONCEPT.caption!r}")
    for name, images in (("before", before), ("after", after)):
        print(f"  {name}: of the pictures of {WORD!r}, {attributes_right(CONCEPT, images)}")
    forget_embeddings(sd)


def wanted(name: str) -> bool:
    """The layers the example LoRA changes: attention and its projections, the ResNets' convolutions
    (LoCon), and every Linear of the text encoder."""
    if name.startswith("lora_te_"):
        return True
    return name.startswith("lora_unet_") and ("attentions" in name or ("resnets" in name and "conv" in name)) \
        and "input_blocks" not in name and "output_blocks" not in name and "middle_block_" not in name


def ring(scene: Scene) -> Scene:
    return Scene(scene.size, scene.color, NEW_SHAPE, scene.position, scene.background)


def lora(sd, args) -> None:
    rng = random.Random(args.seed + 1)
    scenes = [ring(captions.random_scene(rng)) for _ in range(400)] + [captions.random_scene(rng) for _ in range(400)]
    latents = encode(sd, [toy_shapes.draw(captions.place(s, rng)).image for s in scenes])
    says = random.Random(args.seed + 2)
    tests = [ring(captions.random_scene(random.Random(args.seed + 100 + k), held_out=True)) for k in range(24)]
    prompts = [captions.describe(s, {"color", "position", "background"}) for s in tests]
    circles = [Scene(s.size, s.color, "circle", s.position, s.background) for s in tests]
    circle_prompts = [captions.describe(s, {"color", "position", "background"}) for s in circles]

    def measure():
        rings = sd.txt2img(prompts, seed=args.seed, **MEASURE_SETTINGS)
        plain = sd.txt2img(circle_prompts, seed=args.seed, **MEASURE_SETTINGS)
        found = list(map(toy_shapes.analyse, rings))
        return (sum(f.shape == NEW_SHAPE for f in found), sum(f.shape == NEW_SHAPE and f.color == s.color
                                                              for f, s in zip(found, tests)),
                sum(toy_shapes.analyse(im).shape == "circle" for im in plain))

    before = measure()
    began = time.time()
    tensors = train_lora(sd, latents, lambda index, g: [captions.random_caption(scenes[i], says) for i in index.tolist()],
                         wanted, rank=4, alpha=4.0, steps=args.lora_steps, batch=args.batch, seed=args.seed)
    path = EXAMPLES / "ring.safetensors"
    save_file({k: v.to(torch.float16).contiguous() for k, v in tensors.items()}, str(path))
    count = sum(v.numel() for k, v in tensors.items() if not k.endswith(".alpha"))
    modules = len([k for k in tensors if k.endswith(".alpha")])
    print(f"LoRA: rank 4 on {modules} layers, {count:,} parameters ({100 * count / model_size(sd):.1f}% of the model), "
          f"{args.lora_steps} steps, {time.time() - began:.0f} s -> {path.relative_to(REPO)}")
    sd.load_lora(path)
    after = measure()
    sd.unload_lora()
    for name, (rings, right, kept) in (("before", before), ("after", after)):
        print(f"  {name}: {rings}/24 ring prompts read back as rings, {right}/24 rings of the right colour; "
              f"{kept}/24 circle prompts still circles")


def model_size(sd) -> int:
    return sum(p.numel() for part in (sd.text_encoder, sd.unet, sd.vae) for p in part.parameters())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None, help="default: the built-in model")
    p.add_argument("--ti-steps", type=int, default=800)
    p.add_argument("--ti-lr", type=float, default=1e-2)
    p.add_argument("--lora-steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=("ti", "lora"), default=None)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    sd = sd_scratch.load(args.weights) if args.weights else sd_scratch.load()
    sd.to(dtype=torch.float32)
    EXAMPLES.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "ti"):
        textual_inversion(sd, args)
    if args.only in (None, "lora"):
        lora(sd, args)


if __name__ == "__main__":
    main()
