"""The `sd-scratch` command: txt2img, img2img and inpaint from the shell, one PNG per image.

    sd-scratch txt2img "a lighthouse at dusk" --checkpoint v1-5-pruned-emaonly.safetensors
    sd-scratch img2img "an oil painting" --image photo.jpg --strength 0.6 --checkpoint ...
    sd-scratch inpaint "a red door" --image house.png --mask door.png --checkpoint ...
    sd-scratch depth2img "a stone castle" --image house.png --checkpoint 512-depth-ema.ckpt

Each PNG carries its prompt and settings in a `parameters` text chunk, written in AUTOMATIC1111's
format so other SD tools read them back (`PIL.Image.open(path).text["parameters"]`). On success the
written paths go to stdout, one per line; anything that goes wrong is one line on stderr.
"""
from __future__ import annotations

import argparse
import random
import sys
import warnings
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from . import pipelines
from .addons import preview
from .addons.canny import ANNOTATOR_HIGH_THRESHOLD, ANNOTATOR_LOW_THRESHOLD, canny
from .checkpoints.load import BUILTIN_MODEL, load
from .guidance import PREDICTION_TYPES, Control, check_control
from .images import open_image
from .noise_schedule import SPACINGS
from .prompts import LONG_PROMPT_MODES, SYNTAXES
from .samplers import ALIASES, CONVENTIONS, DEFAULT_SPACING, SAMPLER_NAMES, SAMPLERS
from .stable_diffusion import DTYPES

PROG = "sd-scratch"
DEFAULT_CHECKPOINT = str(BUILTIN_MODEL)  # the built-in shapes model, weights/README.md
RANDOM_SEED = -1


