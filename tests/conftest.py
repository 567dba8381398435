"""Session fixtures: random-weight reference checkpoints written once in both official layouts."""
from pathlib import Path

import pytest
from safetensors.torch import save_file

from tests.reference import make_reference_models, single_file_layout, write_diffusers_folder


@pytest.fixture(scope="session")
def tiny_models() -> dict:
    """Reference (diffusers/transformers) models at the tiny configs, every tensor distinct."""
    return make_reference_models("tiny")


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """{"folder": a diffusers folder, "single": a single-file .safetensors} of the same weights."""
    root = tmp_path_factory.mktemp("tiny_checkpoint")
    write_diffusers_folder(tiny_models, root / "diffusers")
    save_file(single_file_layout(tiny_models), str(root / "single.safetensors"))
    return {"folder": root / "diffusers", "single": root / "single.safetensors"}
