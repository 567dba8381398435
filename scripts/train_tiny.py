"""Train the built-in model (sd_scratch/data/tiny-shapes.safetensors) from nothing, on the shapes world.

The world (`sd_scratch/training/captions.py`): one or two shapes on a background, each picture
described afresh at every step by a random caption that says some of what it shows.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 scripts/train_tiny.py   # the shipped file: 46 min, 2 CPU cores
    python scripts/train_tiny.py                          # one process: every stage, then the weights file
    python scripts/train_tiny.py --resume                 # continue from runs/tiny-shapes/*.pt
    torchrun --nproc_per_node 8 scripts/train_tiny.py --device cuda   # nccl, one GPU per process

On a CPU, set OMP_NUM_THREADS=1 when anything else is running: oversubscribed threads made the
steps ten times slower here.

1. `vae`: the AutoencoderKL learns to reconstruct random 32×32 crops of the training images
   (`training.VAELoss`); then its latent is rescaled so that the pipeline's LATENT_SCALE gives
   unit-std latents (`training.fold_latent_normalisation`).
2. `decoder`: the decoder alone is fine-tuned on whole 64×64 images (`training.DecoderLoss`).
3. `diffusion`: the images are encoded once; the CLIP text transformer and the UNet learn together
   the noise-prediction loss (`training.DiffusionLoss`), each image with a caption drawn for this
   step (`captions.random_caption`), 10% of them dropped.

Stages 2 and 3 need only stage 1, so they can run side by side (`--stages decoder` and
`--stages diffusion` in two processes, both with --resume); a last `--resume` run writes the
weights. Everything random comes from `--seed`: the jitter of the drawings, the initial weights,
and a generator per step (seeded by seed, stage, rank and step), so a resumed or split run draws
what an uninterrupted one would.

Under DDP the batch is split across the processes, which all-reduce their gradients, so the
parameters stay identical on every rank. Rank 0 shows the progress bar, writes `loss_log.tsv`,
the checkpoints (`vae.pt`, `decoder.pt`, `diffusion.pt`, every --checkpoint-every steps and at
the end of a stage; `latest.safetensors` during stage 3) and the weights file, in the official
single-file layout and float16.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from sd_scratch.training import captions as world
from sd_scratch.checkpoints.families import BY_NAME
from sd_scratch.checkpoints.load import save_single_file
from sd_scratch.stable_diffusion import StableDiffusion
from sd_scratch.text_encoder import CLIPTextEncoder
from sd_scratch.tokenizer import CLIPTokenizer
from sd_scratch.training.losses import (DecoderLoss, DiffusionLoss, VAELoss, drop_captions, fold_latent_normalisation,
                                 tiny_configs)
from sd_scratch.unet import UNet
from sd_scratch.vae import LATENT_SCALE, AutoencoderKL

REPO = Path(__file__).resolve().parent.parent
STAGE_IDS = {"vae": 1, "decoder": 3, "diffusion": 2}  # mixed into the per-step seeds
WARMUP_STEPS = 50
FINAL_LR_FRACTION = 0.05  # cosine decay from lr down to 5% of it
GRAD_CLIP = 1.0  # gradients are rescaled to at most this norm: one unlucky batch cannot wreck the run


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "tiny-shapes", help="checkpoints and loss log")
    p.add_argument("--weights", type=Path, default=REPO / "sd_scratch" / "data" / "tiny-shapes.safetensors")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--pictures", type=int, default=12000, help="pictures drawn from the training combinations")
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-crop", type=int, default=32, help="the VAE (fully convolutional) trains on random "
                   "crops this size, on the latent grid: 4× cheaper per image than 64×64")
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--decoder-steps", type=int, default=1000)
    p.add_argument("--decoder-batch", type=int, default=16)
    p.add_argument("--decoder-lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=5000, help="text encoder + UNet steps")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--stages", type=lambda text: set(text.split(",")), default=set(STAGE_IDS),
                   help="comma-separated subset of vae,decoder,diffusion to train in this run (default: all); "
                        "decoder and diffusion need only the vae stage, so two runs can do them side by side")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


# ---- processes --------------------------------------------------------------------------------------

def setup(device_name: str) -> tuple[torch.device, int, int]:
    """(device, rank, world size); starts the process group when launched by torchrun."""
    if "RANK" not in os.environ:
        return torch.device(device_name), 0, 1
    cuda = device_name.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return device, dist.get_rank(), dist.get_world_size()


def wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    if not dist.is_initialized():
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def step_generator(seed: int, stage: str, rank: int, step: int) -> torch.Generator:
    """The random numbers of one step on one rank, independent of whether the run was resumed."""
    return torch.Generator().manual_seed(((seed * 10 + STAGE_IDS[stage]) * 1000 + rank) * 1_000_003 + step)


def learning_rate(step: int, total: int, peak: float) -> float:
    if step < WARMUP_STEPS:
        return peak * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS)
    return peak * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---- one stage ---------------------------------------------------------------------------------------

def train_stage(stage: str, loss_module: torch.nn.Module, batch_fn, args, device, rank: int, world_size: int,
                steps: int, lr: float, on_checkpoint=None) -> None:
    """The loop both stages share: AdamW, warmup + cosine LR, checkpoints, loss log, progress bar."""
    ckpt_path = args.out / f"{stage}.pt"
    optimizer = torch.optim.AdamW(loss_module.parameters(), lr=lr, weight_decay=0.0)
    start = 0
    if args.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        loss_module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    model = wrap(loss_module, device)
    log = open(args.out / "loss_log.tsv", "a") if rank == 0 else None
    bar = tqdm(range(start, steps), desc=stage, disable=rank != 0 or args.quiet, initial=start, total=steps)
    began = time.time()
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr)
        generator = step_generator(args.seed, stage, rank, step)
        inputs = batch_fn(generator)
        out = model(*inputs, generator=generator)
        loss = out["loss"] if isinstance(out, dict) else out
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(loss_module.parameters(), GRAD_CLIP)
        optimizer.step()
        if rank == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log.write(f"{stage}\t{step + 1}\t{loss.item():.5f}\t{group['lr']:.3g}\t{time.time() - began:.1f}\n")
            if (step + 1) % args.checkpoint_every == 0 or step + 1 == steps:
                log.flush()
                tmp = ckpt_path.with_suffix(".tmp")
                torch.save({"step": step + 1, "model": loss_module.state_dict(),
                            "optimizer": optimizer.state_dict()}, tmp)
                tmp.replace(ckpt_path)
                if on_checkpoint is not None:
                    on_checkpoint()
    if log:
        log.close()
    if dist.is_initialized():
        dist.barrier()  # every rank sees the stage's final checkpoint before reading it


def export(tokenizer, text_encoder, unet, vae, path: Path) -> None:
    """Write the three parts as one float16 file in the official single-file layout."""
    model = StableDiffusion(tokenizer, copy.deepcopy(text_encoder), copy.deepcopy(unet),
                            copy.deepcopy(vae).to(memory_format=torch.contiguous_format), BY_NAME["tiny-shapes"])
    model.to("cpu", torch.float16)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_single_file(model, path)


def complete(args, stage: str, steps: int) -> bool:
    """Whether `stage`'s checkpoint in --out has reached `steps`."""
    path = args.out / f"{stage}.pt"
    return path.exists() and torch.load(path, weights_only=True)["step"] >= steps


