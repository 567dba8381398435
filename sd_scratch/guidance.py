"""The model function the denoising loop calls, `model(x, t, ᾱ_t)`, with the conditioning as layers
around the UNet call (the lesson of k-diffusion's `external.py` and its CFG denoiser).

The loop (`pipelines.denoise`) knows nothing of prompts, masks, guidance or what the UNet
predicts: it asks for ε at (x, t) and gives the step's ᾱ_t. What the UNet is conditioned on is
decided when the function is built, one layer a kind:

    out_of = UNetCall(unet)                                   (x, t, context) -> the UNet's output
          or Controlled(unet, controls, hints, timesteps)     the same, ControlNets' residuals added
    out_of = ConcatCondition(out_of, mask_and_masked_latent)  the 9-channel inpainting UNet
    guided = ClassifierFreeGuidance(out_of, cond, uncond, w)  (x, t) -> Prediction
          or Unguided(out_of, cond)                          cond, uncond: tensors, or a ContextSchedule
                                                             (prompt editing: the text changes by step)
    model  = AsEpsilon(guided, prediction_type)               (x, t, ᾱ_t) -> Prediction in ε
    model  = ClassifierGuidance(model, log_prob, s)           optional: a classifier's gradient added

Classifier-free guidance (`003`/`004 · CFG 值`, Ho & Salimans 2022): one UNet call on the batch
[x; x] with the contexts [uncond; cond], then out = out_uncond + w·(out_cond − out_uncond),
optionally rescaled towards out_cond's spread (Lin et al. 2023, §3.4, "guidance rescale").

ControlNet (`004 · 其它条件`, Zhang et al. 2023; `addons/controlnet.py`): each ControlNet reads
(x, t, context) and its hint image and gives residuals for the UNet's skips and middle; several
are summed. Each acts from `start` to `end` of the run (fractions of its steps, as diffusers'
control_guidance_start/end); in guess mode it sees only the conditional rows, and the
unconditional half (the first B rows of a guided batch, where every guidance layer here puts it)
gets no residuals.

Classifier guidance (`004 · 分类器指引`, Dhariwal & Nichol 2021, their eq. 14 and Algorithm 2):
a classifier of noisy latents gives log p(y | x_t); its gradient, scaled by s, is added to the
score, which in ε form reads ε̂ = ε − s·√(1−ᾱ_t)·∇_x log p(y | x_t). It needs no text at all.

v-prediction (SD 2.x 768-v; Salimans & Ho 2022): the UNet predicts v = √ᾱ ε − √(1−ᾱ) x₀ instead of
ε; `eps_from_v` turns it into ε̂ = √(1−ᾱ) x_t + √ᾱ v, so every sampler, img2img, inpainting and
the per-step callback (whose x̂₀ follows from ε̂) work unchanged. Guidance acts on the UNet's own
output, as in diffusers and the original code; for plain CFG, which is linear, the order does not
matter, for the rescale it does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .unet import ControlResiduals, UNet

PREDICTION_TYPES = ("epsilon", "v_prediction")
# (x, t, context) -> the UNet's output: what each inner layer takes and gives.
OutputFunction = Callable[[Tensor, Tensor, Tensor], Tensor]


def eps_from_v(x_t: Tensor, v: Tensor, alpha_bar_t: Tensor) -> Tensor:
    """ε̂ = √(1−ᾱ_t) x_t + √ᾱ_t v: the v-parameterisation (v = √ᾱ ε − √(1−ᾱ) x₀) solved for ε,
    with x_t = √ᾱ x₀ + √(1−ᾱ) ε. Then x̂₀ = √ᾱ x_t − √(1−ᾱ) v follows from ε̂ as for any ε-model."""
    return (1 - alpha_bar_t) ** 0.5 * x_t + alpha_bar_t**0.5 * v


@dataclass
class Prediction:
    """What the model function gives the loop at one step."""

    eps: Tensor  # the ε the sampler steps with (guided, if guidance is on)
    eps_cond: Tensor  # the UNet's ε given the prompt
    eps_uncond: Tensor | None  # ε given the negative prompt (None without guidance)
    x0: Tensor | None = None  # x̂₀ where the model gives its own (a v-model: finite even where ᾱ = 0)


class UNetCall:
    """The innermost layer: the UNet's output (ε or v, as the model was trained)."""

    def __init__(self, unet: UNet):
        self.unet = unet

    def __call__(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        return self.unet(x, t, context)


@dataclass
class Control:
    """One ControlNet steering a run (pass `control=` one or a list to txt2img, img2img, inpaint).

    net: a ControlNet (`StableDiffusion.load_controlnet`), called as
        net(x, t, context, hint, scale, guess_mode) -> residuals for `UNet.forward(control=)`;
    image: the hint (edges, depth, pose...): a PIL image, a path or a uint8 array, resized to the
        picture's size and read as RGB in [0, 1], as diffusers' ControlNet pipelines read it;
    scale: the residuals' weight (diffusers' controlnet_conditioning_scale);
    start, end: the part of the run it acts in, fractions of the steps run (0 and 1: all of them);
    guess_mode: only the conditional half sees the ControlNet, its residuals weighted from 0.1 at
        the first skip to 1 at the middle (`addons/controlnet.guess_mode_scales`)."""

    net: Callable[..., ControlResiduals]
    image: Any
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False

    def __post_init__(self):
        if not callable(self.net):
            raise ValueError(f"Control: net must be a ControlNet (sd.load_controlnet(path)), got {type(self.net).__name__}")
        check_control(self.scale, self.start, self.end)

    def steps_on(self, timesteps: Tensor) -> set[float]:
        """The timesteps (of the run's, in order) at which it acts: step k of N when
        start ≤ k/N and (k + 1)/N ≤ end, diffusers' rule."""
        n = len(timesteps)
        return {float(t) for k, t in enumerate(timesteps.tolist()) if self.start <= k / n and (k + 1) / n <= self.end}


def check_control(scale: float, start: float, end: float) -> None:
    """A Control's numbers: a finite scale, and 0 ≤ start < end ≤ 1."""
    if not isinstance(scale, (int, float)) or not abs(scale) < float("inf"):
        raise ValueError(f"Control: scale must be a finite number, got {scale!r}")
    if not (isinstance(start, (int, float)) and isinstance(end, (int, float)) and 0 <= start < end <= 1):
        raise ValueError(f"Control: start and end must satisfy 0 ≤ start < end ≤ 1, got {start!r} and {end!r}")


class Controlled:
    """The innermost layer with ControlNets: the UNet's output with every active ControlNet's
    residuals summed into its skips. `hints[i]`: (B, 3, H, W) in [0, 1] for the B images of the
    run; a batch of k·B rows (the guidance halves) gets it k times."""

    def __init__(self, unet: UNet, controls: list[Control], hints: list[Tensor], timesteps: Tensor):
        self.unet, self.controls, self.hints = unet, controls, hints
        self.active = [control.steps_on(timesteps) for control in controls]

    def __call__(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        total: ControlResiduals | None = None
        for control, hint, active in zip(self.controls, self.hints, self.active):
            if float(t) not in active:
                continue
            B = hint.shape[0]
            skip = B if control.guess_mode and x.shape[0] > B else 0  # guess mode: not the unconditional rows
            rows = x.shape[0] - skip
            down, mid = control.net(x[skip:, :control.net.in_channels], t, context[skip:],
                                    hint.repeat(rows // B, 1, 1, 1), control.scale, control.guess_mode)
            if skip:
                down = [torch.cat([r.new_zeros((skip, *r.shape[1:])), r]) for r in down]
                mid = torch.cat([mid.new_zeros((skip, *mid.shape[1:])), mid])
            total = (down, mid) if total is None else ([a + b for a, b in zip(total[0], down)], total[1] + mid)
        return self.unet(x, t, context, control=total)


class ConcatCondition:
    """Extra input channels appended to x before the UNet: for the 9-channel inpainting UNet the mask
    (1 channel) and the masked image's latent (4). `condition` is (B, c, h, w) for B images; a
    batch of k·B (the guidance halves) gets it k times."""

    def __init__(self, inner: OutputFunction, condition: Tensor):
        self.inner, self.condition = inner, condition

    def __call__(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        repeats = x.shape[0] // self.condition.shape[0]
        return self.inner(torch.cat([x, self.condition.repeat(repeats, 1, 1, 1)], dim=1), t, context)  # (B, 4 + c, h, w)


class ContextSchedule:
    """Text embeddings that change during sampling (prompt editing, `prompts.prompt_schedule`): the
    k-th of the run's timesteps is conditioned on `contexts[k]`."""

    def __init__(self, timesteps: Tensor, contexts: list[Tensor]):
        if len(timesteps) != len(contexts):
            raise ValueError(f"{len(contexts)} contexts for {len(timesteps)} timesteps")
        self.index: dict[float, int] = {}
        for k, t in enumerate(timesteps.tolist()):
            self.index.setdefault(float(t), k)  # a repeated timestep (PLMS's second) keeps its first
        self.contexts = contexts

    def at(self, t: Tensor) -> Tensor:
        return self.contexts[self.index[float(t)]]


Context = Tensor | ContextSchedule


def context_at(context: Context, t: Tensor) -> Tensor:
    return context.at(t) if isinstance(context, ContextSchedule) else context


class Unguided:
    """The output given the prompt alone (guidance scale ≤ 1)."""

    def __init__(self, inner: OutputFunction, cond: Context):
        self.inner, self.cond = inner, cond

    def __call__(self, x: Tensor, t: Tensor) -> Prediction:
        out = self.inner(x, t, context_at(self.cond, t))
        return Prediction(out, out, None)


def rescale_guidance(guided: Tensor, cond: Tensor, phi: float) -> Tensor:
    """Lin et al. 2023 eq. 15–16: scale the guided output to the conditional one's standard deviation
    (per image), then mix: φ·rescaled + (1 − φ)·guided. φ = 0 is plain CFG; the paper uses 0.7."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


class ClassifierFreeGuidance:
    """out = out_uncond + w·(out_cond − out_uncond), both from one UNet call on [x; x] with
    [uncond; cond]; with `rescale` φ > 0, then `rescale_guidance`."""

    def __init__(self, inner: OutputFunction, cond: Context, uncond: Context, scale: float, rescale: float = 0.0):
        self.inner, self.cond, self.uncond = inner, cond, uncond
        self.scale, self.rescale = scale, rescale

    def __call__(self, x: Tensor, t: Tensor) -> Prediction:
        context = torch.cat([context_at(self.uncond, t), context_at(self.cond, t)])  # (2B, T, C)
        out_uncond, out_cond = self.inner(torch.cat([x, x]), t, context).chunk(2)  # each (B, 4, h, w)
        guided = out_uncond + self.scale * (out_cond - out_uncond)
        if self.rescale:
            guided = rescale_guidance(guided, out_cond, self.rescale)
        return Prediction(guided, out_cond, out_uncond)


class ComposedGuidance:
    """Composable diffusion (Liu et al. 2022) as AUTOMATIC1111 combines it: prompts joined by AND,
    each with a weight, out = out_uncond + w · Σ_k weight_k · (out_k − out_uncond), all from one UNet
    call on [x; x; …]. `conds`: K contexts for the B images; `weights`: (K, B)."""

    def __init__(self, inner: OutputFunction, conds: list[Context], weights: Tensor, uncond: Context,
                 scale: float, rescale: float = 0.0):
        self.inner, self.conds, self.weights, self.uncond = inner, conds, weights, uncond
        self.scale, self.rescale = scale, rescale

    def __call__(self, x: Tensor, t: Tensor) -> Prediction:
        contexts = [context_at(self.uncond, t), *(context_at(c, t) for c in self.conds)]
        outs = self.inner(torch.cat([x] * len(contexts)), t, torch.cat(contexts)).chunk(len(contexts))
        out_uncond = outs[0]
        pull = sum(w.to(x)[:, None, None, None] * (out - out_uncond) for w, out in zip(self.weights, outs[1:]))
        guided, cond = out_uncond + self.scale * pull, out_uncond + pull
        if self.rescale:
            guided = rescale_guidance(guided, cond, self.rescale)
        return Prediction(guided, cond, out_uncond)


class AsEpsilon:
    """The outermost layer: the prediction in ε, whatever the UNet predicts (v converted at the step's ᾱ)."""

    def __init__(self, inner: Callable[[Tensor, Tensor], Prediction], prediction_type: str = "epsilon"):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.inner, self.v = inner, prediction_type == "v_prediction"

    def __call__(self, x: Tensor, t: Tensor, alpha_bar_t: Tensor) -> Prediction:
        p = self.inner(x, t)
        if not self.v:
            return p
        uncond = None if p.eps_uncond is None else eps_from_v(x, p.eps_uncond, alpha_bar_t)
        x0 = alpha_bar_t**0.5 * x - (1 - alpha_bar_t) ** 0.5 * p.eps  # x̂₀ = √ᾱ x_t − √(1−ᾱ) v
        return Prediction(eps_from_v(x, p.eps, alpha_bar_t), eps_from_v(x, p.eps_cond, alpha_bar_t), uncond, x0)


class ClassifierGuidance:
    """ε̂ = ε − scale·√(1−ᾱ_t)·∇_x log p(y | x_t, t) (Dhariwal & Nichol 2021, eq. 14): the prediction
    of `inner` pushed towards where `log_prob(x_t, t) -> (B,)` is higher. x̂₀ is dropped, so the
    sampler derives it from the guided ε."""

    def __init__(self, inner: Callable[[Tensor, Tensor, Tensor], Prediction],
                 log_prob: Callable[[Tensor, Tensor], Tensor], scale: float):
        self.inner, self.log_prob, self.scale = inner, log_prob, scale

    def __call__(self, x: Tensor, t: Tensor, alpha_bar_t: Tensor) -> Prediction:
        p = self.inner(x, t, alpha_bar_t)
        with torch.enable_grad():
            x_in = x.detach().float().requires_grad_(True)
            (gradient,) = torch.autograd.grad(self.log_prob(x_in, t.reshape(1)).sum(), x_in)  # (B, 4, h, w)
        eps = p.eps - self.scale * (1 - alpha_bar_t) ** 0.5 * gradient.to(p.eps.dtype)
        return Prediction(eps, p.eps_cond, p.eps_uncond)
