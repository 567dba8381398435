"""Write a random-weight SD v1 checkpoint in both official layouts, built with the reference libraries.

The official weights cannot be downloaded here, so tests and notebooks use random weights in the
exact official layouts: a diffusers folder (model_index.json, unet/, vae/, text_encoder/,
tokenizer/, scheduler/) and a single `.safetensors` file with the CompVis names of
`v1-5-pruned-emaonly.safetensors`. Needs the test extra (diffusers, transformers):

    python scripts/make_random_checkpoint.py out/tiny                 # tiny configs, seconds
    python scripts/make_random_checkpoint.py out/sd15 --size sd15     # SD v1.5 sizes, ~4 GB fp32
    python scripts/make_random_checkpoint.py out/inpaint --inpainting # the 9-channel UNet
"""
import argparse
import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.reference import make_reference_models, single_file_layout, write_diffusers_folder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write diffusers/ and single.safetensors into")
    parser.add_argument("--size", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--inpainting", action="store_true", help="a 9-channel inpainting UNet")
    args = parser.parse_args()
    models = make_reference_models(args.size, inpainting=args.inpainting)
    args.out.mkdir(parents=True, exist_ok=True)
    write_diffusers_folder(models, args.out / "diffusers")
    save_file(single_file_layout(models), str(args.out / "single.safetensors"))
    print(f"wrote {args.out / 'diffusers'} and {args.out / 'single.safetensors'}")


if __name__ == "__main__":
    main()
