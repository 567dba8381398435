"""Distill the built-in model's preview decoder (sd_scratch/training/preview.py) and measure it.

    python scripts/train_preview.py             # -> sd_scratch/data/tiny-shapes-preview.safetensors
    python scripts/train_preview.py --measure   # its error and speed against the VAE (no training)

Pictures of the world's training combinations are encoded by the built-in model's VAE, and their
latents, with blends of two pictures' latents (what x̂₀ looks like early in sampling), decoded back
by it once; a TAESD-shaped decoder (width 32: 0.31 M parameters, 0.6 MB in fp16) learns those
decodes, and the cheap 4×3 matrix is fitted by least squares on the pictures' pairs (its numbers
are printed to paste into `addons/preview.py`, TINY_SHAPES_CHEAP). `--measure` measures both against
the VAE's decodes on held-out latents: the held-out combinations' pictures, and the latents the
model itself makes (its final x_0 and every step's x̂₀, what a preview shows during sampling), as
mean absolute difference in uint8 levels and PSNR, and the decode time of the same batch. Seeded;
minutes on two CPU cores.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sd_scratch
from sd_scratch.addons.preview import (BUILTIN_PREVIEW, TAESDConfig, TAESDDecoder, cheap_matrix_for, cheap_preview,
                                       load_preview_decoder)
from sd_scratch.training.preview import (blends, distill, fit_cheap_matrix, image_error, sampled_latents,
                                         save_preview_decoder, vae_decoded, world_latents)
from sd_scratch.vae import LATENT_SCALE

TIMING_BATCHES = (1, 64)
TIMING_REPEATS = 7
QUARTERS = 4


def upsampled_cheap(latents, matrix, factor: int) -> torch.Tensor:
    return F.interpolate(cheap_preview(latents, matrix), scale_factor=factor, mode="nearest")


def time_decoders(sd, preview, matrix, latents: torch.Tensor) -> dict[str, float]:
    """Median seconds per decode of one batch, the decoders interleaved so that the machine's load
    falls on each alike. The VAE as `images.decode` runs it, and in channels-last memory as the
    preview decoder runs (to show what of the gain is the architecture's)."""
    vae_channels_last = copy.deepcopy(sd.vae).to(memory_format=torch.channels_last)
    decoders = {"VAE decoder": lambda z: sd.vae.decode(z / LATENT_SCALE),
                "VAE decoder, channels-last": lambda z: vae_channels_last.decode(z / LATENT_SCALE),
                "preview decoder": preview, "cheap matrix": lambda z: cheap_preview(z, matrix)}
    times: dict[str, list[float]] = {name: [] for name in decoders}
    with torch.no_grad():
        for decode in decoders.values():  # warm-up
            decode(latents)
        for _ in range(TIMING_REPEATS):
            for name, decode in decoders.items():
                began = time.perf_counter()
                decode(latents)
                times[name].append(time.perf_counter() - began)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(sd, preview, matrix, seed: int, timing_threads: int, steps: int = 20) -> None:
    vae = sd.vae
    factor = vae.config.factor
    held = world_latents(vae, 256, seed + 1, held_out=True)
    final, predictions = sampled_latents(sd, 32, seed + 2, steps)
    by_step = predictions.unflatten(0, (steps, -1))  # (step, prompt, 4, h, w)
    rows = [("held-out combinations' pictures, encoded", held),
            (f"the model's final x_0 (held-out captions, {steps} DDIM steps, w = 3)", final),
            ("the model's x̂₀ at every one of those steps", predictions)]
    quarter = steps // QUARTERS
    rows += [(f"... x̂₀ at steps {q * quarter + 1}–{(q + 1) * quarter}",
              by_step[q * quarter:(q + 1) * quarter].flatten(0, 1)) for q in range(QUARTERS)]
    print(f"\nerror against the VAE's decode (mean |difference| in uint8 levels; PSNR), seed {seed}:")
    print("| latents | n | preview decoder | cheap matrix (nearest ×8) |\n|---|---|---|---|")
    for label, latents in rows:
        reference = vae_decoded(vae, latents)
        ours = torch.cat([preview(latents[i:i + 256]) for i in range(0, len(latents), 256)])
        cheap = upsampled_cheap(latents, matrix, factor)
        (a, pa), (b, pb) = image_error(ours, reference), image_error(cheap, reference)
        print(f"| {label} | {len(latents)} | {a:.1f} levels, {pa:.1f} dB | {b:.1f} levels, {pb:.1f} dB |")
    torch.set_num_threads(timing_threads)
    print(f"\ndecode time, latents {tuple(held.shape[1:])}, median of {TIMING_REPEATS}, {timing_threads} thread(s):")
    header = " | ".join(f"batch {b}" for b in TIMING_BATCHES)
    print(f"| decoder | {header} |\n|---|" + "---|" * len(TIMING_BATCHES))
    results = [time_decoders(sd, preview, matrix, held[:b]) for b in TIMING_BATCHES]
    for name in results[0]:
        cells = [f"{1000 * r[name]:.1f} ms ({r['VAE decoder'] / r[name]:.1f}×)" for r in results]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=BUILTIN_PREVIEW)
    p.add_argument("--measure", action="store_true", help="measure the file at --out; train nothing")
    p.add_argument("--pictures", type=int, default=2000)
    p.add_argument("--blends", type=int, default=500, help="blends of two pictures' latents, like early x̂₀")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--crop", type=int, default=4, help="latent windows trained on (the built-in latents are 8×8)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timing-threads", type=int, default=1,
                   help="torch threads while timing (one: on a shared machine, several threads wait on each other)")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    sd = sd_scratch.load()
    sd.vae.float()
    if not args.measure:
        began = time.time()
        pictures = world_latents(sd.vae, args.pictures, args.seed)
        latents = torch.cat([pictures, blends(pictures, args.blends, args.seed)])
        targets = vae_decoded(sd.vae, latents)
        print(f"{args.pictures} pictures encoded, {args.blends} blends of their latents made, all decoded by the "
              f"VAE ({time.time() - began:.0f} s)", flush=True)
        matrix = fit_cheap_matrix(pictures, targets[:args.pictures], cheap_matrix_for(sd.family.name).name)
        print(f"the cheap matrix (TINY_SHAPES_CHEAP): matrix={matrix.matrix}, bias={matrix.bias}")

        def log(step: int, loss: float) -> None:
            if (step + 1) % 100 == 0:
                print(f"step {step + 1}/{args.steps}  L1 {loss:.4f}  ({time.time() - began:.0f} s)", flush=True)

        decoder = distill(TAESDDecoder(TAESDConfig(width=args.width)), latents, targets, args.steps, args.batch,
                          args.crop, args.lr, args.seed, log)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_preview_decoder(decoder, args.out)
        print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB), {time.time() - began:.0f} s in all")
    else:
        measure(sd, load_preview_decoder(args.out), cheap_matrix_for(sd.family.name), args.seed, args.timing_threads)


if __name__ == "__main__":
    main()
