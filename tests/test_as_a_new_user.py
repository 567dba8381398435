"""Things that broke when sd-scratch was tried as a new user would, each held by a test.

(The samplers' default spacing, the seventh, is held by tests/test_schedulers.py's
`test_no_spacing_means_what_the_official_sd15_config_gives` and by tests/test_pipelines.py, whose
references are diffusers' schedulers built `from_config` of the official config, no overrides.)
"""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import sd_scratch
from sd_scratch.checkpoints.files import CheckpointError
from sd_scratch.checkpoints.load import BUILTIN_MODEL
from sd_scratch.cli import main
from sd_scratch.unet import UNet
from tests.reference import TINY_TEXT, make_reference_models, make_text_encoder, single_file_layout

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(steps=2, progress=False)


def settings_of(image) -> dict[str, str]:
    return dict(item.split(": ", 1) for item in image.info["parameters"].split("\n")[-1].split(", "))


@pytest.fixture(scope="module")
def builtin():
    return sd_scratch.load()


def test_txt2img_without_a_size_draws_at_the_family_native_size(builtin, tiny_checkpoint):
    """The built-in model was trained on 64×64 pictures; with no height/width it draws 64×64 (it drew
    512×512, slowly and badly). An SD v1 file's family says 512."""
    assert builtin.family.name == "tiny-shapes" and builtin.native_resolution == 64
    (image,) = builtin.txt2img("a red circle", **FAST)
    assert image.size == (64, 64)
    sd1 = sd_scratch.load(tiny_checkpoint["single"])
    assert (sd1.family.name, sd1.native_resolution) == ("sd1", 512)


def test_the_cli_takes_the_size_from_the_model_not_from_its_path(tmp_path, capsys):
    """The CLI used to recognise the built-in model by its path: a copy of it drew at 512×512."""
    copy = tmp_path / "my-model.safetensors"
    shutil.copy(BUILTIN_MODEL, copy)
    assert main(["txt2img", "a red circle", "--checkpoint", str(copy), "--steps", "2", "--quiet",
                 "-o", str(tmp_path / "out.png")]) == 0
    capsys.readouterr()
    from PIL import Image
    assert Image.open(tmp_path / "out.png").size == (64, 64)


def test_save_single_file_works_after_optimize(builtin, tmp_path):
    """optimize() compiles the UNet's forward in place: the module and its weights' names stay."""
    sd = sd_scratch.load()
    sd.optimize()
    assert type(sd.unet) is UNet
    sd_scratch.save_single_file(sd, tmp_path / "optimized.safetensors")
    saved, original = load_file(tmp_path / "optimized.safetensors"), load_file(BUILTIN_MODEL)
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[k].float(), original[k].float()) for k in original)


def test_every_image_carries_its_settings_and_a_random_seed_can_be_repeated(builtin):
    """seed=None picked a seed the caller never learnt; now image.info["parameters"] says it."""
    first = builtin.txt2img("a blue square", seed=None, **FAST)[0]
    fields = settings_of(first)
    assert first.info["parameters"].startswith("a blue square\n")
    assert fields["Size"] == "64x64" and fields["Steps"] == "2" and fields["Model"] == "tiny-shapes"
    again = builtin.txt2img("a blue square", seed=int(fields["Seed"]), **FAST)[0]
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert settings_of(again) == fields


@pytest.mark.parametrize("width", [32, 96])
def test_a_text_encoder_width_that_64_wide_heads_cannot_divide_is_an_error_naming_the_file(width, tmp_path):
    """Width 32 crashed with ZeroDivisionError (heads = 32 // 64 = 0); 96 built one 96-wide head,
    which no CLIP has. Both are refused in words."""
    models = make_reference_models("tiny")
    models["text_encoder"] = make_text_encoder(dict(TINY_TEXT, hidden_size=width, num_attention_heads=1))
    path = tmp_path / "odd.safetensors"
    save_file(single_file_layout(models), str(path))
    with pytest.raises(CheckpointError, match=rf"odd\.safetensors: the text encoder is {width} wide; .*multiple of"):
        sd_scratch.load(path)


def test_the_spacing_is_a_setting_of_the_api_and_the_cli(builtin, tmp_path, capsys):
    default = builtin.txt2img("a red circle", scheduler="euler", **FAST)[0]
    trailing = builtin.txt2img("a red circle", scheduler="euler", spacing="trailing", **FAST)[0]
    assert "Timestep spacing" not in settings_of(default)  # euler's default, linspace, goes unsaid
    assert settings_of(trailing)["Timestep spacing"] == "trailing"
    assert not np.array_equal(np.asarray(default), np.asarray(trailing))
    assert main(["txt2img", "a red circle", "--scheduler", "euler", "--spacing", "trailing", "--steps", "2",
                 "--quiet", "-o", str(tmp_path / "t.png")]) == 0
    capsys.readouterr()
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(tmp_path / "t.png")), np.asarray(trailing))


def _can_build_without_isolation() -> bool:
    try:
        import setuptools  # noqa: F401
        from setuptools.command import bdist_wheel  # noqa: F401
        return True
    except ImportError:
        try:
            import wheel  # noqa: F401
            return True
        except ImportError:
            return False


def test_a_wheel_in_a_fresh_environment_has_the_built_in_model(tmp_path):
    """The README's first command from a wheel installed in a new virtual environment, run from another
    directory: the built-in model is package data, not a file beside the repository."""
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)]
    if _can_build_without_isolation():
        build.insert(4, "--no-build-isolation")
    subprocess.run(build, check=True, cwd=tmp_path, capture_output=True)
    (wheel,) = wheels.glob("sd_scratch-*.whl")

    env_dir = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    fresh_site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                     check=True, capture_output=True, text=True).stdout.strip())
    # The dependencies (torch, ...) come from this environment's site-packages as a plain path: its
    # .pth files, the editable install of this checkout among them, are not processed there.
    (fresh_site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(fresh_site), str(wheel)],
                   check=True, capture_output=True)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run([python, "-c", "import sd_scratch.checkpoints.load as m; print(m.__file__, m.BUILTIN_MODEL)"],
                           check=True, capture_output=True, text=True, cwd=elsewhere, env=env).stdout.split()
    assert all(Path(p).is_relative_to(env_dir) for p in where), where  # not this checkout
    command = [str(env_dir / "bin" / "python"), "-m", "sd_scratch", "txt2img",
               "a large purple triangle at the top right on a white background", "-o", "out.png", "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=elsewhere, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "out.png"
    from PIL import Image
    assert Image.open(elsewhere / "out.png").size == (64, 64)
