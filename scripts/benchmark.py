"""Speed and memory, ours against diffusers, side by side in one process on the same weights.

Random weights at the full SD v1.5 sizes (or tiny ones for a smoke test), the same inputs for both,
runs interleaved (ours, reference, reference, ours, ...) after a warm-up so that a noisy shared machine slows
both alike; medians; the ratio ours / diffusers is the figure to read, not the absolute times.
Peak memory is measured on CUDA only (torch.cuda.max_memory_allocated).

    python scripts/benchmark.py                                  # CPU fp32, SD v1.5 sizes
    python scripts/benchmark.py --size tiny --repeats 2          # the CI smoke test
    python scripts/benchmark.py --device cuda --modes fp16 fp16-compiled bf16 --image-size 512 \
        --tiled-decode-size 1024 --json gpu.json

Needs the test extra (diffusers, transformers).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sd_scratch.tokenizer import DEFAULT_BPE_PATH  # noqa: E402
from sd_scratch.checkpoints.load import from_single_file_state_dict  # noqa: E402
from sd_scratch.addons.preview import TAESDDecoder, official_name  # noqa: E402
from sd_scratch.memory.vae_tiling import decode_tiled  # noqa: E402
from tests.reference import (SD15_SCHEDULER, make_reference_models, rel_err, single_file_layout,  # noqa: E402
                             write_tokenizer_folder)

MODES = {"fp32": (torch.float32, False), "fp16": (torch.float16, False), "bf16": (torch.bfloat16, False),
         "fp16-compiled": (torch.float16, True), "fp32-compiled": (torch.float32, True)}
ROWS = ["unet", "text", "decode", "preview", "image"]
PROMPT = "a photograph of an astronaut riding a horse"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> tuple[float, int | None]:
    """Seconds for one call, and the peak CUDA memory it reached (None on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    seconds = time.perf_counter() - start
    return seconds, (torch.cuda.max_memory_allocated() if device.startswith("cuda") else None)


def compare(name: str, ours, reference, device: str, warmup: int, repeats: int) -> dict:
    """Interleaved runs of the two callables, each going first in every other repeat (the first run
    after the other's tends to be slower); medians, peak memory and the ratio."""
    for _ in range(warmup):
        ours(), reference()
    times = {"ours": [], "diffusers": []}
    memory = {"ours": 0, "diffusers": 0}
    pair = (("ours", ours), ("diffusers", reference))
    for i in range(repeats):
        for who, fn in pair if i % 2 == 0 else pair[::-1]:  # who goes first alternates
            seconds, peak = timed(fn, device)
            times[who].append(seconds)
            memory[who] = max(memory[who], peak or 0)
    row = {"what": name, **{f"{who}_s": statistics.median(t) for who, t in times.items()}}
    row["ratio"] = row["ours_s"] / row["diffusers_s"]
    if device.startswith("cuda"):
        row |= {"ours_peak_gb": memory["ours"] / 2**30, "diffusers_peak_gb": memory["diffusers"] / 2**30,
                "memory_ratio": memory["ours"] / max(memory["diffusers"], 1)}
    return row


def build(size: str, device: str, dtype: torch.dtype, compiled: bool, tmp: Path):
    """Ours and diffusers' pipeline on the same random weights."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    models = make_reference_models(size)
    ours = from_single_file_state_dict(single_file_layout(models), device=device, dtype=dtype, vae_dtype=dtype)
    write_tokenizer_folder(DEFAULT_BPE_PATH, tmp / "tokenizer")
    tokenizer = CLIPTokenizer(str(tmp / "tokenizer" / "vocab.json"), str(tmp / "tokenizer" / "merges.txt"),
                              model_max_length=77)
    ref = StableDiffusionPipeline(vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=tokenizer,
                                  unet=models["unet"], scheduler=DDIMScheduler.from_config(dict(SD15_SCHEDULER, clip_sample=False)),
                                  safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref = ref.to(device=device, dtype=dtype)
    ref.set_progress_bar_config(disable=True)
    if compiled:
        ours.optimize()
        ref.unet.to(memory_format=torch.channels_last)
        ref.unet = torch.compile(ref.unet)
    return ours, ref


def compare_tiled_decode(ours, ref, args, g: torch.Generator) -> dict:
    """Tiled decoding, ours (tiles wait in host memory) against diffusers' `enable_tiling` with the same
    tile; also how far each is from decoding the latent whole (ours: float rounding; diffusers' tiles
    are normalised on their own and blended), read off the timed runs' last images. Each side's last
    image (6 MB at 1024×1024 in fp16) stays allocated through the next runs' peak memory."""
    device, dtype = args.device, next(ours.vae.parameters()).dtype
    n, f, tile = args.tiled_decode_size, ours.vae.config.factor, args.decode_tile
    z = torch.randn(1, 4, n // f, n // f, generator=g).to(device, dtype)
    last = {}

    def ours_tiled():
        last["ours"] = decode_tiled(ours.vae, z, tile)

    def ref_tiled():
        last["diffusers"] = ref.vae.decode(z).sample

    ref.vae.enable_tiling()
    ref.vae.tile_latent_min_size, ref.vae.tile_sample_min_size = tile, tile * f
    try:
        row = compare(f"VAE decode in {tile * f}-pixel tiles, {n}×{n}", ours_tiled, ref_tiled, device,
                      min(args.warmup, 1), max(1, args.repeats // 2))
    finally:
        ref.vae.disable_tiling()
    whole = ours.vae.decode(z)
    return row | {f"{who}_rel_err_to_whole": rel_err(image, whole) for who, image in last.items()}


def unet_flops(unet, x, t, context) -> int:
    """Floating-point operations of one UNet call, by torch's flop counter (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        unet(x, t, context)
    return counter.get_total_flops()


def matmul_peak(device: str, n: int = 4096, repeats: int = 5) -> float:
    """The fp32 ceiling of this machine, roughly: GFLOP/s of an n×n by n×n matmul (2n³ operations), median."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    return 2 * n**3 / statistics.median(timed(lambda: a @ b, device)[0] for _ in range(repeats)) / 1e9


def compare_preview(ours, ref, args, g: torch.Generator) -> list[dict]:
    """The preview decoder (`addons/preview.py`, TAESD's 64-wide architecture) on diffusers'
    `AutoencoderTiny` decoder's random weights: ours against diffusers' (with the relative error of
    the images), and ours against the full VAE decode, which is what a preview saves."""
    from diffusers import AutoencoderTiny

    device, dtype = args.device, next(ours.vae.parameters()).dtype
    tiny = AutoencoderTiny().to(device, dtype).eval()
    preview = TAESDDecoder().to(device, dtype).eval()
    preview.load_state_dict({official_name(k)[1]: v for k, v in tiny.state_dict().items() if k.startswith("decoder.")})
    h = args.decode_size // ours.vae.config.factor
    z = torch.randn(1, 4, h, h, generator=g).to(device, dtype)
    size = f"{args.decode_size}×{args.decode_size}"
    row = compare(f"TAESD decode, {size}", lambda: preview(z), lambda: tiny.decoder(z), device, args.warmup,
                  args.repeats)
    row["rel_err"] = rel_err(preview(z).float() * 2 - 1, tiny.decoder(z).float())  # diffusers' gives [-1, 1]
    against_vae = compare(f"TAESD decode vs diffusers' VAE decode, {size}", lambda: preview(z),
                          lambda: ref.vae.decode(z).sample, device, args.warmup, args.repeats)
    return [row, against_vae]


def run_mode(mode: str, args, tmp: Path) -> list[dict]:
    dtype, compiled = MODES[mode]
    device = args.device
    ours, ref = build(args.size, device, dtype, compiled, tmp)
    width = ours.text_encoder.config.width
    g = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        for pixels in args.unet_sizes if "unet" in args.rows else []:
            h = pixels // ours.vae.config.factor
            x = torch.randn(2, 4, h, h, generator=g).to(device, dtype)  # batch 2: CFG's two halves
            context = torch.randn(2, 77, width, generator=g).to(device, dtype)
            t = torch.tensor([500, 500], device=device)
            row = compare(f"UNet step, CFG batch 2, {pixels}×{pixels}", lambda: ours.unet(x, t, context),
                          lambda: ref.unet(x, t, encoder_hidden_states=context), device, args.warmup, args.repeats)
            flops = unet_flops(ours.unet, x, t, context)
            rows.append(row | {"tflop": flops / 1e12, "ours_gflop_s": flops / row["ours_s"] / 1e9})
        if "text" in args.rows:
            ids = ours.tokenizer([PROMPT, ""]).to(device)
            rows.append(compare("text encoder, batch 2", lambda: ours.text_encoder(ids),
                                lambda: ref.text_encoder(ids), device, args.warmup, args.repeats))
        if "decode" in args.rows:
            h = args.decode_size // ours.vae.config.factor
            z = torch.randn(1, 4, h, h, generator=g).to(device, dtype)
            rows.append(compare(f"VAE decode, {args.decode_size}×{args.decode_size}", lambda: ours.vae.decode(z),
                                lambda: ref.vae.decode(z).sample, device, args.warmup, args.repeats))
        if "preview" in args.rows:
            rows += compare_preview(ours, ref, args, g)
        if args.tiled_decode_size:
            rows.append(compare_tiled_decode(ours, ref, args, g))
    size = args.image_size
    if "image" in args.rows:
        rows.append(compare(f"whole image, {args.image_steps} DDIM steps, {size}×{size}",
                            lambda: ours.txt2img(PROMPT, height=size, width=size, steps=args.image_steps,
                                                 progress=False),
                            lambda: ref(PROMPT, height=size, width=size, num_inference_steps=args.image_steps,
                                        generator=torch.Generator("cpu").manual_seed(0)),
                            device, min(args.warmup, 1), max(1, args.repeats // 2)))
    return [dict(row, mode=mode) for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=["fp32"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=ROWS,
                        help="which comparisons to run (default: all; the tiled decode runs when its size is given)")
    parser.add_argument("--unet-sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--decode-size", type=int, default=512)
    parser.add_argument("--tiled-decode-size", type=int, default=0,
                        help="also compare tiled VAE decoding at this image size (0: skip)")
    parser.add_argument("--decode-tile", type=int, default=64, help="latent pixels per tile side (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--image-steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--peak", action="store_true",
                        help="also measure the fp32 matmul ceiling and give the UNet rows as a fraction of it")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, peak = [], matmul_peak(args.device) if args.peak else None
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            rows += run_mode(mode, args, Path(tmp))
    print(f"{'mode':<14} {'what':<44} {'ours s':>9} {'diffusers s':>11} {'ratio':>6}")
    for r in rows:
        memory = f"   peak GB {r['ours_peak_gb']:.2f} vs {r['diffusers_peak_gb']:.2f}" if "ours_peak_gb" in r else ""
        if "ours_gflop_s" in r:
            memory += f"   {r['tflop']:.3f} TFLOP, ours {r['ours_gflop_s']:.0f} GFLOP/s"
            memory += f" ({r['ours_gflop_s'] / peak:.0%} of the matmul peak)" if peak else ""
        if "rel_err" in r:
            memory += f"   rel. error {r['rel_err']:.1e}"
        if "ours_rel_err_to_whole" in r:
            memory += (f"   off the whole decode: ours {r['ours_rel_err_to_whole']:.1e}, "
                       f"diffusers {r['diffusers_rel_err_to_whole']:.1e}")
        print(f"{r['mode']:<14} {r['what']:<44} {r['ours_s']:>9.4f} {r['diffusers_s']:>11.4f} {r['ratio']:>6.2f}{memory}")
    if peak:
        print(f"fp32 matmul peak (4096³, median of 5): {peak:.0f} GFLOP/s")
    if args.json:
        environment = {"torch": torch.__version__, "device": args.device, "size": args.size,
                       "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                       "matmul_gflop_s": peak,
                       "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
        args.json.write_text(json.dumps({"environment": environment, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
