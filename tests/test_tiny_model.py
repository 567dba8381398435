"""The built-in model: a real file in the official layout that draws what its captions say, trained
by code that runs the same under DistributedDataParallel.

Numbers and commands behind the shipped weights: weights/README.md.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

import sd_scratch
from sd_scratch.training import toy_shapes
from sd_scratch.checkpoints.load import BUILTIN_MODEL
from sd_scratch.text_encoder import CLIPTextEncoder, TextEncoderConfig
from sd_scratch.tokenizer import CLIPTokenizer
from sd_scratch.training.losses import DiffusionLoss, VAELoss, drop_captions, fold_latent_normalisation, tiny_configs
from sd_scratch.unet import UNet, UNetConfig
from sd_scratch.vae import LATENT_SCALE, AutoencoderKL, VAEConfig

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 50_000_000


@pytest.fixture(scope="module")
def builtin():
    return sd_scratch.load()


def test_the_shipped_file_is_small_and_loads_strictly_through_the_official_loader(builtin):
    assert BUILTIN_MODEL.stat().st_size <= MAX_BYTES
    report = builtin.report
    assert report.layout == "single-file" and report.source == str(BUILTIN_MODEL)
    assert report.ignored == []  # every tensor in the file is used
    configs = tiny_configs()
    assert builtin.unet.config == configs.unet
    assert builtin.vae.config == configs.vae
    assert builtin.text_encoder.config == configs.text
    assert builtin.tokenizer.encode("a small red circle") == CLIPTokenizer().encode("a small red circle")


def test_a_seeded_generation_draws_the_colours_and_backgrounds_it_is_asked_for(builtin):
    scenes = [toy_shapes.Scene("large", "red", "circle", "in the center", "white"),
              toy_shapes.Scene("large", "blue", "square", "at the top left", "black"),
              toy_shapes.Scene("large", "yellow", "triangle", "at the bottom right", "gray"),
              toy_shapes.Scene("small", "green", "circle", "at the top right", "brown")]
    images = builtin.txt2img([s.caption for s in scenes], height=64, width=64, steps=25, seed=0, progress=False)
    for scene, image in zip(scenes, images):
        found = toy_shapes.analyse(image)
        assert (found.color, found.background) == (scene.color, scene.background), scene.caption


def test_the_prompts_a_newcomer_types_draw_what_they_say(builtin):
    prompts = ["a red circle", "a blue square", "yellow triangle, black background", "a green circle on gray"]
    wanted = [("red", "circle", None), ("blue", "square", None), ("yellow", "triangle", "black"),
              ("green", "circle", "gray")]
    images = builtin.txt2img(prompts, steps=25, seed=0, progress=False)
    for prompt, (color, shape, background), image in zip(prompts, wanted, images):
        found = toy_shapes.analyse(image)
        assert (found.color, found.shape) == (color, shape), prompt
        assert background is None or found.background == background, prompt


def test_two_shapes_in_a_relation_are_both_drawn(builtin):
    image = builtin.txt2img("a red circle above a blue square", steps=25, seed=0, progress=False)[0]
    _, found = toy_shapes.analyse_things(image)
    assert {f.color for f in found} == {"red", "blue"}


def test_the_latent_scale_suits_the_shipped_vae(builtin):
    images, _ = toy_shapes.make_dataset(toy_shapes.train_scenes()[::8], 1, seed=0)
    with torch.no_grad():
        latents = builtin.vae.encode(images).mean * LATENT_SCALE
    assert abs(latents.std().item() - 1.0) < 0.1


def test_folding_the_latent_scale_into_the_vae_changes_no_reconstruction():
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(block_out_channels=(32, 32), layers_per_block=1)).eval()
    images, _ = toy_shapes.make_dataset(toy_shapes.train_scenes()[:6], 1, seed=0)
    with torch.no_grad():
        before = vae(images)
        fold_latent_normalisation(vae, images)
        after = vae(images)
        z = vae.encode(images).mean * LATENT_SCALE
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(4), rtol=0, atol=1e-4)
    torch.testing.assert_close(z.std(dim=(0, 2, 3)), torch.ones(4), rtol=1e-4, atol=1e-4)


# ---- two processes, one model --------------------------------------------------------------------

def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    """Train a small VAE and a small text encoder + UNet for 3 steps on this rank's own data."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same initial weights on both ranks
    vae = AutoencoderKL(VAEConfig(block_out_channels=(32, 32), layers_per_block=1))
    text = CLIPTextEncoder(TextEncoderConfig(vocab_size=49408, width=64, layers=1, heads=1, mlp_width=128))
    unet = UNet(UNetConfig(channels=(32, 64), attention_levels=(True, True), layers_per_level=1, context_dim=64))
    losses = [torch.nn.parallel.DistributedDataParallel(VAELoss(vae)),
              torch.nn.parallel.DistributedDataParallel(DiffusionLoss(text, unet))]
    optimizer = torch.optim.AdamW([p for m in losses for p in m.parameters()], lr=1e-3)
    images, captions = toy_shapes.make_dataset(toy_shapes.train_scenes()[rank::world][:4], 1, seed=rank)
    tokenizer = CLIPTokenizer()
    ids, empty = tokenizer(captions), tokenizer([""])[0]
    for step in range(3):
        generator = torch.Generator().manual_seed(100 * rank + step)  # different noise on each rank
        loss = losses[0](images, generator=generator)["loss"]
        x0 = torch.randn(4, 4, 8, 8, generator=generator)
        loss = loss + losses[1](x0, drop_captions(ids, empty, p=0.5, generator=generator), generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save({**vae.state_dict(), **{f"text.{k}": v for k, v in text.state_dict().items()},
                **{f"unet.{k}": v for k, v in unet.state_dict().items()}}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ddp_processes_on_cpu_end_with_identical_parameters(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    torch.manual_seed(0)
    initial = AutoencoderKL(VAEConfig(block_out_channels=(32, 32), layers_per_block=1)).state_dict()
    assert not torch.equal(initial["decoder.conv_out.weight"], a["decoder.conv_out.weight"])  # it did train


# ---- the README's first command ------------------------------------------------------------------

def test_the_readme_first_command_writes_a_png(tmp_path):
    command = shutil.which("sd-scratch", path=os.path.dirname(sys.executable)) or shutil.which("sd-scratch")
    argv = [command] if command else [sys.executable, "-m", "sd_scratch"]
    done = subprocess.run([*argv, "txt2img", "a red circle", "-o", str(tmp_path / "out.png")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    image = Image.open(tmp_path / "out.png")
    assert image.format == "PNG" and image.size == (64, 64)
    found = toy_shapes.analyse(image)
    assert (found.color, found.shape) == ("red", "circle")
