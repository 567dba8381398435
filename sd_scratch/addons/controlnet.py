"""ControlNet (Zhang, Rao & Agrawala 2023): steering the noise predictor with an outline, a pose or a
depth map (`004 · 其它条件`), by a trainable copy of the UNet's encoder whose outputs are added to
the UNet's skips, the UNet itself untouched.

    hint (B,3,H,W) in [0,1] ─ hint encoder (convs, ÷8) ─ zero conv ─┐
    x_t (B,4,h,w) ─ conv_in ──────────────────────────────────────── + ─► copy of the encoder + middle
                                                                     13 features (SD 1.5: 12 skips, the middle)
                                                                     ─ 13 zero 1×1 convs ─ × scale ─► the UNet's
                                                                       skips and middle (`UNet.forward(control=)`)

The 1×1 convolutions start at zero ("zero convolutions"), so an untrained ControlNet adds exactly
nothing and training starts from the UNet's own behaviour (Zhang et al. 2023, §3.1, eq. 2). The
encoder copy is built by `unet.down_path`, the same function that builds the UNet's, so its tensors
have the UNet's names and the UNet's key rules read the single files (`checkpoints/rules.py`).

Guess mode ("control mode: my prompt is more important" elsewhere): the ControlNet sees only the
conditional half of classifier-free guidance, and its residuals are scaled from 0.1 at the first
skip to 1 at the middle, diffusers' law 10^(−1 + i/n) for residual i of n + 1 (`torch.logspace(-1, 0)`).
The original code's law is 0.825^(12 − i), which differs (0.100 vs 0.099 at the first skip, 0.52 vs
0.56 at the seventh); diffusers' is the one tested here, against its pipeline.

Files: lllyasviel's `control_sd15_*.pth` / `control_v11p_sd15_*.pth` (CompVis names under
`control_model.`, or the same without the prefix, fp16 included), and diffusers folders
(`config.json` + `diffusion_pytorch_model.safetensors`); `load_controlnet` reads them all.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..checkpoints.files import CheckpointError, read_checkpoint
from ..checkpoints.rules import Rule, convert, original_unet_shape, rename, unet_rules
from ..unet import ControlResiduals, MidBlock, TimestepMLP, UNetConfig, down_path, embed_timesteps, run_down_path

# The hint encoder's widths in SD 1.5/2.x ControlNets (cldm.py `input_hint_block`: 16, 16, 32, 32, 96,
# 96, 256, each stride-2 conv halving the hint, three of them: 512 px -> 64 latent pixels).
HINT_WIDTHS = (16, 32, 96, 256)
HINT_CHANNELS = 3  # an RGB hint image
# The ControlNet's tensors inside lllyasviel's files (cldm.py's ControlLDM.control_model).
CONTROL_PREFIX = "control_model."
# A diffusers ControlNet folder's weight files, in order of preference.
FOLDER_WEIGHTS = tuple(f"diffusion_pytorch_model{infix}{ext}" for infix in ("", ".fp16") for ext in (".safetensors", ".bin"))
# The guess-mode law's range: residual 0 (conv_in's) × 10^GUESS_FROM, the middle's × 10^0.
GUESS_FROM = -1.0


@dataclass
class ControlNetConfig:
    unet: UNetConfig  # the encoder copy's sizes: those of the UNet it steers (in_channels may differ)
    hint_channels: int = HINT_CHANNELS
    hint_widths: tuple[int, ...] = HINT_WIDTHS
    global_pool: bool = False  # residuals averaged over space (the v1.1 "shuffle" ControlNet)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], unet: UNetConfig) -> ControlNetConfig:
        """The sizes read off the tensors (our names), checked against the UNet it is to steer: a
        ControlNet made for another model is an error in words."""
        try:
            levels = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("down_blocks."))
            layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("down_blocks.0.resnets."))
            widths = tuple(sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels))
            attention = tuple(any(k.startswith(f"down_blocks.{i}.attentions.") for k in sd) for i in range(levels))
            context = next((t.shape[1] for k, t in sd.items() if k.endswith("attn2.to_k.weight")), None)
            linear = any(k.endswith("proj_in.weight") and t.ndim == 2 for k, t in sd.items())
            in_channels = sd["conv_in.weight"].shape[1]
            hint_in = sd["controlnet_cond_embedding.conv_in.weight"]
            n_blocks = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("controlnet_cond_embedding.blocks."))
        except (KeyError, ValueError):
            raise ValueError("the tensors are not a ControlNet's (no down_blocks, conv_in or "
                             "controlnet_cond_embedding tensors)") from None
        hint_widths = (hint_in.shape[0],) + tuple(sd[f"controlnet_cond_embedding.blocks.{2 * j + 1}.weight"].shape[0]
                                                  for j in range(n_blocks // 2))
        theirs = {"level widths": widths, "ResNets per level": layers, "attending levels": attention,
                  "text width": context, "linear attention projections (SD 2.x's)": linear}
        ours = {"level widths": unet.channels, "ResNets per level": unet.layers_per_level,
                "attending levels": unet.attention_levels, "text width": unet.context_dim,
                "linear attention projections (SD 2.x's)": unet.linear_projection}
        differ = [f"{key} {theirs[key]} (the model's: {ours[key]})" for key in theirs if theirs[key] != ours[key]]
        if differ:
            raise ValueError("this ControlNet was made for another model: its " + ", ".join(differ)
                             + "; use a ControlNet trained for this model's family (SD 1.5 ControlNets for SD 1.x, "
                               "SD 2.x ones for 2.x)")
        return cls(replace(unet, in_channels=in_channels), hint_in.shape[1], hint_widths)


class HintEncoder(nn.Module):
    """The control image to a feature map at the latent's size, added to conv_in's output: a 3×3
    conv to the first width, then per width a 3×3 conv and a stride-2 3×3 conv to the next (SiLU
    after each), then a zero-initialised 3×3 conv to the UNet's first width."""

    def __init__(self, out_channels: int, in_channels: int = HINT_CHANNELS, widths: tuple[int, ...] = HINT_WIDTHS):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for c, c_next in zip(widths, widths[1:]):
            self.blocks.append(nn.Conv2d(c, c, 3, padding=1))
            self.blocks.append(nn.Conv2d(c, c_next, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def factor(self) -> int:
        """How many times smaller the output is than the hint (8 with SD's three stride-2 convs)."""
        return 2 ** (len(self.blocks) // 2)

    def forward(self, hint: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(hint))
        for block in self.blocks:
            h = F.silu(block(h))
        return self.conv_out(h)  # (B, C0, H / factor, W / factor)


def zero_conv(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def guess_mode_scales(n: int) -> torch.Tensor:
    """The guess-mode weights of the n residuals, the middle's last: 10^(GUESS_FROM·(1 − i/(n−1)))."""
    return torch.logspace(GUESS_FROM, 0, n)


class ControlNet(nn.Module):
    """The encoder copy with its hint encoder and zero convolutions; attribute names are diffusers'
    `ControlNetModel` keys (`controlnet_cond_embedding.*`, `controlnet_down_blocks.N`, `controlnet_mid_block`)."""

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        cfg = config.unet
        time_dim = cfg.time_embed_dim
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.channels[0], 3, padding=1)
        self.time_embedding = TimestepMLP(cfg.channels[0], time_dim)
        self.controlnet_cond_embedding = HintEncoder(cfg.channels[0], config.hint_channels, config.hint_widths)
        self.down_blocks, skip_channels = down_path(cfg)
        self.mid_block = MidBlock(cfg.channels[-1], time_dim, cfg)
        self.controlnet_down_blocks = nn.ModuleList([zero_conv(c) for c in skip_channels])
        self.controlnet_mid_block = zero_conv(cfg.channels[-1])

    @property
    def in_channels(self) -> int:
        return self.config.unet.in_channels

    @property
    def hint_factor(self) -> int:
        """The hint is this many times the latent's size (8 for SD: the VAE's factor)."""
        return self.controlnet_cond_embedding.factor

    def forward(self, x: torch.Tensor, t: torch.Tensor | float | int, context: torch.Tensor, hint: torch.Tensor,
                scale: float = 1.0, guess_mode: bool = False) -> ControlResiduals:
        """x: (B, in_channels, h, w) the noisy latent; hint: (B, 3, h·8, w·8) in [0, 1]. Returns the
        residuals for `UNet.forward(control=)`: one per skip, then the middle's, each × scale (× the
        guess-mode law's weight)."""
        B, _, h, w = x.shape
        factor = self.controlnet_cond_embedding.factor
        if hint.ndim != 4 or hint.shape[0] != B or hint.shape[1] != self.config.hint_channels:
            raise ValueError(f"controlnet: hint must be (B={B}, {self.config.hint_channels}, H, W), got {tuple(hint.shape)}")
        if hint.shape[-2:] != (h * factor, w * factor):
            raise ValueError(f"controlnet: the hint is {hint.shape[-1]}×{hint.shape[-2]} pixels; for a {w}×{h} latent it "
                             f"must be {w * factor}×{h * factor} (the hint encoder shrinks it {factor} times)")
        t_emb = embed_timesteps(self.time_embedding, t, x, self.config.unet.channels[0])
        h0 = self.conv_in(x) + self.controlnet_cond_embedding(hint)
        mid, skips = run_down_path(self.down_blocks, h0, t_emb, context)
        mid = self.mid_block(mid, t_emb, context)
        residuals = [zero(s) for zero, s in zip(self.controlnet_down_blocks, skips)] + [self.controlnet_mid_block(mid)]
        weights = guess_mode_scales(len(residuals)).tolist() if guess_mode else [1.0] * len(residuals)
        residuals = [r * (scale * weight) for r, weight in zip(residuals, weights)]
        if self.config.global_pool:
            residuals = [r.mean(dim=(2, 3), keepdim=True) for r in residuals]
        return residuals[:-1], residuals[-1]


# ---- the files --------------------------------------------------------------------------------------

def control_rules(unet: UNetConfig, hint_blocks: int) -> list[Rule]:
    """Our names <-> cldm.py's (without `control_model.`): the UNet's own rules for the encoder copy,
    `input_hint_block.N` (an nn.Sequential with SiLUs at the odd indices) for the hint encoder,
    `zero_convs.N.0` and `middle_block_out.0` for the zero convolutions."""
    encoder = [r for r in unet_rules(len(unet.channels), unet.layers_per_level, unet.attention_levels)
               if r.ours.startswith(("conv_in.", "time_embedding.", "down_blocks.", "mid_block."))]
    hint = [Rule("controlnet_cond_embedding.conv_in.", "input_hint_block.0."),
            Rule("controlnet_cond_embedding.conv_out.", f"input_hint_block.{2 * (hint_blocks + 1)}.")]
    hint += [Rule(f"controlnet_cond_embedding.blocks.{j}.", f"input_hint_block.{2 * (j + 1)}.") for j in range(hint_blocks)]
    skips = 1 + len(unet.channels) * unet.layers_per_level + len(unet.channels) - 1
    zeros = [Rule(f"controlnet_down_blocks.{i}.", f"zero_convs.{i}.0.") for i in range(skips)]
    return encoder + hint + zeros + [Rule("controlnet_mid_block.", "middle_block_out.0.")]


def _from_compvis(sd: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """cldm.py's names (prefix removed) -> ours, the shape read off the key names."""
    n_levels, layers, attention = original_unet_shape(sd)
    hint_blocks = len({k.split(".")[1] for k in sd if k.startswith("input_hint_block.")}) - 2
    shape = UNetConfig(channels=(0,) * n_levels, attention_levels=attention, layers_per_level=layers)
    rules = control_rules(shape, hint_blocks)
    unknown = []
    for key in sd:
        try:
            rename(key, rules, "ours")
        except KeyError:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} tensors belong to no part of a ControlNet, e.g. "
                              f"{', '.join(sorted(unknown)[:4])}")
    return convert(sd, rules, "ours")


def read_controlnet(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, list[str]]:
    """(tensors in our names, the diffusers config.json if any, notes) from any of the three layouts."""
    path = Path(path)
    notes: list[str] = []
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{path}: a ControlNet folder needs config.json (diffusers' ControlNetModel layout)")
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if config.get("_class_name", "ControlNetModel") != "ControlNetModel":
            raise CheckpointError(f"{path}: config.json is a {config['_class_name']}'s, not a ControlNetModel's")
        weights = next((path / name for name in FOLDER_WEIGHTS if (path / name).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{path}: no weight file (expected one of {', '.join(FOLDER_WEIGHTS)})")
        return read_checkpoint(weights).tensors, config, [f"layout: diffusers folder ({weights.name})"]
    tensors = read_checkpoint(path).tensors
    if "controlnet_cond_embedding.conv_in.weight" in tensors:  # diffusers' names in one file
        return tensors, {}, ["layout: diffusers names in one file"]
    prefixed = {k[len(CONTROL_PREFIX):]: t for k, t in tensors.items() if k.startswith(CONTROL_PREFIX)}
    if prefixed:
        others = len(tensors) - len(prefixed)
        notes.append(f"layout: cldm.py names under {CONTROL_PREFIX}" +
                     (f"; {others} tensors of the rest of the model ignored" if others else ""))
        return _from_compvis(prefixed, path), {}, notes
    if "input_hint_block.0.weight" in tensors:
        notes.append("layout: cldm.py names without a prefix")
        return _from_compvis(tensors, path), {}, notes
    raise CheckpointError(f"{path}: holds no ControlNet (no {CONTROL_PREFIX}*, input_hint_block.* or "
                          "controlnet_cond_embedding.* tensors); is it a model, LoRA or T2I-adapter file?")


def load_controlnet(path: str | Path, unet: UNetConfig, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> ControlNet:
    """A ControlNet from a file or folder, for the UNet whose config is `unet` (its head count and
    sizes; a ControlNet made for another model is an error). Every tensor must be there."""
    path = Path(path)
    sd, config, notes = read_controlnet(path)
    try:
        cfg = ControlNetConfig.from_state_dict(sd, unet)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    if config:
        order = config.get("controlnet_conditioning_channel_order", "rgb")
        if order != "rgb":
            raise CheckpointError(f"{path}: config.json asks for hint channels in {order!r} order; only 'rgb' is supported")
        cfg.global_pool = bool(config.get("global_pool_conditions", False))
    with torch.device("meta"):
        net = ControlNet(cfg)
    expected = net.state_dict()
    missing = [k for k in expected if k not in sd]
    extra = [k for k in sd if k not in expected]
    if missing or extra:
        raise CheckpointError(f"{path}: {len(missing)} ControlNet tensors missing (e.g. {', '.join(missing[:3]) or '-'}) "
                              f"and {len(extra)} unexpected (e.g. {', '.join(extra[:3]) or '-'})")
    for k, t in sd.items():
        if t.shape != expected[k].shape:
            raise CheckpointError(f"{path}: {k} has shape {tuple(t.shape)}, expected {tuple(expected[k].shape)}")
    net.load_state_dict({k: t.to(device, dtype) for k, t in sd.items()}, strict=True, assign=True)
    net.notes = notes
    return net.eval().requires_grad_(False)


LAYOUTS = ("compvis", "bare", "diffusers")


def controlnet_state_dict(net: ControlNet, layout: str = "compvis") -> dict[str, torch.Tensor]:
    """The ControlNet's tensors named as in lllyasviel's files ("compvis": under `control_model.`;
    "bare": without the prefix) or as in a diffusers folder ("diffusers": our own names)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    sd = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    if layout == "diffusers":
        return sd
    rules = control_rules(net.config.unet, len(net.controlnet_cond_embedding.blocks))
    prefix = CONTROL_PREFIX if layout == "compvis" else ""
    return {prefix + k: v for k, v in convert(sd, rules, "original").items()}


def save_controlnet(net: ControlNet, path: str | Path, layout: str = "compvis") -> None:
    """Write `net` as a `.safetensors` file (layout "compvis" or "bare") or, for "diffusers", a folder
    with config.json and diffusion_pytorch_model.safetensors."""
    path = Path(path)
    sd = controlnet_state_dict(net, layout)
    if layout != "diffusers":
        save_file(sd, str(path))
        return
    cfg = net.config.unet
    path.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "ControlNetModel", "in_channels": cfg.in_channels,
              "block_out_channels": list(cfg.channels), "layers_per_block": cfg.layers_per_level,
              "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels],
              "cross_attention_dim": cfg.context_dim,
              "attention_head_dim": list(cfg.heads) if isinstance(cfg.heads, tuple) else cfg.heads,
              "use_linear_projection": cfg.linear_projection, "upcast_attention": cfg.upcast_attention,
              "norm_num_groups": cfg.norm_groups, "conditioning_channels": net.config.hint_channels,
              "conditioning_embedding_out_channels": list(net.config.hint_widths),
              "global_pool_conditions": net.config.global_pool}
    (path / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    save_file(sd, str(path / "diffusion_pytorch_model.safetensors"))