class UsageError(Exception):
    """The command line itself is wrong (exit status 2): argparse's errors, the prompt, no model."""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (no usage block); `--help` is unchanged."""

    def error(self, message: str):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="Stable Diffusion v1 and v2 from scratch: generate images.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{txt2img,img2img,inpaint,depth2img}")
    for name, text in (("txt2img", "an image from a prompt"),
                       ("img2img", "a prompt-guided variation of --image (SDEdit)"),
                       ("inpaint", "repaint the white part of --mask in --image"),
                       ("depth2img", "a variation of --image that keeps its depth map (SD 2 depth)")):
        sub = commands.add_parser(name, help=text, description=f"{name}: {text}.")
        _add_options(sub, name)
    return parser


def _add_options(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("prompt", nargs="?", help="the prompt (or use --prompt)")
    p.add_argument("--prompt", dest="prompt_option", metavar="TEXT", help="the prompt, instead of the positional one")
    p.add_argument("--negative-prompt", default="", metavar="TEXT", help="what to steer away from")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, metavar="PATH",
                   help="SD v1 weights: a .safetensors/.ckpt file or a diffusers folder (default: the built-in "
                        "64×64 shapes model)")
    if command != "txt2img":
        p.add_argument("--image", required=True, metavar="PATH", help="the input image")
    if command == "inpaint":
        p.add_argument("--mask", required=True, metavar="PATH", help="white = repaint, black = keep")
    if command == "depth2img":
        p.add_argument("--depth-map", metavar="PATH", default=None,
                       help="a grayscale depth picture (white = near); default: the model's MiDaS estimates it")
        p.add_argument("--depth-model", metavar="PATH", default=None,
                       help="MiDaS's dpt_hybrid-midas-501f0c75.pt (or a transformers DPT folder), for a depth "
                            "checkpoint that does not carry one")
    size_help = ("a multiple of 8 (default: the model's native size: 512 for SD v1, 64 for the built-in model)"
                 if command == "txt2img" else "a multiple of 8 (default: the image's)")
    p.add_argument("--height", type=int, default=None, help=size_help)
    p.add_argument("--width", type=int, default=None, help=size_help)
    if command != "txt2img":
        p.add_argument("--strength", type=float, default=1.0 if command == "inpaint" else 0.8,
                       help="how much to change the image, in (0, 1] (default: %(default)s)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default: %(default)s)")
    p.add_argument("--seed", type=_seed, default=0,
                   help=f"random seed, {RANDOM_SEED} for a random one (printed and recorded) (default: %(default)s)")
    a1111_names = SAMPLER_NAMES[len(SAMPLERS) + len(ALIASES):]
    p.add_argument("--scheduler", choices=SAMPLER_NAMES, default="ddim", metavar="NAME",
                   help=f"sampler: {', '.join([*SAMPLERS, *ALIASES])}, or AUTOMATIC1111's name ("
                        f"{', '.join(repr(n) for n in a1111_names)}) (default: %(default)s)")
    p.add_argument("--karras", action="store_true", help="Karras et al.'s noise levels")
    p.add_argument("--conventions", choices=CONVENTIONS, default="diffusers",
                   help="diffusers: its schedulers' timesteps and one seed for the batch; a1111: AUTOMATIC1111's "
                        "(k-diffusion's σ's, x = ε·σ_max, image k seeded with seed + k on the CPU), for Euler, "
                        "Euler a and DPM++ 2M (default: %(default)s)")
    defaults = ", ".join(f"{name} {spacing}" for name, spacing in DEFAULT_SPACING.items())
    p.add_argument("--spacing", choices=SPACINGS, default=None,
                   help=f"which timesteps the sampler visits (default: the sampler's own, as in diffusers: {defaults})")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM's η: 0 deterministic, 1 like DDPM (default: %(default)s)")
    p.add_argument("--guidance-rescale", type=float, default=0.0,
                   help="rescale the guided prediction towards the conditional one's spread, in [0, 1] (Lin et al. "
                        "2023 use 0.7; default: %(default)s)")
    p.add_argument("--zero-terminal-snr", action="store_true",
                   help="the schedule rescaled so the last timestep is pure noise, for v-models trained that way "
                        "(use with --spacing trailing)")
    p.add_argument("--clip-skip", type=int, default=0, help="skip the last N text encoder layers (default: %(default)s)")
    p.add_argument("--long-prompts", choices=LONG_PROMPT_MODES, default="truncate",
                   help="over 75 tokens: truncate (with a warning) or encode in chunks of 75 (default: %(default)s)")
    p.add_argument("--from-png", metavar="PATH",
                   help="take the prompt and settings from a PNG's AUTOMATIC1111 'parameters' chunk (what it records "
                        "that sd-scratch cannot honour is listed)")
    p.add_argument("--lora-dir", metavar="FOLDER",
                   help="where the LoRA files that <lora:name:m> tags in the prompt name are found")
    p.add_argument("--prompt-syntax", choices=SYNTAXES, default="a1111",
                   help="a1111: (word:1.2), [word], BREAK as AUTOMATIC1111 reads them; plain: the text as it is "
                        "(default: %(default)s)")
    p.add_argument("--controlnet", action="append", default=[], metavar="PATH",
                   help="a ControlNet file or diffusers folder for this model; repeat for several, each with its "
                        "--control-image")
    p.add_argument("--control-image", action="append", default=[], metavar="PATH",
                   help="the hint a --controlnet reads (edges, depth, pose), in the same order; resized to the picture "
                        "(txt2img's default size is the first hint's)")
    for flag, default, text in (("scale", 1.0, "the ControlNet's weight"),
                                ("start", 0.0, "the fraction of the steps after which it starts acting"),
                                ("end", 1.0, "the fraction of the steps after which it stops")):
        p.add_argument(f"--control-{flag}", action="append", type=float, default=[], metavar="X",
                       help=f"{text}: once for all ControlNets or once each (default: {default})")
    p.add_argument("--guess-mode", action="store_true",
                   help="ControlNets act on the conditional half only, weighted 0.1 → 1 from the first skip to the middle")
    p.add_argument("--canny", nargs="*", type=float, default=None, metavar="THRESHOLD",
                   help="turn each --control-image into its Canny edges first; optionally the low and high thresholds "
                        f"(default: {ANNOTATOR_LOW_THRESHOLD:g} {ANNOTATOR_HIGH_THRESHOLD:g}, ControlNet's annotator's)")
    p.add_argument("--num-images", type=int, default=1, help="images to make (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps... (default: %(default)s)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights' precision (default: %(default)s)")
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=None,
                   help="what the UNet predicts, for SD 2.x files that do not say (default: the file's .yaml or "
                        "scheduler config, else a one-call probe)")
    p.add_argument("-o", "--output", default="out.png", metavar="PATH",
                   help="the PNG to write (default: %(default)s); with --num-images N > 1, STEM-0.png ... "
                        "STEM-{N-1}.png next to it")
    p.add_argument("--fast", action="store_true",
                   help="channels_last + torch.compile for the UNet (the first step compiles, slowly)")
    p.add_argument("--low-memory", action="store_true",
                   help="attention in slices and the VAE decoded in tiles: the same picture, less memory, "
                        "a little slower")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--preview", type=int, default=0, metavar="N",
                   help="every N steps, write a preview of the predicted picture x̂₀ beside the output (STEM-stepK.png)")
    p.add_argument("--preview-decoder", default=None, metavar="PATH",
                   help="a TAESD decoder (taesd_decoder.pth or a diffusers AutoencoderTiny folder) for --preview "
                        "(default: the one distilled for the built-in model, or for other models the "
                        "weightless latent-to-RGB matrix)")


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return the exit status: 0 done, 2 the command line could not be
    parsed, 1 anything else that went wrong, 130 interrupted. Errors and warnings are one line each."""
    with warnings.catch_warnings():  # puts the usual warning printer back afterwards
        warnings.showwarning = _show_warning
        try:
            return _run(build_parser().parse_args(argv))
        except UsageError as err:
            return _fail(err, status=2)
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        except Exception as err:  # any failure: one line, no traceback
            return _fail(err, status=1)


