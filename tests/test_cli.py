"""The `sd-scratch` command line writes PNGs that carry their settings, and says what is wrong in one line.

Most runs call `cli.main(argv)` in this process (a fresh interpreter costs seconds); a few run
`python -m sd_scratch` for real, to check the exit status and the stderr an actual shell sees.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sd_scratch import pipelines
from sd_scratch.cli import main
from sd_scratch.pipelines import GenerationSettings, parameters_text

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "2", "--quiet"]


@pytest.fixture
def cli(capsys):
    """cli(*args) -> (exit status, stdout, stderr lines) of `sd-scratch args...`, in this process."""
    def run(*args):
        status = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return status, out, err.splitlines()
    return run


def run_module(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sd_scratch", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT)


def parameters(path: Path) -> tuple[list[str], dict[str, str]]:
    """A PNG's A1111 `parameters` chunk -> (the lines before the last, {key: value} of the last line)."""
    *lines, settings = Image.open(path).text["parameters"].split("\n")
    return lines, dict(item.split(": ", 1) for item in settings.split(", "))


def write_image(path: Path, mode: str = "RGB", size=(24, 16)) -> Path:
    """A small picture with some structure: a gradient with a square in it, saved in `mode`."""
    w, h = size
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    pixels[h // 4:3 * h // 4, w // 4:3 * w // 4, 2] = 255
    image = Image.fromarray(pixels)
    image = image.convert("RGBA") if mode == "RGBA" else image.quantize(16) if mode == "P" else image
    image.save(path)
    return path


def write_mask(path: Path, size=(24, 16)) -> Path:
    w, h = size
    mask = np.zeros((h, w), np.uint8)
    mask[:, w // 2:] = 255  # repaint the right half
    Image.fromarray(mask).save(path)
    return path


# ---- what is written ------------------------------------------------------------------------------

def test_txt2img_writes_a_png_whose_parameters_read_back(tiny_checkpoint, tmp_path):
    out = tmp_path / "cube.png"
    done = run_module("txt2img", "a red cube", "--negative-prompt", "blurry, dark", "--checkpoint",
                      tiny_checkpoint["single"], "--steps", 3, "--guidance", 5.5, "--seed", 42, "--scheduler",
                      "euler_a", "--height", 16, "--width", 24, "--quiet", "-o", out)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{out}\n", "")
    assert Image.open(out).size == (24, 16)
    lines, settings = parameters(out)
    assert lines == ["a red cube", "Negative prompt: blurry, dark"]
    assert settings == {"Steps": "3", "Sampler": "Euler a", "CFG scale": "5.5", "Seed": "42", "Size": "24x16",
                        "Model": "single"}


def test_no_negative_prompt_line_when_empty_and_a1111_names(cli, tiny_checkpoint, tmp_path):
    out = tmp_path / "x.png"
    status, stdout, err = cli("txt2img", "--prompt", "a cat", "--checkpoint", tiny_checkpoint["folder"], *FAST,
                              "--height", 16, "--width", 16, "--scheduler", "dpmpp_2m", "--karras",
                              "--clip-skip", 1, "-o", out)
    assert (status, stdout, err) == (0, f"{out}\n", [])
    lines, settings = parameters(out)
    assert lines == ["a cat"]
    assert settings["Sampler"] == "DPM++ 2M Karras"
    assert settings["Clip skip"] == "2"  # A1111 counts from 1: our clip_skip=1 is its "Clip skip: 2"
    assert settings["Model"] == "diffusers"  # the folder's name


@pytest.mark.parametrize("scheduler, karras, name", [("ddim", False, "DDIM"), ("plms", False, "PLMS"),
                                                     ("pndm", False, "PLMS"), ("euler", True, "Euler Karras"),
                                                     ("euler_a", False, "Euler a"), ("ddpm", False, "DDPM")])
def test_sampler_names_are_a1111s(scheduler, karras, name):
    settings = GenerationSettings(steps=20, guidance_scale=7.0, seed=1, scheduler=scheduler, karras=karras)
    text = parameters_text("a cat", "", settings, (512, 768), "v1-5")
    assert text == f"a cat\nSteps: 20, Sampler: {name}, CFG scale: 7.0, Seed: 1, Size: 512x768, Model: v1-5"


def test_several_images_are_numbered_files(cli, tiny_checkpoint, tmp_path):
    status, stdout, err = cli("txt2img", "a", "--checkpoint", tiny_checkpoint["single"], *FAST, "--height", 16,
                              "--width", 16, "--num-images", 2, "-o", tmp_path / "batch.png")
    paths = [tmp_path / "batch-0.png", tmp_path / "batch-1.png"]
    assert (status, stdout, err) == (0, "".join(f"{p}\n" for p in paths), [])
    assert sorted(tmp_path.iterdir()) == paths
    assert all(parameters(p)[1]["Batch size"] == "2" for p in paths)
    assert not np.array_equal(np.asarray(Image.open(paths[0])), np.asarray(Image.open(paths[1])))


def test_the_same_seed_gives_the_same_pixels(cli, tiny_checkpoint, tmp_path):
    pixels = []
    for name in ("a.png", "b.png"):
        status, _, _ = cli("txt2img", "a", "--checkpoint", tiny_checkpoint["single"], *FAST, "--height", 16,
                           "--width", 16, "--seed", 7, "--scheduler", "euler_a", "-o", tmp_path / name)
        assert status == 0
        pixels.append(np.asarray(Image.open(tmp_path / name)))
    assert np.array_equal(*pixels)


def test_low_memory_gives_the_same_picture(cli, tiny_checkpoint, tmp_path):
    """--low-memory: attention in slices, the VAE decoded in 64-latent-pixel tiles (here 2×2 of them)."""
    pixels = []
    for name, flags in (("plain.png", []), ("low.png", ["--low-memory"])):
        status, _, err = cli("txt2img", "a", "--checkpoint", tiny_checkpoint["single"], *FAST, "--height", 272,
                             "--width", 272, *flags, "-o", tmp_path / name)
        assert (status, err) == (0, [])
        pixels.append(np.asarray(Image.open(tmp_path / name), dtype=int))
    assert np.abs(pixels[0] - pixels[1]).max() <= 1  # 8-bit rounding of values equal to float rounding


def test_a_random_seed_is_printed_and_recorded(cli, tiny_checkpoint, tmp_path):
    out = tmp_path / "x.png"
    status, _, err = cli("txt2img", "a", "--checkpoint", tiny_checkpoint["single"], *FAST, "--height", 16,
                         "--width", 16, "--seed", -1, "-o", out)
    assert status == 0 and len(err) == 1 and err[0].startswith("sd-scratch: seed ")
    assert parameters(out)[1]["Seed"] == err[0].split()[-1]


@pytest.mark.parametrize("command, mode, strength", [("img2img", "RGB", "0.8"), ("img2img", "P", "0.8"),
                                                   ("inpaint", "RGBA", "1.0")])
def test_img2img_and_inpaint_take_the_image_size_and_record_strength(cli, tiny_checkpoint, tmp_path, command,
                                                                      mode, strength):
    image = write_image(tmp_path / f"in-{mode}.png", mode)
    mask = ["--mask", write_mask(tmp_path / "mask.png")] if command == "inpaint" else []
    out = tmp_path / "out.png"
    status, stdout, err = cli(command, "a", "--image", image, *mask, "--checkpoint", tiny_checkpoint["single"],
                              "--steps", 3, "--quiet", "-o", out)
    assert (status, stdout, err) == (0, f"{out}\n", [])
    assert Image.open(out).size == (24, 16)
    settings = parameters(out)[1]
    assert (settings["Denoising strength"], settings["Size"]) == (strength, "24x16")


def test_a_mask_of_another_size_is_resized_with_a_one_line_warning(cli, tiny_checkpoint, tmp_path):
    image, mask = write_image(tmp_path / "in.png"), write_mask(tmp_path / "mask.png", size=(16, 16))
    status, _, err = cli("inpaint", "a", "--image", image, "--mask", mask, "--checkpoint", tiny_checkpoint["single"],
                         *FAST, "-o", tmp_path / "out.png")
    assert status == 0
    assert len(err) == 1 and err[0].startswith("sd-scratch: warning: mask is 16×16")


def test_a_truncated_prompt_is_a_one_line_warning(cli, tiny_checkpoint, tmp_path):
    status, _, err = cli("txt2img", " ".join(["word"] * 80), "--checkpoint", tiny_checkpoint["single"], *FAST,
                         "--height", 16, "--width", 16, "-o", tmp_path / "x.png")
    assert status == 0
    assert len(err) == 1 and err[0].startswith("sd-scratch: warning: prompt has 80 tokens")


# ---- what is refused ------------------------------------------------------------------------------

# name: (command, changes to a good command line, exit status, words the one-line error must contain).
# A change sets an option, or removes it with None; "prompt" is the positional prompt. {tmp} is the
# test's folder and {text} a text file named notes.safetensors.
BAD_INPUTS = {
    "height not a multiple of 8": ("txt2img", {"--height": 30}, 1, "height"),  # nor of the tiny VAE's 4
    "width not a multiple of 8": ("txt2img", {"--width": 18}, 1, "width"),
    "zero steps": ("txt2img", {"--steps": 0}, 1, "steps"),
    "strength zero": ("img2img", {"--strength": 0}, 1, "strength"),
    "strength over one": ("inpaint", {"--strength": 1.5}, 1, "strength"),
    "steps × strength < 1": ("img2img", {"--steps": 3, "--strength": 0.1}, 1, "strength"),
    "negative guidance": ("txt2img", {"--guidance": -1}, 1, "guidance"),
    "unknown scheduler": ("txt2img", {"--scheduler": "heun"}, 2, "--scheduler"),
    "checkpoint missing": ("txt2img", {"--checkpoint": "{tmp}/nothing.safetensors"}, 1, "nothing.safetensors"),
    "corrupt checkpoint": ("txt2img", {"--checkpoint": "{text}"}, 1, "notes.safetensors"),
    "img2img without --image": ("img2img", {"--image": None}, 2, "--image"),
    "inpaint without --mask": ("inpaint", {"--mask": None}, 2, "--mask"),
    "input image missing": ("img2img", {"--image": "{tmp}/nothing.png"}, 1, "nothing.png"),
    "mask not an image": ("inpaint", {"--mask": "{text}"}, 1, "mask"),
    "two prompts": ("txt2img", {"--prompt": "another"}, 2, "--prompt"),
    "no prompt": ("txt2img", {"prompt": None}, 2, "prompt"),
    "bad seed": ("txt2img", {"--seed": -5}, 2, "--seed"),
    "steps not a number": ("txt2img", {"--steps": "many"}, 2, "--steps"),
    "output not .png": ("txt2img", {"-o": "{tmp}/x.jpg"}, 1, "--output"),
    "output folder missing": ("txt2img", {"-o": "{tmp}/no/x.png"}, 1, "--output"),
    "unknown device": ("txt2img", {"--device": "abacus"}, 1, "--device"),
    "clip skip too large": ("txt2img", {"--clip-skip": 5}, 1, "clip_skip"),
}


def bad_command_line(tiny_checkpoint, tmp_path, case: str) -> list[str]:
    command, changes, _, _ = BAD_INPUTS[case]
    text = tmp_path / "notes.safetensors"
    text.write_text("not a checkpoint\n")
    options = {"prompt": "a prompt", "--checkpoint": tiny_checkpoint["single"], "--steps": 2,
               "-o": tmp_path / "o.png"}
    if command == "txt2img":
        options.update({"--height": 16, "--width": 16})
    else:
        options["--image"] = write_image(tmp_path / "in.png")
    if command == "inpaint":
        options["--mask"] = write_mask(tmp_path / "mask.png")
    options.update(changes)
    argv = [command, "--quiet"]
    for key, value in options.items():
        if value is not None:
            argv += ([] if key == "prompt" else [key]) + [str(value).format(tmp=tmp_path, text=text)]
    return argv


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_naming_the_parameter(cli, tiny_checkpoint, tmp_path, case):
    status, stdout, err = cli(*bad_command_line(tiny_checkpoint, tmp_path, case))
    *_, expected_status, words = BAD_INPUTS[case]
    assert status == expected_status
    assert stdout == "" and len(err) == 1, err
    assert err[0].startswith("sd-scratch: error: ") and words in err[0]
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("case", ["unknown scheduler", "strength zero", "corrupt checkpoint"])
def test_a_real_process_prints_no_traceback(tiny_checkpoint, tmp_path, case):
    done = run_module(*bad_command_line(tiny_checkpoint, tmp_path, case))
    *_, expected_status, words = BAD_INPUTS[case]
    assert done.returncode == expected_status
    assert len(done.stderr.splitlines()) == 1 and words in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("exception, status, words", [(KeyboardInterrupt(), 130, "interrupted"),
                                                      (FloatingPointError("NaN in the image"), 1, "NaN")])
def test_an_interrupt_or_a_failure_while_generating_is_one_line(cli, tiny_checkpoint, tmp_path, monkeypatch,
                                                                 exception, status, words):
    def fail(*args, **kwargs):
        raise exception
    monkeypatch.setattr(pipelines, "txt2img", fail)
    result = cli("txt2img", "a", "--checkpoint", tiny_checkpoint["single"], "-o", tmp_path / "x.png")
    assert result[0] == status and result[1] == "" and len(result[2]) == 1 and words in result[2][0]


def test_help_is_ordinary_argparse_help():
    done = run_module("inpaint", "--help")
    assert done.returncode == 0 and "--mask" in done.stdout and "STEM-0.png" in done.stdout


@pytest.mark.parametrize("args, named", [(["--steps", "0"], "steps"), (["--scheduler", "lms"], "scheduler"),
                                         (["--guidance", "-1"], "guidance_scale")])
def test_settings_are_checked_before_the_checkpoint_is_loaded(cli, tmp_path, args, named):
    """A bad setting is reported at once, even when the checkpoint does not exist (no slow load first)."""
    status, _, err = cli("txt2img", "a cat", "--checkpoint", tmp_path / "missing.safetensors", "-o",
                         tmp_path / "x.png", *args)
    assert status != 0 and len(err) == 1
    assert named in err[0] and "missing.safetensors" not in err[0]


def test_from_png_reproduces_our_picture_and_reads_a1111s_text(cli, tmp_path):
    """A PNG written here regenerates pixel for pixel from its own parameters; an A1111 text's fields
    map onto our settings, and what cannot be honoured is a warning line each."""
    first = tmp_path / "first.png"
    assert cli("txt2img", "a blue square", "--steps", "3", "--seed", "42", "--scheduler", "euler_a", "--karras",
               "--quiet", "-o", first)[0] == 0
    again = tmp_path / "again.png"
    status, _, err = cli("txt2img", "--from-png", first, "--quiet", "-o", again)
    assert (status, err) == (0, [])
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    assert Image.open(again).text["parameters"] == Image.open(first).text["parameters"]

    recorded = pipelines.read_parameters(
        "a red circle\nNegative prompt: blurry\nSteps: 4, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6, "
        'Seed: 7, Size: 64x64, Model hash: abc, Model: v1-5, Clip skip: 2, Lora hashes: "a: 1, b: 2", '
        "Hires upscale: 2")
    assert (recorded.prompt, recorded.negative_prompt) == ("a red circle", "blurry")
    assert recorded.settings == dict(scheduler="dpmpp_2m", karras=True, conventions="a1111", steps=4,
                                     guidance_scale=6.0, seed=7, width=64, height=64, clip_skip=1)
    assert recorded.not_honoured[0].startswith("RNG: GPU (")  # A1111's default noise source, not recorded
    assert recorded.not_honoured[1:] == ["Hires upscale: 2"]
    png = tmp_path / "a1111.png"
    info = PngInfo()
    info.add_text("parameters", "a red circle\nSteps: 2, Sampler: DPM++ SDE, CFG scale: 6, Seed: 7, Size: 64x64")
    Image.new("RGB", (8, 8)).save(png, pnginfo=info)
    status, _, err = cli("txt2img", "--from-png", png, "--quiet", "-o", tmp_path / "b.png")
    assert status == 0 and err == ["sd-scratch: warning: --from-png: not honoured: Sampler: DPM++ SDE (sd-scratch "
                                   "has DDPM, DDIM, PLMS, Euler, Euler a, DPM++ 2M)"]


def test_a1111_conventions_write_a_png_that_regenerates_from_its_own_seed(cli, tmp_path):
    """--conventions a1111 with A1111's sampler name: each PNG records its own seed and "RNG: CPU",
    and --from-png makes the second image of the batch again, alone, from its PNG."""
    status, _, err = cli("txt2img", "a blue square", "--steps", "3", "--seed", "42", "--scheduler", "DPM++ 2M Karras",
                         "--conventions", "a1111", "--num-images", "2", "--quiet", "-o", tmp_path / "batch.png")
    assert (status, err) == (0, [])
    second = tmp_path / "batch-1.png"
    settings = parameters(second)[1]
    assert (settings["Sampler"], settings["Schedule type"], settings["Seed"], settings["RNG"]) == (
        "DPM++ 2M", "Karras", "43", "CPU")
    assert "Batch size" not in settings
    again = tmp_path / "again.png"
    status, _, err = cli("txt2img", "--from-png", second, "--quiet", "-o", again)
    assert (status, err) == (0, [])
    assert Image.open(again).text["parameters"] == Image.open(second).text["parameters"]
    difference = np.abs(np.asarray(Image.open(again), dtype=int) - np.asarray(Image.open(second), dtype=int))
    assert difference.max() <= 2  # a batch of 2 and a batch of 1 round alike to within 2 levels


def test_lora_tags_in_the_prompt_need_a_folder_and_merge_for_the_run(cli, tmp_path):
    from safetensors.torch import save_file

    status, _, err = cli("txt2img", "a red circle <lora:style:0.5>", "--steps", "2", "--quiet", "-o", tmp_path / "x.png")
    assert status == 1 and "pass lora_dir= (--lora-dir)" in err[0]
    import sd_scratch
    sd = sd_scratch.load()
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    proj = sd.unet.get_submodule("down_blocks.0.attentions.0.proj_in")
    g = torch.Generator().manual_seed(0)
    save_file({name + ".lora_down.weight": torch.randn(4, proj.weight.shape[1], 1, 1, generator=g) * 0.3,
               name + ".lora_up.weight": torch.randn(proj.weight.shape[0], 4, 1, 1, generator=g) * 0.3},
              str(tmp_path / "style.safetensors"))
    before = proj.weight.clone()
    tagged = sd.txt2img("a red circle <lora:style:0.5>", steps=2, seed=3, lora_dir=tmp_path, progress=False)[0]
    assert torch.equal(proj.weight, before)  # put back after the run
    sd.load_lora(tmp_path / "style.safetensors", scale=0.5)
    merged = sd.txt2img("a red circle", steps=2, seed=3, progress=False)[0]
    assert np.array_equal(np.asarray(tagged), np.asarray(merged))
    assert tagged.info["parameters"].startswith("a red circle <lora:style:0.5>\n")
