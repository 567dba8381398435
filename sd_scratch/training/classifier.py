"""A classifier of noisy latents, for classifier guidance (`004 · 分类器指引`; Dhariwal & Nichol 2021).

Classifier guidance steers an *unconditional* model with a separate network that reads the noisy
latent x_t and says how likely each attribute is, p_φ(y | x_t, t). Its gradient points to where
x_t looks more like y, and the sampler follows it (`guidance.ClassifierGuidance`):

    ε̂(x_t) = ε_θ(x_t, t) − s · √(1 − ᾱ_t) · ∇_{x_t} log p_φ(y | x_t, t)

The network is the UNet's own downward half, as in Dhariwal & Nichol: the time embedding, ResNet
blocks (`unet.ResnetBlock`) at 8×8 and 4×4, then a mean over positions and one linear head per
attribute of the built-in world (colour, shape, size, position, background). It is trained here on
the built-in VAE's latents of one-shape pictures, noised to a random t with document 003's forward
process, and never sees a caption: what steers the picture is the classifier alone.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..unet import ResnetBlock, TimestepMLP, timestep_embedding
from .toy_shapes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, Scene

# The attributes the classifier reads, with their values in a fixed order (the heads' classes).
ATTRIBUTES = {"color": tuple(COLORS), "shape": SHAPES, "size": tuple(SIZES), "position": tuple(POSITIONS),
              "background": tuple(BACKGROUNDS)}
DEFAULT_FILE = Path(__file__).resolve().parent.parent / "data" / "tiny-shapes-classifier.safetensors"


@dataclass(frozen=True)
class ClassifierConfig:
    latent_channels: int = 4
    channels: tuple[int, int] = (64, 128)
    norm_groups: int = 32


class NoisyLatentClassifier(nn.Module):
    """(x_t (B, 4, h, w), t (B,)) -> {attribute: logits (B, number of values)}."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.config = config
        c0, c1 = config.channels
        time_dim = 4 * c0  # the UNet's ratio
        self.time_embedding = TimestepMLP(c0, time_dim)
        self.conv_in = nn.Conv2d(config.latent_channels, c0, 3, padding=1)
        self.block_1 = ResnetBlock(c0, c0, time_dim, config.norm_groups)
        self.downsample = nn.Conv2d(c0, c0, 3, stride=2, padding=1)  # 8×8 -> 4×4
        self.block_2 = ResnetBlock(c0, c1, time_dim, config.norm_groups)
        self.norm_out = nn.GroupNorm(config.norm_groups, c1)
        self.heads = nn.ModuleDict({a: nn.Linear(c1, len(values)) for a, values in ATTRIBUTES.items()})

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        t = t.expand(x_t.shape[0]) if t.ndim == 0 or len(t) == 1 else t
        t_emb = self.time_embedding(timestep_embedding(t, self.config.channels[0]).to(x_t.dtype))
        h = self.block_1(self.conv_in(x_t), t_emb)
        h = self.block_2(self.downsample(h), t_emb)
        pooled = F.silu(self.norm_out(h)).mean(dim=(2, 3))  # (B, c1)
        return {a: head(pooled) for a, head in self.heads.items()}

    def log_prob(self, x_t: torch.Tensor, t: torch.Tensor, wanted: dict[str, str]) -> torch.Tensor:
        """log p(y | x_t, t) for the attribute values in `wanted`, e.g. {"color": "red"}: (B,).
        Several attributes are treated as independent, their log-probabilities added."""
        unknown = [a for a in wanted if a not in ATTRIBUTES]
        if unknown:
            raise ValueError(f"the classifier reads {', '.join(ATTRIBUTES)}; not {', '.join(unknown)}")
        logits = self.forward(x_t, t)
        total = torch.zeros(x_t.shape[0], device=x_t.device, dtype=x_t.dtype)
        for attribute, value in wanted.items():
            if value not in ATTRIBUTES[attribute]:
                raise ValueError(f"{attribute} {value!r} is not one of {', '.join(ATTRIBUTES[attribute])}")
            total = total + logits[attribute].log_softmax(-1)[:, ATTRIBUTES[attribute].index(value)]
        return total


def labels_of(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """The class index of each attribute of each scene: {attribute: (N,) long}."""
    return {a: torch.tensor([values.index(getattr(s, a)) for s in scenes]) for a, values in ATTRIBUTES.items()}


def classifier_loss(classifier: NoisyLatentClassifier, x_t: torch.Tensor, t: torch.Tensor,
                    labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sum over attributes of the cross-entropy of each head."""
    logits = classifier(x_t, t)
    return sum(F.cross_entropy(logits[a], labels[a]) for a in ATTRIBUTES)


def save_classifier(classifier: NoisyLatentClassifier, path: str | Path) -> None:
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in classifier.state_dict().items()}
    save_file(tensors, str(path), metadata={"config": json.dumps(asdict(classifier.config))})


def load_classifier(path: str | Path = DEFAULT_FILE) -> NoisyLatentClassifier:
    """The classifier in `path` (default: the one shipped for the built-in model), float32, eval mode."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    if "config" not in metadata:
        raise ValueError(f"{path}: no 'config' in its metadata; not a file written by save_classifier")
    config = json.loads(metadata["config"])
    classifier = NoisyLatentClassifier(ClassifierConfig(**{**config, "channels": tuple(config["channels"])}))
    classifier.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()}, strict=True)
    return classifier.eval()
