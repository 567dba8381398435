"""Hypernetworks (AUTOMATIC1111's): small MLPs that rewrite the context attention's keys and values read.

Mirrors the aside on hypernetworks in `004 · 交叉关注(Cross-attention)`: the prompt reaches the image
only through the keys and values of cross-attention, so a style can be put in by changing what they
see, every weight of the model left as it is. A file holds, per context width w, two residual MLPs,
one for the keys and one for the values:

    c_k = c + m · mlp_k(c),   k = to_k(c_k)
    c_v = c + m · mlp_v(c),   v = to_v(c_v)

m is the user's multiplier (A1111's "strength"). As in A1111 the pair is picked by the context's
width, so it changes every attention whose to_k reads w-wide input: the cross-attention (768 wide
in SD v1, 1024 in SD 2.x), and the self-attention at 320, 640 and 1280 where the file has those
widths too (NovelAI's original files do). Several files apply one after another, each to the c_k
and c_v the previous one made.

The MLP, for `layer_structure` [1, r_1, ..., 1] (widths as multiples of w), is a sequence of steps
i = 0, 1, ...: a Linear from w·r_i to w·r_(i+1); the activation (`activation_func`; after the last
Linear only with `activate_output`); a LayerNorm (`is_layer_norm`); a dropout (training only: nothing
here, but it holds a place in the sequence).

A file is a `torch.save` of {w: (keys' state dict, values' state dict), ..., "layer_structure",
"activation_func", "is_layer_norm", "activate_output", "use_dropout", "last_layer_dropout",
"dropout_structure", "name", "step", ...}. The state dicts' keys `linear.<n>.weight`/`.bias` number
every entry of the sequence, activations, norms and dropouts too, so the metadata says which n is
which; it is checked against the keys. Missing metadata takes A1111's defaults; the oldest files
(NovelAI's) have none and name their two Linears `linear1`/`linear2`.

The MLPs run in float32 (A1111 casts the context likewise) and sit outside the UNet's modules:
each `Attention.kv_context` holds a plain callable, so the UNet's state dict, LoRA's module names and
saving are untouched, and `unload_hypernetwork` gives the model's own outputs back exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..checkpoints.files import CheckpointError, read_object
from ..unet import Attention, UNet

if TYPE_CHECKING:
    from ..stable_diffusion import StableDiffusion

# A1111's names for the activations it offers ("swish" is its name for the hard swish, x·relu6(x+3)/6,
# not SiLU). Not read: threshold (needs arguments), glu (halves the width), softmax, softmin,
# logsoftmax, softmax2d (built without a dim, they normalise across the batch).
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU, "swish": nn.Hardswish, "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid, "hardswish": nn.Hardswish, "mish": nn.Mish, "silu": nn.SiLU, "gelu": nn.GELU,
    "celu": nn.CELU, "selu": nn.SELU, "relu6": nn.ReLU6, "rrelu": nn.RReLU, "prelu": nn.PReLU,
    "hardtanh": nn.Hardtanh, "hardsigmoid": nn.Hardsigmoid, "hardshrink": nn.Hardshrink,
    "softshrink": nn.Softshrink, "softplus": nn.Softplus, "softsign": nn.Softsign, "tanhshrink": nn.Tanhshrink,
    "logsigmoid": nn.LogSigmoid,
}
NO_ACTIVATION = (None, "linear")
DROPOUT_RATE = 0.3  # A1111's, where a file says use_dropout but gives no dropout_structure
OLD_NAMES = (("linear1.", "linear.0."), ("linear2.", "linear.1."))  # NovelAI's [1, 2, 1] files
PREFIX = "linear."  # A1111 keeps the sequence in an attribute `linear`


@dataclass(frozen=True)
class Settings:
    """The metadata that shapes the MLP."""

    layer_structure: tuple[float, ...]
    activation: str | None
    layer_norm: bool
    activate_output: bool
    # one rate per entry of layer_structure: a dropout after step i where dropout_structure[i + 1] > 0
    dropout_structure: tuple[float, ...]


def settings_of(obj: dict, path: str | Path) -> Settings:
    """A file's Settings, A1111's defaults where it has none, each checked: one that cannot be used is
    an error naming the file and what was expected."""
    structure = obj.get("layer_structure", [1, 2, 1])
    if (not isinstance(structure, (list, tuple)) or len(structure) < 2 or structure[0] != 1 or structure[-1] != 1
            or not all(isinstance(r, (int, float)) and r > 0 for r in structure)):
        raise CheckpointError(f"{path}: layer_structure is {structure!r}; expected a list of positive width "
                              "multiples that starts and ends with 1, such as [1, 2, 1]")
    activation = obj.get("activation_func")
    if activation not in NO_ACTIVATION and not (isinstance(activation, str) and activation in ACTIVATIONS):
        raise CheckpointError(f"{path}: activation_func {activation!r} is not one read here; expected one of "
                              f"linear, {', '.join(ACTIVATIONS)}")
    dropout = obj.get("dropout_structure")
    if dropout is None:  # A1111, with use_dropout: after each step but the last two; the second-last
        steps = len(structure) - 1  # only with last_layer_dropout
        use, last = bool(obj.get("use_dropout")), bool(obj.get("last_layer_dropout"))
        on = [use and (i < steps - 2 or (i == steps - 2 and last)) for i in range(steps)]
        dropout = [0.0] + [DROPOUT_RATE if d else 0.0 for d in on]
    if (not isinstance(dropout, (list, tuple)) or len(dropout) != len(structure)
            or not all(isinstance(r, (int, float)) for r in dropout)):
        raise CheckpointError(f"{path}: dropout_structure is {dropout!r}; expected one rate per entry of "
                              f"layer_structure {list(structure)}")
    return Settings(tuple(structure), activation, bool(obj.get("is_layer_norm", False)),
                    bool(obj.get("activate_output", True)), tuple(dropout))


def mlp(width: int, s: Settings) -> nn.Sequential:
    """The MLP for w = `width` as A1111 lays out its sequence, so the file's `linear.<n>` are its keys."""
    layers: list[nn.Module] = []
    steps = len(s.layer_structure) - 1
    for i in range(steps):
        w_in, w_out = (int(width * r) for r in s.layer_structure[i : i + 2])
        layers.append(nn.Linear(w_in, w_out))
        if s.activation not in NO_ACTIVATION and (i < steps - 1 or s.activate_output):
            layers.append(ACTIVATIONS[s.activation]())
        if s.layer_norm:
            layers.append(nn.LayerNorm(w_out))
        if s.dropout_structure[i + 1] > 0:
            layers.append(nn.Identity())  # the dropout's place; it drops nothing outside training
    return nn.Sequential(*layers)


