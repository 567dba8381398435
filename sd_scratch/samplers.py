"""Samplers: from pure noise back to a clean latent, one UNet call per timestep.

Mirrors `003 · 反向去噪（核心循环）`: start from noise z_T, ask the UNet for ε at each timestep, and
take a step towards z_0. The forward process of `003 · 前向扩散过程`, in closed form, is written in
one of two ways here:

    alpha form   x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε         ddpm, ddim, pndm (and dpmpp_2m, see there)
    sigma form   x   = x0 + σ ε,  σ = √((1−ᾱ_t)/ᾱ_t)    euler, euler_a (Karras et al. 2022)

The sigma form's x is the alpha form's x_t / √ᾱ_t, and 1/√(σ²+1) = √ᾱ_t: that is why the UNet,
trained on the alpha form, is fed `scale_model_input(x, i)` = x / √(σ²+1).

Every sampler's `timesteps` and `sigmas` (chosen by `noise_schedule.schedule_for`) and steps equal
those of diffusers' scheduler with SD v1.5's scheduler config (the tests check it), so both give the
same image from the same noise. With conventions="a1111", Euler, Euler a and DPM++ 2M take the σ's
and the start that AUTOMATIC1111 gives k-diffusion's samplers instead (`noise_schedule.a1111_schedule`),
with the same step functions. The loop:

    x = noise * sampler.init_noise_sigma
    for i, t in enumerate(sampler.timesteps):
        eps = unet(sampler.scale_model_input(x, i), t, text)
        x = sampler.step(eps, i, x, generator).prev_sample

img2img starts part-way down the list, as diffusers' pipeline does: i0 = (steps − int(steps·strength))
· order (at least 0), `sampler.start_at(i0)`, x = `sampler.add_noise(x0, noise, i0)` (no
init_noise_sigma), then the same loop over i = i0, i0+1, …
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .noise_schedule import (SPACINGS, TRAIN_STEPS, RandomSource, Schedule, a1111_schedule, add_noise, randn_like,
                             schedule_for)

SAMPLERS = ("ddpm", "ddim", "pndm", "euler", "euler_a", "dpmpp_2m")
ALIASES = {"plms": "pndm"}  # the original SD scripts call PNDM's multistep half "plms"
SIGMA_SAMPLERS = ("euler", "euler_a", "dpmpp_2m")
# Whose timesteps, σ's, start and seeds: diffusers' schedulers', or AUTOMATIC1111's (k-diffusion's σ's,
# x = ε σ_max, one seed per image), for the samplers that step in σ.
CONVENTIONS = ("diffusers", "a1111")
# Our samplers under the names AUTOMATIC1111's menu and PNG info give them (`modules/sd_samplers_kdiffusion.py`,
# `sd_samplers_timesteps.py`); it has no DDPM, named here in its style. A sampler that steps in σ may
# add " Karras" ("DPM++ 2M Karras": A1111 before 1.9 listed such names; since, "Schedule type: Karras").
A1111_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "pndm": "PLMS", "euler": "Euler", "euler_a": "Euler a",
               "dpmpp_2m": "DPM++ 2M"}
KARRAS_SUFFIX = " Karras"
# Every name `parse_sampler_name` takes.
SAMPLER_NAMES = (*SAMPLERS, *ALIASES, *A1111_NAMES.values(), *(A1111_NAMES[n] + KARRAS_SUFFIX for n in SIGMA_SAMPLERS))
# Each sampler's timestep spacing when none is asked for: what diffusers' scheduler class takes from
# SD v1.5's official scheduler_config.json, which names no spacing, so each class keeps its own
# default ("leading" with steps_offset 1 for DDPM, DDIM and PNDM; "linspace" for the others).
DEFAULT_SPACING = {"ddpm": "leading", "ddim": "leading", "pndm": "leading",
                   "euler": "linspace", "euler_a": "linspace", "dpmpp_2m": "linspace"}


def parse_sampler_name(name: str) -> tuple[str, bool]:
    """(our sampler, karras) for our name, an alias or an AUTOMATIC1111 name: "plms" -> ("pndm", False),
    "DPM++ 2M Karras" -> ("dpmpp_2m", True); a clear error listing the known names for anything else."""
    if name not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLER_NAMES)}")
    if name in SAMPLERS:
        return name, False
    if name in ALIASES:
        return ALIASES[name], False
    a1111_name = name.removesuffix(KARRAS_SUFFIX)
    return {a1111: ours for ours, a1111 in A1111_NAMES.items()}[a1111_name], a1111_name != name


@dataclass
class StepResult:
    prev_sample: Tensor  # x at the next entry of `timesteps`
    x0_pred: Tensor  # x̂₀, the clean latent that this step's ε implies


class Sampler:
    """A list of timesteps and the rule that moves x from one entry to the next (see the module doc)."""

    order = 1  # diffusers' `order` (1 for all six), used to slice the list for img2img

    def __init__(self, schedule: Schedule):
        self.alpha_bar, self.timesteps, self.sigmas = schedule.alpha_bar, schedule.timesteps, schedule.sigmas
        self.init_noise_sigma = schedule.init_noise_sigma
        self.begin = 0

    def start_at(self, i: int) -> None:
        """Make index i the first step (img2img): multistep samplers warm up again from there."""
        self.begin = i

    def scale_model_input(self, x: Tensor, i: int) -> Tensor:
        return x

    def alpha_bar_at(self, i: int) -> Tensor:
        """ᾱ of the noise level at index i: what turns a v-model's output into ε (guidance.py). For
        the samplers that step in σ, from the σ they step with (σ² = (1−ᾱ)/ᾱ; t may be fractional)."""
        if self.sigmas is not None:
            return 1 / (self.sigmas[i] ** 2 + 1)
        return self.alpha_bar[self.timesteps[i]]

    def add_noise(self, x0: Tensor, noise: Tensor, i: int) -> Tensor:
        """x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε at t = timesteps[i] (`003 · 前向扩散过程`, in closed form)."""
        return add_noise(x0, noise, self.alpha_bar.to(x0)[self.timesteps[i]])

    def step(self, eps: Tensor, i: int, x: Tensor, generator: RandomSource = None,
             x0: Tensor | None = None) -> StepResult:
        """Move x from timesteps[i] to the next entry, given the model's ε at x. `x0`: the model's x̂₀
        when it has its own (a v-model's, finite even where ᾱ = 0 and x̂₀ from ε is not); without
        it x̂₀ follows from ε. PLMS steps with ε alone."""
        raise NotImplementedError


def x0_from_eps(x: Tensor, eps: Tensor, alpha_bar_t: Tensor) -> Tensor:
    """x̂₀ = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t: the forward process solved for x0."""
    return (x - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t**0.5


class DDPM(Sampler):
    def step(self, eps, i, x, generator=None, x0=None):
        """Ancestral sampling: DDPM (Ho et al. 2020) eq. 6-7, Algorithm 2, over a strided list.

        For the jump t → t' (the next entry; ᾱ_t' = 1 after the last), α_t = ᾱ_t/ᾱ_t', β_t = 1 − α_t:
            x_t' = √ᾱ_t' β_t/(1−ᾱ_t) x̂₀ + √α_t (1−ᾱ_t')/(1−ᾱ_t) x_t + σ_t ε',   σ_t² = (1−ᾱ_t')/(1−ᾱ_t) β_t
        With x̂₀ substituted this is `003 · 反向去噪（核心循环）`'s x_t' = (x_t − β_t/√(1−ᾱ_t) ε)/√α_t + σ_t ε',
        ε' omitted at t = 0. (SD's last t is 1: σ_t = 0 there, but ε' is drawn, as diffusers draws it.)
        """
        t = int(self.timesteps[i])
        alpha_bar_t = self.alpha_bar[t]
        is_last = i + 1 == len(self.timesteps)
        alpha_bar_prev = torch.tensor(1.0) if is_last else self.alpha_bar[self.timesteps[i + 1]]
        alpha_t = alpha_bar_t / alpha_bar_prev
        beta_t = 1 - alpha_t
        x0_pred = x0_from_eps(x, eps, alpha_bar_t) if x0 is None else x0
        x_prev = (alpha_bar_prev**0.5 * beta_t / (1 - alpha_bar_t)) * x0_pred + (
            alpha_t**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar_t)) * x
        if t > 0:
            sigma_t = ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t) ** 0.5
            x_prev = x_prev + sigma_t * randn_like(x, generator)
        return StepResult(x_prev, x0_pred)


class _StridedSampler(Sampler):
    """DDIM and PNDM go from t to t' = t − 1000 // steps whatever the spacing (as diffusers), and
    past t = 0 to ᾱ_0, not to 1 (SD v1's set_alpha_to_one=False)."""

    def __init__(self, schedule: Schedule, steps: int):
        super().__init__(schedule)
        self.stride = TRAIN_STEPS // steps

    def alpha_bars(self, t: int, t_prev: int) -> tuple[Tensor, Tensor]:
        return self.alpha_bar[t], self.alpha_bar[max(t_prev, 0)]


class DDIM(_StridedSampler):
    def __init__(self, schedule: Schedule, steps: int, eta: float):
        super().__init__(schedule, steps)
        self.eta = eta

    def step(self, eps, i, x, generator=None, x0=None):
        """DDIM (Song et al. 2021) eq. 12, σ_t(η) of eq. 16 (η = 0: deterministic; η = 1: DDPM-like).

            x_t' = √ᾱ_t' x̂₀ + √(1 − ᾱ_t' − σ_t²) ε + σ_t ε',  σ_t = η √((1−ᾱ_t')/(1−ᾱ_t) · (1 − ᾱ_t/ᾱ_t'))
        """
        t = int(self.timesteps[i])
        alpha_bar_t, alpha_bar_prev = self.alpha_bars(t, t - self.stride)
        x0_pred = x0_from_eps(x, eps, alpha_bar_t) if x0 is None else x0
        variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
        sigma_t = self.eta * variance**0.5
        x_prev = alpha_bar_prev**0.5 * x0_pred + (1 - alpha_bar_prev - sigma_t**2) ** 0.5 * eps
        if self.eta > 0:
            x_prev = x_prev + sigma_t * randn_like(x, generator)
        return StepResult(x_prev, x0_pred)


def adams_bashforth(eps_history: list[Tensor]) -> Tensor:
    """ε' from the last 1-4 ε's (newest last), Adams–Bashforth weights: PNDM eq. 12 once there are 4."""
    e = eps_history
    if len(e) == 1:
        return e[-1]
    if len(e) == 2:
        return (3 * e[-1] - e[-2]) / 2
    if len(e) == 3:
        return (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
    return (1 / 24) * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4])


class PNDM(_StridedSampler):
    def __init__(self, schedule: Schedule, steps: int):
        super().__init__(schedule, steps)
        self.eps_history: list[Tensor] = []  # the last ε's, newest last (Adams–Bashforth's inputs)
        self.x_first: Tensor | None = None  # x before the first step, which is taken twice

    def step(self, eps, i, x, generator=None, x0=None):
        """PLMS, the linear multistep half of PNDM (Liu et al. 2022): eq. 12's ε', then eq. 9's transfer

            x_t' = √(ᾱ_t'/ᾱ_t) x_t − (ᾱ_t' − ᾱ_t) ε' / (ᾱ_t √(1−ᾱ_t') + √(ᾱ_t (1−ᾱ_t) ᾱ_t'))
        (the DDIM η=0 step, rearranged). The first step costs two UNet calls, hence its repeated timestep:
        an Euler step to t', then the same step again with the mean of both ε's (pseudo improved Euler).
        """
        t, k = int(self.timesteps[i]), i - self.begin  # k: steps since the start
        if k == 1:  # the first step again, from the same x and t, with the mean slope
            t, t_prev, x = t + self.stride, t, self.x_first
            eps_prime = (eps + self.eps_history[-1]) / 2
        else:
            if k == 0:
                self.eps_history, self.x_first = [], x
            self.eps_history = self.eps_history[-3:] + [eps]
            t_prev, eps_prime = t - self.stride, adams_bashforth(self.eps_history)
        alpha_bar_t, alpha_bar_prev = self.alpha_bars(t, t_prev)
        denominator = alpha_bar_t * (1 - alpha_bar_prev) ** 0.5 + (
            alpha_bar_t * (1 - alpha_bar_t) * alpha_bar_prev) ** 0.5
        x_prev = ((alpha_bar_prev / alpha_bar_t) ** 0.5 * x
                  - (alpha_bar_prev - alpha_bar_t) * eps_prime / denominator)
        return StepResult(x_prev, x0_from_eps(x, eps_prime, alpha_bar_t))


class _SigmaSampler(Sampler):
    """Steps in the sigma form x = x0 + σ ε; `sigmas` ends with 0, the clean latent."""

    def scale_model_input(self, x, i):
        return x / ((self.sigmas[i] ** 2 + 1) ** 0.5)

    def add_noise(self, x0, noise, i):
        """x = x0 + σ_i ε."""
        return x0 + noise * self.sigmas.to(x0)[i]


class Euler(_SigmaSampler):
    def step(self, eps, i, x, generator=None, x0=None):
        """Euler's method on dx/dσ = (x − x̂₀)/σ: Karras et al. 2022 Algorithm 2 without churn (γ = 0)."""
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x0_pred = x - sigma * eps if x0 is None else x0
        d = (x - x0_pred) / sigma
        return StepResult(x + d * (sigma_next - sigma), x0_pred)


class EulerAncestral(_SigmaSampler):
    def step(self, eps, i, x, generator=None, x0=None):
        """k-diffusion's sample_euler_ancestral (η = 1): an Euler step down to σ_down, then fresh noise
        of std σ_up, where σ_up² = σ_next² (σ² − σ_next²)/σ² and σ_down² + σ_up² = σ_next²."""
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x0_pred = x - sigma * eps if x0 is None else x0
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        d = (x - x0_pred) / sigma
        x_next = x + d * (sigma_down - sigma)
        return StepResult(x_next + randn_like(x, generator) * sigma_up, x0_pred)


def alpha_sigma_lambda(sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """At noise level σ, the alpha form's α = √ᾱ = 1/√(σ²+1), σ_t = √(1−ᾱ) = σα, and λ = log(α/σ_t)."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    sigma_t = sigma * alpha
    return alpha, sigma_t, torch.log(alpha) - torch.log(sigma_t)


class DPMSolverPP2M(Sampler):
    """DPM-Solver++(2M) on diffusers' terms: a list of σ's, but x in the alpha form, so
    init_noise_sigma is 1, the UNet's input is x itself and add_noise is √ᾱ x0 + √(1−ᾱ) ε."""

    def __init__(self, schedule: Schedule):
        super().__init__(schedule)
        self.x0_prev: Tensor | None = None  # the previous step's x̂₀, for the second-order term

    def add_noise(self, x0, noise, i):
        alpha, sigma_t, _ = alpha_sigma_lambda(self.sigmas.to(x0)[i])
        return alpha * x0 + sigma_t * noise

    def step(self, eps, i, x, generator=None, x0=None):
        """DPM-Solver++(2M), Lu et al. 2022 Algorithm 2: from level s = sigmas[i] to t = sigmas[i+1],

            h = λ_t − λ_s,  x_t = (σ_t/σ_s) x − α_t (e^{−h} − 1) (x̂₀ + (x̂₀ − x̂₀_prev)/(2r)),  r = h_prev/h
        first order (no x̂₀_prev term) on the first step since the start and on the last step.
        """
        alpha_s, sigma_s, lambda_s = alpha_sigma_lambda(self.sigmas[i])
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(self.sigmas[i + 1])
        x0_pred = (x - sigma_s * eps) / alpha_s if x0 is None else x0
        h = lambda_t - lambda_s
        x_next = (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0_pred
        if self.begin < i < len(self.timesteps) - 1:
            r = (lambda_s - alpha_sigma_lambda(self.sigmas[i - 1])[2]) / h
            x_next = x_next - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * ((1 / r) * (x0_pred - self.x0_prev))
        self.x0_prev = x0_pred
        return StepResult(x_next, x0_pred)


def make_sampler(name: str, steps: int, *, schedule: str = "scaled_linear", spacing: str | None = None,
                 karras: bool = False, eta: float = 0.0, zero_terminal_snr: bool = False,
                 conventions: str = "diffusers") -> Sampler:
    """The sampler `name` (ours, an alias or A1111's) over `steps` steps, its schedule equal to
    diffusers' for SD v1.5's config.

    spacing: "leading", "trailing" or "linspace"; None takes the sampler's DEFAULT_SPACING.
    karras: σ's spaced by Karras et al. 2022 eq. 5 (sigma samplers only; a name ending in " Karras"
        says so too). eta: DDIM's η.
    zero_terminal_snr: the schedule rescaled so that t = 999 is pure noise (Lin et al. 2023), for
        v-models trained that way; use it with spacing="trailing", which visits t = 999.
    conventions: "a1111": the σ's and the start of AUTOMATIC1111 (`noise_schedule.a1111_schedule`),
        for Euler, Euler a and DPM++ 2M; the spacing is then k-diffusion's, not chosen.
    """
    name, named_karras = parse_sampler_name(name)
    karras = karras or named_karras
    if not isinstance(steps, int) or not 1 <= steps <= TRAIN_STEPS:
        raise ValueError(f"steps must be an integer between 1 and {TRAIN_STEPS}, got {steps!r}")
    if conventions not in CONVENTIONS:
        raise ValueError(f"unknown conventions {conventions!r}; known: {', '.join(CONVENTIONS)}")
    if conventions == "a1111":
        if name not in SIGMA_SAMPLERS:
            raise ValueError(f"conventions='a1111' are k-diffusion's σ's, for "
                             f"{', '.join(A1111_NAMES[n] for n in SIGMA_SAMPLERS)}; {A1111_NAMES[name]} runs with "
                             "conventions='diffusers' only")
        if spacing is not None:
            raise ValueError(f"spacing={spacing!r} chooses diffusers' timesteps; conventions='a1111' take "
                             "k-diffusion's (leave spacing None)")
        if zero_terminal_snr:
            raise ValueError("zero_terminal_snr is not supported with conventions='a1111'")
    spacing = DEFAULT_SPACING[name] if spacing is None else spacing
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; known: {', '.join(SPACINGS)}")
    if karras and name not in SIGMA_SAMPLERS:
        raise ValueError(f"karras=True spaces σ's: it needs one of {', '.join(SIGMA_SAMPLERS)}, not {name}")
    if eta and name != "ddim":
        raise ValueError(f"eta is DDIM's; {name} has none")

    if conventions == "a1111":
        plan = a1111_schedule(name, steps, karras, schedule)
    else:
        plan = schedule_for(name, steps, spacing, karras, schedule, zero_terminal_snr)
    if name == "ddpm":
        return DDPM(plan)
    if name == "ddim":
        return DDIM(plan, steps, eta)
    if name == "pndm":
        return PNDM(plan, steps)
    return {"euler": Euler, "euler_a": EulerAncestral, "dpmpp_2m": DPMSolverPP2M}[name](plan)
