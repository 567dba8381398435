"""The benchmark script runs end to end (tiny sizes, CPU): a smoke test, no timing assertions."""
import json
import subprocess
import sys
from pathlib import Path

import torch

import sd_scratch
from tests.reference import rel_err

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--size", "tiny",
                             "--repeats", "1", "--warmup", "0", "--unet-sizes", "32", "--decode-size", "32",
                             "--image-size", "32", "--image-steps", "2", "--tiled-decode-size", "64",
                             "--decode-tile", "8", "--json", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["what"].split(",")[0] for r in rows] == ["UNet step", "text encoder", "VAE decode", "TAESD decode",
                                                          "TAESD decode vs diffusers' VAE decode",
                                                          "VAE decode in 32-pixel tiles", "whole image"]
    assert all(r["ours_s"] > 0 and r["diffusers_s"] > 0 and r["ratio"] > 0 for r in rows)
    assert "ratio" in result.stdout
    assert rows[0]["tflop"] > 0 and rows[0]["ours_gflop_s"] > 0  # the UNet step's work, counted
    assert rows[3]["rel_err"] <= 1e-4  # the preview decoder is diffusers' AutoencoderTiny's, on its weights
    assert rows[5]["ours_rel_err_to_whole"] <= 1e-4  # ours is exact; diffusers' blended tiles are not
    assert rows[5]["diffusers_rel_err_to_whole"] > 0


@torch.no_grad()
def test_channels_last_gives_the_same_eps(tiny_checkpoint):
    sd = sd_scratch.load(tiny_checkpoint["single"])
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 128, generator=g)
    plain = sd.unet(x, 10, context)
    sd.optimize(compile=False)
    assert rel_err(sd.unet(x.to(memory_format=torch.channels_last), 10, context), plain) <= 1e-5


@torch.no_grad()
def test_optimize_compiles_to_the_same_eps(tiny_checkpoint):
    """The fast mode for real: channels_last and torch.compile (inductor, on this CPU; about a minute
    to compile). Two timesteps, as in a denoising loop, and each ε within fp32 parity of eager."""
    sd = sd_scratch.load(tiny_checkpoint["single"])
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 128, generator=g)
    timesteps = torch.tensor([981, 961])  # tensors, as the samplers' timesteps are: no recompile per step
    eager = [sd.unet(x, t, context) for t in timesteps]
    sd.optimize()
    for t, plain in zip(timesteps, eager):
        assert rel_err(sd.unet(x, t, context), plain) <= 1e-4
