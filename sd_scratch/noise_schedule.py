"""The noise schedule and the forward process: how much noise each timestep holds, and which
timesteps a sampler visits.

Mirrors `003 · 噪声调度（Noise Schedule）` and `003 · 前向扩散过程`: training adds noise in 1000
small steps of variance β_t; with ᾱ_t = ∏(1 − β_s) the noisy latent at step t is, in closed form,

    x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε,   ε ~ N(0, I)                 (`add_noise`)

Samplers visit a few of the 1000 timesteps (`spaced_timesteps`), or a list of noise levels
σ = √((1−ᾱ_t)/ᾱ_t) (`karras_sigmas`); `schedule_for` picks them for one sampler as diffusers does,
`a1111_schedule` as AUTOMATIC1111 does (k-diffusion's σ's). Every random draw of the package is
`draw_noise`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# SD v1's training schedule, `configs/stable-diffusion/v1-inference.yaml`: linear_start: 0.00085,
# linear_end: 0.012, timesteps: 1000 (its "linear" is linear in √β: diffusers' "scaled_linear").
BETA_START, BETA_END, TRAIN_STEPS = 0.00085, 0.012, 1000
# SD v1.5's scheduler_config.json: steps_offset 1 shifts "leading" timesteps up by one (…, 41, 21, 1).
STEPS_OFFSET = 1
COSINE_S, MAX_BETA = 0.008, 0.999  # Nichol & Dhariwal 2021 eq. 17: the offset s, and β's cap
KARRAS_RHO = 7.0  # Karras et al. 2022 eq. 5
SCHEDULES = ("scaled_linear", "linear", "cosine")
ZERO_SNR_SIGMA_ALPHA_BAR = 2.0**-24  # ᾱ_999 for σ-stepping samplers under a zero terminal SNR (diffusers')
SPACINGS = ("leading", "trailing", "linspace")
# What draws the noise: one CPU generator for the whole batch (diffusers' way), or a list of them, one
# per image along dim 0 (AUTOMATIC1111's per-image seeds); None: torch's global generator.
RandomSource = torch.Generator | list[torch.Generator] | None


def betas_for(schedule: str = "scaled_linear", n: int = TRAIN_STEPS, beta_start: float = BETA_START,
              beta_end: float = BETA_END, dtype: torch.dtype = torch.float32) -> Tensor:
    """β_1 … β_n, the variance of the noise each training step adds (`003 · 噪声调度（Noise Schedule）`).

    "scaled_linear" (SD v1): √β evenly spaced, then squared. "linear": β evenly spaced (DDPM).
    "cosine": Nichol & Dhariwal 2021 eq. 17, ᾱ(t) = cos²((t/n + s)/(1 + s)·π/2), β_t = 1 − ᾱ(t)/ᾱ(t−1)
    capped at 0.999 (diffusers' "squaredcos_cap_v2"). Computed as diffusers does, bit for bit, in `dtype`.
    """
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=dtype) ** 2
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=dtype)
    if schedule == "cosine":
        def alpha_bar(t: int) -> float:
            return math.cos((t / n + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar(t + 1) / alpha_bar(t), MAX_BETA) for t in range(n)]
        return torch.tensor(betas, dtype=dtype)
    raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2023, Algorithm 1: shift √ᾱ so that its last value is 0 (the last timestep is pure
    noise, as sampling assumes) and scale it so that its first is unchanged; back to β's, computed
    as diffusers computes it."""
    sqrt_alpha_bar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))
    alpha_bar = sqrt_alpha_bar**2
    return 1 - torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])


def alpha_bars(schedule: str = "scaled_linear", zero_terminal_snr: bool = False, float64: bool = False) -> Tensor:
    """ᾱ_t = ∏_{s≤t} (1 − β_s) for t = 0 … 999: the share of the clean signal's variance left at t.

    In float32, as diffusers computes it; float64=True: β and their product in float64, then stored
    as float32, as the original SD code does (CompVis `ldm/models/diffusion/ddpm.py`,
    `register_schedule`): the `alphas_cumprod` buffer of SD checkpoints, which AUTOMATIC1111's
    samplers read. The two differ in the last bits (about 1e-6 relative)."""
    betas = betas_for(schedule, dtype=torch.float64 if float64 else torch.float32)
    return torch.cumprod(1.0 - (rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas), dim=0).float()