def _mlp_from(path: str | Path, width: int, which: str, state: object, s: Settings) -> nn.Sequential:
    """The file's `which` ("keys" or "values") MLP at `width`, its tensors in float32, checked against
    the layout the settings give."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: the {width}-wide {which} module is a {type(state).__name__}, not a state dict")
    tensors = {}
    for key, tensor in state.items():
        for old, new in OLD_NAMES:
            key = new + key[len(old):] if key.startswith(old) else key
        tensors[key.removeprefix(PREFIX)] = tensor
    with torch.device("meta"):
        module = mlp(width, s)
    want = {k: tuple(t.shape) for k, t in module.state_dict().items()}
    got = {k: tuple(t.shape) if isinstance(t, torch.Tensor) else None for k, t in tensors.items()}
    if got != want:
        wrong = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got[k])
        described = ", ".join(f"{PREFIX}{k} {got.get(k)} (expected {want.get(k)})" for k in wrong[:3])
        raise CheckpointError(f"{path}: the {width}-wide {which} module does not have the layout its settings give "
                              f"(layer_structure {list(s.layer_structure)}, activation_func {s.activation!r}, "
                              f"is_layer_norm {s.layer_norm}, activate_output {s.activate_output}, dropout_structure "
                              f"{list(s.dropout_structure)}): {described}")
    module.load_state_dict({k: t.float() for k, t in tensors.items()}, assign=True)
    return module.eval().requires_grad_(False)


def read_hypernetwork(path: str | Path) -> dict[int, tuple[nn.Sequential, nn.Sequential]]:
    """{context width: (keys' MLP, values' MLP)} from an A1111 hypernetwork file, read safely."""
    obj = read_object(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a hypernetwork's dict")
    per_width = {k: v for k, v in obj.items() if type(k) is int}
    if not per_width:
        raise CheckpointError(f"{path}: has no module per context width (integer keys such as 768); keys are "
                              f"{', '.join(map(repr, list(obj)[:5]))}. Is it a hypernetwork?")
    s = settings_of(obj, path)
    pairs = {}
    for width, pair in per_width.items():
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise CheckpointError(f"{path}: the modules for width {width} are not a (keys, values) pair")
        pairs[width] = (_mlp_from(path, width, "keys", pair[0], s), _mlp_from(path, width, "values", pair[1], s))
    return pairs


@dataclass
class Hypernetworks:
    """What every attention of the UNet calls on its context (`Attention.kv_context`): the loaded files'
    MLP pairs in load order, each picked by the context's width. A plain object, not an nn.Module,
    so its MLPs stay out of the UNet's state dict."""

    loaded: list[tuple[str, float, dict[int, tuple[nn.Sequential, nn.Sequential]]]] = field(default_factory=list)

    def __call__(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c_k = c_v = context.float()
        for _, m, pairs in self.loaded:
            if context.shape[-1] in pairs:
                mlp_k, mlp_v = (module.to(context.device) for module in pairs[context.shape[-1]])
                c_k = c_k + m * mlp_k(c_k)
                c_v = c_v + m * mlp_v(c_v)
        return c_k.to(context.dtype), c_v.to(context.dtype)


def attentions(unet: UNet) -> list[Attention]:
    return [module for module in unet.modules() if isinstance(module, Attention)]


def load_hypernetwork(sd: StableDiffusion, path: str | Path, multiplier: float = 1.0) -> list[int]:
    """Apply the hypernetwork at `path` to `sd`'s attentions, × `multiplier`, after any already
    applied. A width no attention reads is an error. Returns the file's widths."""
    pairs = read_hypernetwork(path)
    layers = attentions(sd.unet)
    widths = sorted({a.to_k.in_features for a in layers})
    unread = sorted(set(pairs) - set(widths))
    if unread:
        raise CheckpointError(f"{path}: has modules for context widths {unread}, which no attention of this model "
                              f"reads (its widths are {widths}: cross-attention {sd.unet.config.context_dim}, "
                              "self-attention the levels' channels); is it for another model family?")
    current = layers[0].kv_context
    hypernetworks = current if isinstance(current, Hypernetworks) else Hypernetworks()
    hypernetworks.loaded.append((str(path), float(multiplier), pairs))
    for attention in layers:
        attention.kv_context = hypernetworks
    return sorted(pairs)


def unload_hypernetwork(sd: StableDiffusion) -> None:
    """Take every hypernetwork off: each attention's keys and values read the context itself again."""
    for attention in attentions(sd.unet):
        attention.kv_context = None