def _run(args: argparse.Namespace) -> int:
    if args.from_png is not None:
        _settings_from_png(args)
    prompt = _prompt(args)
    outputs = _output_paths(args.output, args.num_images)
    seed = random.randrange(2**32) if args.seed == RANDOM_SEED else args.seed
    if args.seed == RANDOM_SEED:
        print(f"{PROG}: seed {seed}", file=sys.stderr)
    settings = dict(steps=args.steps, guidance_scale=args.guidance, seed=seed, scheduler=args.scheduler,
                    num_images=args.num_images, eta=args.eta, karras=args.karras, spacing=args.spacing,
                    guidance_rescale=args.guidance_rescale, zero_terminal_snr=args.zero_terminal_snr,
                    clip_skip=args.clip_skip, long_prompts=args.long_prompts, prompt_syntax=args.prompt_syntax,
                    conventions=args.conventions)
    _check_device(args.device)
    # Everything but the image size is checked before the (slow) load; height and width must divide
    # by the VAE's factor, which only the loaded model knows.
    pipelines.GenerationSettings(**settings).check(factor=1)
    if args.command != "txt2img":
        pipelines.check_strength(args.strength, args.steps, args.conventions)
    hints, per_control = _control_options(args)
    if args.command == "depth2img" and args.controlnet:
        raise UsageError("depth2img takes no --controlnet (the depth map is its condition)")

    sd = load(args.checkpoint, device=args.device, dtype=args.dtype, prediction_type=args.prediction_type)
    if args.fast:
        sd.optimize()
    if args.low_memory:
        sd.set_attention_slicing().set_vae_tiling()
    # No --height/--width: txt2img draws at the model's native size, the others at the image's.
    common = dict(height=args.height, width=args.width, progress=not args.quiet, lora_dir=args.lora_dir,
                  callback=_previewer(args, sd, outputs), **settings)
    if args.controlnet:
        common["control"] = [Control(sd.load_controlnet(path), hint, *values, guess_mode=args.guess_mode)
                             for path, hint, values in zip(args.controlnet, hints, per_control)]
    if args.command == "txt2img":
        images = sd.txt2img(prompt, args.negative_prompt, **common)
    elif args.command == "img2img":
        images = sd.img2img(prompt, args.image, args.negative_prompt, strength=args.strength, **common)
    elif args.command == "inpaint":
        images = sd.inpaint(prompt, args.image, args.mask, args.negative_prompt, strength=args.strength, **common)
    else:
        if args.depth_model is not None:
            sd.load_depth_estimator(args.depth_model)
        depth_map = None if args.depth_map is None else open_image(args.depth_map, "--depth-map")
        images = sd.depth2img(prompt, args.image, args.negative_prompt, depth_map=depth_map, strength=args.strength,
                              **common)
    for image, path in zip(images, outputs):
        info = PngInfo()
        info.add_text("parameters", image.info["parameters"])  # the settings, as the pipeline recorded them
        image.save(path, format="PNG", pnginfo=info)
        print(path)
    return 0


def _previewer(args: argparse.Namespace, sd, outputs: list[Path]):
    """For --preview N: a callback that writes every N-th step's x̂₀ as a picture, by a TAESD decoder
    (the built-in model's own by default) or, with none for this model, the cheap latent-to-RGB matrix."""
    if args.preview < 0:
        raise ValueError(f"--preview must be a number of steps ≥ 1 (or 0: none), got {args.preview}")
    if not args.preview:
        return None
    if args.preview_decoder is not None or sd.family.name == "tiny-shapes":
        decoder = preview.load_preview_decoder(args.preview_decoder)
        to_pictures = decoder.pictures
    else:
        matrix = preview.cheap_matrix_for(sd.family.name)
        factor = sd.vae.config.factor

        def to_pictures(latents):
            return [p.resize((p.width * factor, p.height * factor), Image.NEAREST)
                    for p in preview.as_pictures(preview.cheap_preview(latents, matrix))]

    def write(info) -> None:
        if (info.step + 1) % args.preview == 0:
            for picture, path in zip(to_pictures(info.x0_pred), outputs):
                picture.save(path.with_name(f"{path.stem}-step{info.step + 1}.png"))
    return write