def add_noise(x0: Tensor, noise: Tensor, alpha_bar_t: Tensor) -> Tensor:
    """The forward process in closed form: x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε (`003 · 前向扩散过程`)."""
    return alpha_bar_t**0.5 * x0 + (1 - alpha_bar_t) ** 0.5 * noise


def draw_noise(shape, generator: RandomSource, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> Tensor:
    """ε ~ N(0, I): every random draw of the package (initial noise, the VAE's posterior sample,
    ancestral noise, training noise). Drawn where `generator` lives (the pipelines' is on the CPU),
    in float32, then moved and cast: so a seed gives the same numbers on every device and in every
    dtype, and the same as diffusers' `randn_tensor` with that generator in fp32.

    A list of generators draws image k of the batch (dim 0) from generator k, one image's shape at a
    time: AUTOMATIC1111's per-image seeds (`modules/rng.py`, `ImageRNG`, RNG source "CPU")."""
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"one generator per image: {len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([draw_noise(shape[1:], g, device, dtype) for g in generator])
    where = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(tuple(shape), generator=generator, device=where, dtype=torch.float32).to(device, dtype)


def randn_like(x: Tensor, generator: RandomSource) -> Tensor:
    """`draw_noise` with x's shape, device and dtype."""
    return draw_noise(x.shape, generator, x.device, x.dtype)


def spaced_timesteps(steps: int, spacing: str) -> Tensor:
    """Which of the 1000 training timesteps to visit, largest first (Lin et al. 2023, Table 2).

    "leading" (SD's original scripts): multiples of 1000 // steps, plus the offset 1. "trailing":
    from 999 down in strides of 1000 / steps, rounded. "linspace": `steps` evenly spaced values from
    999 to 0, fractional. diffusers builds "trailing" with np.arange; so do we, numpy's way
    (1000 + k·((1000 − r) − 1000), ceil(1000/r) of them), so ties round alike.
    """
    if spacing == "leading":
        return torch.arange(steps - 1, -1, -1) * (TRAIN_STEPS // steps) + STEPS_OFFSET
    if spacing == "linspace":
        return torch.from_numpy(np.linspace(0, TRAIN_STEPS - 1, steps)[::-1].copy())
    if spacing != "trailing":
        raise ValueError(f"unknown spacing {spacing!r}; known: {', '.join(SPACINGS)}")
    ratio = TRAIN_STEPS / steps
    delta = (TRAIN_STEPS - ratio) - TRAIN_STEPS
    k = torch.arange(math.ceil(TRAIN_STEPS / ratio), dtype=torch.float64)
    return (TRAIN_STEPS + k * delta).round().long() - 1


def sigmas_of(alpha_bar: Tensor) -> Tensor:
    """σ_t = √((1−ᾱ_t)/ᾱ_t): the noise level of the sigma form x = x0 + σ ε (Karras et al. 2022)."""
    return ((1 - alpha_bar) / alpha_bar) ** 0.5


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = KARRAS_RHO, float32: bool = False) -> Tensor:
    """n noise levels from σ_max to σ_min, evenly spaced in σ^(1/ρ): Karras et al. 2022 eq. 5, ρ = 7.

    In numpy float64, as diffusers: torch's linspace and float64 pow each differ from numpy's in the
    last bit, and a last-bit change can move a truncated timestep by one (see `schedule_for`).
    float32=True: in torch float32, as k-diffusion's `get_sigmas_karras`."""
    ramp = torch.linspace(0, 1, n) if float32 else np.linspace(0, 1, n)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return sigmas if float32 else torch.from_numpy(sigmas)


def timestep_of(sigmas: Tensor, train_sigmas: Tensor) -> Tensor:
    """The (fractional) training timestep of each σ: t interpolated linearly against log σ.

    In diffusers' dtypes (its `_sigma_to_t`): the log σ table in float32, the rest in float64. The
    table is numpy's float32 log, as there: torch's differs in the last bit, which moves some t by one
    float32 step.
    """
    log_table = torch.from_numpy(np.log(train_sigmas.numpy()))  # increasing with t
    log_sigma = sigmas.double().clamp(min=1e-10).log()
    low = (torch.searchsorted(log_table.double(), log_sigma, right=True) - 1).clamp(0, len(log_table) - 2)
    w = ((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1])).clamp(0, 1)
    return (1 - w) * low + w * (low + 1)


