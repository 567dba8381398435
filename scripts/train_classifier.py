"""Train the noisy-latent classifier for classifier guidance (sd_scratch/training/classifier.py).

    python scripts/train_classifier.py          # the built-in model's VAE -> sd_scratch/data/tiny-shapes-classifier.safetensors
    python scripts/train_classifier.py --weights other.safetensors --out other-classifier.safetensors

One-shape pictures of the training combinations are encoded once by the model's VAE (×LATENT_SCALE,
as the UNet sees them); each step draws a batch, a timestep t ~ U{0..999} and noise, and the
classifier learns every attribute of x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε. At the end it prints its accuracy on
held-out combinations at a few t: high for small t, falling towards chance as the noise wins.
Minutes on two CPU cores; seeded, so a run draws the same batches every time.
"""
from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch

import sd_scratch
from sd_scratch.noise_schedule import add_noise, alpha_bars
from sd_scratch.training import captions
from sd_scratch.training.classifier import (ATTRIBUTES, DEFAULT_FILE, NoisyLatentClassifier, classifier_loss,
                                            labels_of, save_classifier)
from sd_scratch.training.toy_shapes import draw, to_tensor
from sd_scratch.vae import LATENT_SCALE

CHECK_TIMESTEPS = (0, 250, 500, 750, 999)


def encode_scenes(sd, scenes, rng: random.Random, batch: int = 256) -> torch.Tensor:
    images = to_tensor([draw(captions.place(s, rng)).image for s in scenes])
    with torch.no_grad():
        return torch.cat([sd.vae.encode(images[i:i + batch]).mean for i in range(0, len(images), batch)]) * LATENT_SCALE


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None, help="the model whose VAE's latents it reads (default: built-in)")
    p.add_argument("--out", type=Path, default=DEFAULT_FILE)
    p.add_argument("--pictures", type=int, default=6000)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    sd = sd_scratch.load(args.weights) if args.weights else sd_scratch.load()
    sd.vae.float()
    scenes = [captions.random_scene(rng) for _ in range(args.pictures)]
    latents, labels = encode_scenes(sd, scenes, rng), labels_of(scenes)
    alpha_bar = alpha_bars()
    classifier = NoisyLatentClassifier()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    began = time.time()
    for step in range(args.steps):
        for group in optimizer.param_groups:  # cosine decay
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        index = torch.randint(0, len(latents), (args.batch,), generator=generator)
        t = torch.randint(0, len(alpha_bar), (args.batch,), generator=generator)
        noise = torch.randn(latents[index].shape, generator=generator)
        x_t = add_noise(latents[index], noise, alpha_bar[t][:, None, None, None])
        loss = classifier_loss(classifier, x_t, t, {a: v[index] for a, v in labels.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 200 == 0:
            print(f"step {step + 1}/{args.steps}  loss {loss.item():.3f}  ({time.time() - began:.0f} s)", flush=True)

    classifier.eval()
    held = [captions.random_scene(rng, held_out=True) for _ in range(600)]
    x0, truth = encode_scenes(sd, held, rng), labels_of(held)
    print("held-out accuracy by timestep:")
    with torch.no_grad():
        for t in CHECK_TIMESTEPS:
            x_t = add_noise(x0, torch.randn(x0.shape, generator=generator), alpha_bar[t])
            logits = classifier(x_t, torch.full((len(x0),), t))
            row = "  ".join(f"{a} {100 * (logits[a].argmax(-1) == truth[a]).float().mean():.0f}%" for a in ATTRIBUTES)
            print(f"  t = {t:<4} {row}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_classifier(classifier, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