def _control_options(args: argparse.Namespace) -> tuple[list[Image.Image], list[tuple[float, float, float]]]:
    """The hint images (Canny edges with --canny) and each ControlNet's (scale, start, end), checked
    before the model is loaded."""
    n = len(args.controlnet)
    if len(args.control_image) != n:
        raise UsageError(f"{n} --controlnet and {len(args.control_image)} --control-image: give one hint per ControlNet")
    columns = []
    for flag, default in (("scale", 1.0), ("start", 0.0), ("end", 1.0)):
        values = getattr(args, f"control_{flag}")
        if n == 0 and values:
            raise UsageError(f"--control-{flag} without --controlnet")
        if len(values) not in (0, 1, n):
            raise UsageError(f"--control-{flag} given {len(values)} times for {n} ControlNets: give it once or once each")
        columns.append(values * n if len(values) == 1 else values or [default] * n)
    if args.canny is not None and len(args.canny) not in (0, 2):
        raise UsageError(f"--canny takes no thresholds or two (low high), got {len(args.canny)}")
    if (args.canny is not None or args.guess_mode) and n == 0:
        raise UsageError(f"{'--canny' if args.canny is not None else '--guess-mode'} without --controlnet")
    hints = [open_image(path, "--control-image") for path in args.control_image]
    if args.canny is not None:
        hints = [canny(hint, *args.canny) for hint in hints]
    per_control = list(zip(*columns))
    for values in per_control:
        check_control(*values)
    return hints, per_control


def _settings_from_png(args: argparse.Namespace) -> None:
    """Take the prompt and settings an AUTOMATIC1111 `parameters` chunk records (a prompt given on the
    command line wins); warn, one line each, about what it records that cannot be honoured."""
    try:
        text = Image.open(args.from_png).text.get("parameters")
    except (OSError, AttributeError) as err:
        raise ValueError(f"--from-png: cannot read {args.from_png!r} as a PNG ({_one_line(err)})") from None
    if not text:
        raise ValueError(f"--from-png: {args.from_png} has no 'parameters' text chunk")
    recorded = pipelines.read_parameters(text)
    if args.prompt is None and args.prompt_option is None:
        args.prompt = recorded.prompt
    args.negative_prompt = args.negative_prompt or recorded.negative_prompt
    to_args = {"steps": "steps", "guidance_scale": "guidance", "seed": "seed", "scheduler": "scheduler",
               "karras": "karras", "num_images": "num_images", "eta": "eta", "spacing": "spacing",
               "guidance_rescale": "guidance_rescale", "zero_terminal_snr": "zero_terminal_snr",
               "clip_skip": "clip_skip", "width": "width", "height": "height", "conventions": "conventions"}
    for name, value in recorded.settings.items():
        setattr(args, to_args[name], value)
    if recorded.strength is not None and hasattr(args, "strength"):
        args.strength = recorded.strength
    for item in recorded.not_honoured:
        warnings.warn(f"--from-png: not honoured: {item}", stacklevel=2)


def _prompt(args: argparse.Namespace) -> str:
    if (args.prompt is None) == (args.prompt_option is None):
        given = "both a prompt argument and --prompt" if args.prompt is not None else "no prompt"
        raise UsageError(f"{given}: give the prompt exactly once, as an argument or with --prompt")
    return args.prompt if args.prompt is not None else args.prompt_option


def _seed(text: str) -> int:
    """A torch.Generator seed (0 ≤ seed < 2**64) or -1."""
    if not text.lstrip("-").isdigit() or not (int(text) == RANDOM_SEED or 0 <= int(text) < 2**64):
        raise argparse.ArgumentTypeError(f"must be {RANDOM_SEED} (random) or an integer in [0, 2**64), got {text!r}")
    return int(text)


def _output_paths(output: str, num_images: int) -> list[Path]:
    """`out.png` for one image; `out-0.png`, `out-1.png`, ... for several."""
    path = Path(output)
    if path.suffix.lower() != ".png":
        raise ValueError(f"--output must be a .png file, got {output!r}")
    if not path.parent.is_dir():
        raise ValueError(f"--output: the folder {str(path.parent)!r} does not exist")
    if num_images <= 1:
        return [path]
    return [path.with_name(f"{path.stem}-{k}{path.suffix}") for k in range(num_images)]


def _check_device(name: str) -> None:
    try:
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError) as err:  # a CPU-only torch asserts on "cuda"
        raise ValueError(f"--device {name!r} cannot be used: {_one_line(err)}") from None


def _one_line(message) -> str:
    return " ".join(str(message).split())


def _fail(err: BaseException, status: int) -> int:
    message = _one_line(err) or type(err).__name__
    if not isinstance(err, (UsageError, ValueError, OSError, RuntimeError, FloatingPointError)):
        message = f"{type(err).__name__}: {message}"  # an unexpected failure: name its kind
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: warning: {_one_line(message)}", file=sys.stderr)