def sigma_at(timesteps: Tensor, train_sigmas: Tensor) -> Tensor:
    """σ at (possibly fractional) timesteps, linear in t between the table's entries; t outside
    0..999 takes the end value. numpy's np.interp, as diffusers, so the last bits agree."""
    t = np.asarray(timesteps.double().numpy())
    return torch.from_numpy(np.interp(t, np.arange(len(train_sigmas)), train_sigmas.numpy()))


def sigma_at_log_linear(timesteps: Tensor, train_sigmas: Tensor) -> Tensor:
    """σ at fractional timesteps, linear in log σ between the table's entries (`sigma_at` is linear
    in σ): k-diffusion's `DiscreteSchedule.t_to_sigma`, in float32 as there."""
    t = timesteps.float()
    log_table = train_sigmas.float().log()
    w = t.frac()
    return ((1 - w) * log_table[t.floor().long()] + w * log_table[t.ceil().long()]).exp()


@dataclass
class Schedule:
    """What one sampler visits: `timesteps` (what the UNet is told), and for the samplers that step
    in noise levels, `sigmas` (one per timestep, then 0); `init_noise_sigma` scales the initial noise."""

    alpha_bar: Tensor  # ᾱ_t of the 1000 training steps
    timesteps: Tensor
    sigmas: Tensor | None = None
    init_noise_sigma: float = 1.0