def finished(args, stage: str, steps: int) -> bool:
    """Whether to skip `stage`: only when resuming and its checkpoint is complete."""
    return args.resume and complete(args, stage, steps)


# ---- the run -------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    args = parse_args(argv)
    device, rank, world_size = setup(args.device)
    for option in ("vae_batch", "batch"):
        if getattr(args, option) % world_size:
            raise SystemExit(f"--{option.replace('_', '-')} must be divisible by the {world_size} processes")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)  # the initial weights: the same on every rank
    configs = tiny_configs()
    vae = AutoencoderKL(configs.vae)
    text_encoder = CLIPTextEncoder(configs.text)
    unet = UNet(configs.unet)

    data = world.make_world(args.pictures, args.seed)
    images, scenes = data.images, data.scenes
    if rank == 0:
        pairs = sum(isinstance(s, world.Pair) for s in scenes)
        print(f"{len(images)} training pictures ({pairs} of two shapes), {world_size} process(es) on {device}")

    # Stage 1: the autoencoder, on images in the channels-last layout (faster convolutions on CPU).
    vae = vae.to(device, memory_format=torch.channels_last)
    images = images.to(device).contiguous(memory_format=torch.channels_last)
    vae_loss = VAELoss(vae, args.kl_weight)
    if "vae" in args.stages and not finished(args, "vae", args.vae_steps):
        def vae_batch(generator):
            index = torch.randint(0, len(images), (args.vae_batch // world_size,), generator=generator)
            top, left = (8 * torch.randint(0, (world.IMAGE_SIZE - args.vae_crop) // 8 + 1, (2,),
                                           generator=generator)).tolist()
            return (images[index.to(device), :, top:top + args.vae_crop, left:left + args.vae_crop],)
        train_stage("vae", vae_loss, vae_batch, args, device, rank, world_size, args.vae_steps, args.vae_lr)
    vae_loss.load_state_dict(torch.load(args.out / "vae.pt", map_location=device, weights_only=True)["model"])
    fold_latent_normalisation(vae, images)

    # Stage 1b: the decoder alone, on whole 64×64 images; the latents (encoder) stay as they are.
    decoder_loss = DecoderLoss(vae)
    if "decoder" in args.stages and not finished(args, "decoder", args.decoder_steps):
        def decoder_batch(generator):
            index = torch.randint(0, len(images), (args.decoder_batch // world_size,), generator=generator)
            return (images[index.to(device)],)
        train_stage("decoder", decoder_loss, decoder_batch, args, device, rank, world_size, args.decoder_steps,
                    args.decoder_lr)
    if (args.out / "decoder.pt").exists():
        decoder_loss.load_state_dict(torch.load(args.out / "decoder.pt", map_location=device,
                                                weights_only=True)["model"])
    vae.eval().requires_grad_(False)

    # Stage 2: text encoder + UNet on the posterior of every training image, drawn afresh each step.
    with torch.no_grad():
        posteriors = [vae.encode(images[i:i + 256]) for i in range(0, len(images), 256)]
    latent_mean = torch.cat([q.mean for q in posteriors]).contiguous()
    latent_std = torch.cat([q.std for q in posteriors]).contiguous()
    tokenizer = CLIPTokenizer()
    empty_ids = tokenizer([""])[0].to(device)
    diffusion_loss = DiffusionLoss(text_encoder, unet).to(device)

    def diffusion_batch(generator):
        index = torch.randint(0, len(images), (args.batch // world_size,), generator=generator).to(device)
        noise = torch.randn(latent_mean[index].shape, generator=generator).to(device)
        x0 = (latent_mean[index] + latent_std[index] * noise) * LATENT_SCALE
        says = random.Random(torch.randint(0, 2**62, (1,), generator=generator).item())
        ids = tokenizer([world.random_caption(scenes[i], says) for i in index.tolist()]).to(device)
        return x0, drop_captions(ids, empty_ids, generator=generator)

    if "diffusion" in args.stages and not finished(args, "diffusion", args.steps):
        snapshot = lambda: export(tokenizer, text_encoder, unet, vae, args.out / "latest.safetensors")  # noqa: E731
        train_stage("diffusion", diffusion_loss, diffusion_batch, args, device, rank, world_size, args.steps, args.lr,
                    on_checkpoint=snapshot)
    todo = [stage for stage, steps in (("decoder", args.decoder_steps), ("diffusion", args.steps))
            if not complete(args, stage, steps)]
    if todo:  # a partial run (--stages): the weights file is written once every stage is done
        if rank == 0:
            print(f"still to train: {', '.join(todo)} (then run again with --resume to write {args.weights})")
    else:
        diffusion_loss.load_state_dict(torch.load(args.out / "diffusion.pt", map_location=device,
                                                  weights_only=True)["model"])
        if rank == 0:
            export(tokenizer, text_encoder, unet, vae, args.weights)
            print(f"wrote {args.weights} ({args.weights.stat().st_size / 1e6:.1f} MB)")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