def schedule_for(sampler: str, steps: int, spacing: str, karras: bool = False,
                 schedule: str = "scaled_linear", zero_terminal_snr: bool = False) -> Schedule:
    """The timesteps and σ's that diffusers' scheduler for `sampler` visits, bit for bit.

    Everything below that is not the papers' math is here for parity with diffusers, so that the
    same seed gives the same picture, and nowhere else (the samplers' step functions stay the math):

    * DDPM, DDIM and PNDM round "linspace"'s fractional timesteps to integers (numpy's round, half
      to even); Euler keeps them fractional but in float32, and reads its σ's at the float32 values.
    * PNDM (PLMS) visits its second timestep twice: its first step costs two UNet calls.
    * DPM++ 2M's "leading" grid divides 1000 by steps + 1 and drops the last entry; its "linspace"
      grid is steps + 1 rounded values without the last.
    * The two Karras ranges: Euler's σ's span the σ's of its first and last timestep, its timesteps
      stay fractional; DPM++ 2M's span the training schedule's own σ_min..σ_max, its timesteps
      rounded to integers, except for the cosine schedule (diffusers' "squaredcos_cap_v2"), where
      they are truncated (diffusers skips its round() for that schedule and casts to int64), so
      about half of them are one lower than rounded (9 of 25 at 25 steps); the first is 998, not
      999, since σ_max's t is 998.99999996 after σ → σ^(1/ρ) → σ.
    * init_noise_sigma: √(σ_max²+1) (the std of x at σ_max for a unit-variance clean latent) for
      "leading", plain σ_max for "trailing" and "linspace", as diffusers' Euler samplers assume.
    * A timestep outside 0..999 (leading's 1000 at 1000 steps) takes the end σ, as np.interp does.
    * With a zero terminal SNR, the samplers that step in σ take ᾱ_999 = 2⁻²⁴ instead of 0, so
      that σ_max is finite (≈ 4096).
    """
    alpha_bar = alpha_bars(schedule, zero_terminal_snr)
    if zero_terminal_snr and sampler in ("euler", "euler_a", "dpmpp_2m"):
        alpha_bar[-1] = ZERO_SNR_SIGMA_ALPHA_BAR
    if sampler in ("ddpm", "ddim", "pndm"):
        timesteps = spaced_timesteps(steps, spacing)
        if spacing == "linspace":
            timesteps = torch.from_numpy(timesteps.numpy().round()).long()
        if sampler != "pndm":
            return Schedule(alpha_bar, timesteps)
        return Schedule(alpha_bar, torch.cat([timesteps[:1], timesteps[1:2], timesteps[1:]]))

    train_sigmas = sigmas_of(alpha_bar)
    last = torch.zeros(1, dtype=torch.float64)
    if sampler == "dpmpp_2m":
        if spacing == "leading":
            timesteps = spaced_timesteps(steps + 1, "leading")[:-1]
        elif spacing == "linspace":
            timesteps = torch.from_numpy(np.linspace(0, TRAIN_STEPS - 1, steps + 1).round()[::-1][:-1].copy()).long()
        else:
            timesteps = spaced_timesteps(steps, spacing)
        if karras:
            sigmas = karras_sigmas(train_sigmas[0].item(), train_sigmas[-1].item(), steps)
            timesteps = timestep_of(sigmas, train_sigmas)
            timesteps = (timesteps if schedule == "cosine" else timesteps.round()).long()  # .long() truncates
        else:
            sigmas = sigma_at(timesteps, train_sigmas)
        return Schedule(alpha_bar, timesteps, torch.cat([sigmas, last]).float())

    # euler, euler_a
    timesteps = spaced_timesteps(steps, spacing).float()
    sigmas = sigma_at(timesteps, train_sigmas)
    if karras:
        sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), steps)
        timesteps = timestep_of(sigmas, train_sigmas)
    sigma_max = sigmas.max().float()
    init_noise_sigma = float((sigma_max**2 + 1) ** 0.5 if spacing == "leading" else sigma_max)
    return Schedule(alpha_bar, timesteps.float(), torch.cat([sigmas, last]).float(), init_noise_sigma)


def a1111_schedule(sampler: str, steps: int, karras: bool = False, schedule: str = "scaled_linear") -> Schedule:
    """The σ's that AUTOMATIC1111 gives k-diffusion's samplers, bit for bit: its schedule types
    "Uniform" (k-diffusion's `CompVisDenoiser.get_sigmas`) and "Karras" (its `get_sigmas`).

    * The training σ's come from the checkpoint's ᾱ (`alpha_bars(float64=True)`, in float32).
    * Uniform: σ at t = linspace(999, 0, steps), log-linear between training steps, then 0 (the
      timesteps of diffusers' "linspace", but its σ's are linear in σ).
    * Karras: eq. 5 over the training schedule's own σ_min..σ_max, ρ = 7, in float32.
    * The UNet is told t(σ), interpolated against log σ (k-diffusion's `sigma_to_t`).
    * The start is x = ε σ_max (A1111's `KDiffusionSampler.sample`; diffusers' "leading" Euler
      starts at ε √(σ_max²+1)); DPM++ 2M keeps x in the alpha form, x √ᾱ, so it starts at
      ε σ_max / √(σ_max²+1).
    """
    alpha_bar = alpha_bars(schedule, float64=True)
    train_sigmas = sigmas_of(alpha_bar)
    if karras:
        sigmas = karras_sigmas(train_sigmas[0].item(), train_sigmas[-1].item(), steps, float32=True)
    else:
        sigmas = sigma_at_log_linear(torch.linspace(TRAIN_STEPS - 1, 0, steps), train_sigmas)
    sigma_max = sigmas[0].item()
    init_noise_sigma = sigma_max / (sigma_max**2 + 1) ** 0.5 if sampler == "dpmpp_2m" else sigma_max
    timesteps = timestep_of(sigmas, train_sigmas).float()
    return Schedule(alpha_bar, timesteps, torch.cat([sigmas, sigmas.new_zeros(1)]), init_noise_sigma)
