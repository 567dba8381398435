"""The samplers against diffusers' schedulers in SD v1.5's configuration: the same timesteps and σ's
bit for bit, the same step from the same ε (and the same seeded noise), the same whole loop."""
import inspect

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, PNDMScheduler)

from sd_scratch.noise_schedule import betas_for
from sd_scratch.samplers import SAMPLERS, make_sampler
from tests.reference import SD15_SCHEDULER_CONFIG, rel_err

# diffusers' own np.array(tensor) calls warn under numpy 2; nothing of ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# SD v1.5's scheduler_config.json, as the pipelines pass it (each class takes the keys it knows).
SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, set_alpha_to_one=False, clip_sample=False, skip_prk_steps=True,
    timestep_spacing="leading",
)
SPACINGS = ("leading", "trailing", "linspace")
DIFFUSERS_SCHEDULE = {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}
REFERENCE = {
    "ddpm": DDPMScheduler, "ddim": DDIMScheduler, "pndm": PNDMScheduler, "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler,
}
SIGMA_SAMPLERS = ("euler", "euler_a", "dpmpp_2m")
# The brief's step counts, plus 48 (1000/48 makes trailing ties at .5, rounded to even) and 61
# (np.arange gives trailing 62 entries, the last -1). diffusers refuses none of them.
STEPS = (1, 2, 3, 7, 9, 27, 48, 50, 61, 1000)


def reference(name: str, steps: int, spacing: str = "leading", karras: bool = False,
              schedule: str = "scaled_linear"):
    cls = REFERENCE[name]
    accepted = inspect.signature(cls.__init__).parameters
    config = dict(SD15_SCHEDULER, timestep_spacing=spacing, beta_schedule=DIFFUSERS_SCHEDULE[schedule])
    config = {k: v for k, v in config.items() if k in accepted}
    if name == "dpmpp_2m":
        config.update(algorithm_type="dpmsolver++", solver_order=2)
    if karras and name != "euler_a":
        config["use_karras_sigmas"] = True
    scheduler = cls(**config)
    scheduler.set_timesteps(steps)
    if karras and name == "euler_a":
        # diffusers' EulerAncestral has no Karras option; its step reads only `sigmas`, so give it
        # EulerDiscrete's Karras schedule (what ours uses too).
        euler = reference("euler", steps, spacing, karras=True, schedule=schedule)
        scheduler.sigmas, scheduler.timesteps = euler.sigmas, euler.timesteps
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    return scheduler


def configs(names=SAMPLERS) -> list[tuple[str, str, bool, float]]:
    """(name, spacing, karras, eta): all three spacings, Karras σ's for the sigma samplers, DDIM with η = 0.5."""
    out = []
    for name in names:
        for spacing in SPACINGS:
            for karras in (False, True) if name in SIGMA_SAMPLERS else (False,):
                out.append((name, spacing, karras, 0.0))
            if name == "ddim":
                out.append((name, spacing, False, 0.5))
    return out


def reference_step(scheduler, eps, t, x, generator, eta):
    accepted = inspect.signature(scheduler.step).parameters
    kwargs = {"generator": generator} if "generator" in accepted else {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    return scheduler.step(eps, t, x, **kwargs)


def fake_unet(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.1 * x + torch.sin(t / 100)


def whole_loop_gap(ours, ref, seed: int, eta: float) -> float:
    """Run both samplers' whole loops from the same noise with `fake_unet`; their final relative gap."""
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    x_ours, x_ref = noise * ours.init_noise_sigma, noise * ref.init_noise_sigma
    ours_noise, ref_noise = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for i, t in enumerate(ref.timesteps):
        x_ours = ours.step(fake_unet(ours.scale_model_input(x_ours, i), t), i, x_ours, ours_noise).prev_sample
        eps = fake_unet(ref.scale_model_input(x_ref, t), t)
        x_ref = reference_step(ref, eps, t, x_ref, ref_noise, eta).prev_sample
    return rel_err(x_ours, x_ref)


@pytest.mark.parametrize("name,spacing,karras", [c[:3] for c in configs() if c[3] == 0.0])
@pytest.mark.parametrize("steps", STEPS)
def test_timesteps_and_sigmas_equal_diffusers(name, spacing, karras, steps):
    ref = reference(name, steps, spacing, karras)
    ours = make_sampler(name, steps, spacing=spacing, karras=karras)
    assert ours.timesteps.dtype == ref.timesteps.dtype
    assert torch.equal(ours.timesteps, ref.timesteps)
    if name in SIGMA_SAMPLERS:
        assert torch.equal(ours.sigmas, ref.sigmas)
    else:
        assert ours.sigmas is None
    assert isinstance(ours.init_noise_sigma, float) and ours.init_noise_sigma == float(ref.init_noise_sigma)
    assert ours.order == ref.order


def test_pndm_repeats_its_second_timestep():
    """PLMS's first step calls the UNet twice; the list says so (and 'plms' is the same sampler)."""
    assert make_sampler("plms", 4).timesteps.tolist() == [751, 501, 501, 251, 1]


@pytest.mark.parametrize("schedule,diffusers_name", [
    ("scaled_linear", "scaled_linear"), ("linear", "linear"), ("cosine", "squaredcos_cap_v2"),
])
def test_betas_equal_diffusers(schedule, diffusers_name):
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule=diffusers_name)
    assert torch.equal(betas_for(schedule), ref.betas)


@pytest.mark.parametrize("name,spacing,karras,eta", configs())
@pytest.mark.parametrize("steps", (1, 2, 7, 50))
def test_every_step_equals_diffusers(name, spacing, karras, eta, steps):
    """At every index, first to last, from fresh (x, ε) each time; multistep samplers carry their
    history through the same sequence, stochastic ones draw from generators seeded alike."""
    ref = reference(name, steps, spacing, karras)
    ours = make_sampler(name, steps, spacing=spacing, karras=karras, eta=eta)
    data = torch.Generator().manual_seed(steps)
    ours_noise, ref_noise = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for i, t in enumerate(ref.timesteps):
        x, eps = torch.randn(2, 2, 4, 8, 8, generator=data)
        assert torch.equal(ours.scale_model_input(x, i), ref.scale_model_input(x, t))
        got = ours.step(eps, i, x, ours_noise)
        want = reference_step(ref, eps, t, x, ref_noise, eta)
        assert rel_err(got.prev_sample, want.prev_sample) < 1e-6, f"index {i}"
        if hasattr(want, "pred_original_sample"):
            assert rel_err(got.x0_pred, want.pred_original_sample) < 1e-6, f"index {i}"


@pytest.mark.parametrize("name,spacing,karras,eta", configs())
@pytest.mark.parametrize("steps", (7, 25))
def test_whole_loop_equals_diffusers(name, spacing, karras, eta, steps):
    ref = reference(name, steps, spacing, karras)
    ours = make_sampler(name, steps, spacing=spacing, karras=karras, eta=eta)
    assert whole_loop_gap(ours, ref, seed=1, eta=eta) < 1e-5


@pytest.mark.parametrize("name,spacing,karras,eta", configs())
def test_img2img_loop_equals_diffusers(name, spacing, karras, eta):
    """Start at i0 = steps − int(steps·strength), as diffusers' img2img pipeline does."""
    steps, strength = 25, 0.6
    i0 = (steps - int(steps * strength)) * make_sampler(name, steps).order
    ref = reference(name, steps, spacing, karras)
    ours = make_sampler(name, steps, spacing=spacing, karras=karras, eta=eta)
    data = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 1, 4, 8, 8, generator=data)
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(i0)
    timesteps = ref.timesteps[i0:]
    x_ref = ref.add_noise(x0, noise, timesteps[:1])
    ours.start_at(i0)
    x_ours = ours.add_noise(x0, noise, i0)
    ours_noise, ref_noise = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for i, t in enumerate(timesteps, start=i0):
        x_ours = ours.step(fake_unet(ours.scale_model_input(x_ours, i), t), i, x_ours, ours_noise).prev_sample
        eps = fake_unet(ref.scale_model_input(x_ref, t), t)
        x_ref = reference_step(ref, eps, t, x_ref, ref_noise, eta).prev_sample
    assert rel_err(x_ours, x_ref) < 1e-5


@pytest.mark.parametrize("name,spacing,karras", [c[:3] for c in configs() if c[3] == 0.0])
def test_add_noise_equals_diffusers(name, spacing, karras):
    ours = make_sampler(name, 25, spacing=spacing, karras=karras)
    x0, noise = torch.randn(2, 2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    for i in (0, 12, len(ours.timesteps) - 1):
        ref = reference(name, 25, spacing, karras)
        if hasattr(ref, "set_begin_index"):
            ref.set_begin_index(i)
        assert torch.equal(ours.add_noise(x0, noise, i), ref.add_noise(x0, noise, ref.timesteps[i : i + 1]))


def test_sigma_form_is_alpha_form_over_sqrt_alpha_bar():
    """x = x0 + σε scaled by 1/√(σ²+1) = √ᾱ is x_t = √ᾱ x0 + √(1−ᾱ) ε: what the UNet was trained on."""
    euler, ddim = make_sampler("euler", 10, spacing="leading"), make_sampler("ddim", 10, spacing="leading")
    x0, noise = torch.randn(2, 1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    for i in range(10):
        assert euler.timesteps[i] == ddim.timesteps[i]
        x = euler.scale_model_input(euler.add_noise(x0, noise, i), i)
        assert rel_err(x, ddim.add_noise(x0, noise, i)) < 1e-6


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="known: ddpm, ddim, pndm, euler, euler_a, dpmpp_2m"):
        make_sampler("heun", 20)
    with pytest.raises(ValueError, match="steps"):
        make_sampler("ddim", 0)
    with pytest.raises(ValueError, match="karras"):
        make_sampler("ddim", 20, karras=True)
    with pytest.raises(ValueError, match="spacing"):
        make_sampler("euler", 20, spacing="uniform")
    with pytest.raises(ValueError, match="eta"):
        make_sampler("euler", 20, eta=0.5)


def official(name: str, steps: int):
    """diffusers' class for `name` as a pipeline loading SD v1.5 builds it: the official config, no overrides."""
    scheduler = REFERENCE[name].from_config(SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(steps)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    return scheduler


def test_dpmsolver_defaults_are_dpmpp_2m():
    """No override is needed for DPM++ 2M: these are DPMSolverMultistepScheduler's own defaults."""
    config = DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER_CONFIG).config
    assert (config.algorithm_type, config.solver_order) == ("dpmsolver++", 2)
    assert not config.use_karras_sigmas


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("steps", (1, 2, 7, 25, 48, 50, 61, 1000))
def test_no_spacing_means_what_the_official_sd15_config_gives(name, steps):
    ref = official(name, steps)
    ours = make_sampler(name, steps)
    assert ours.timesteps.dtype == ref.timesteps.dtype
    assert torch.equal(ours.timesteps, ref.timesteps)
    if name in SIGMA_SAMPLERS:
        assert torch.equal(ours.sigmas, ref.sigmas)
    assert isinstance(ours.init_noise_sigma, float) and ours.init_noise_sigma == float(ref.init_noise_sigma)


@pytest.mark.parametrize("name", SAMPLERS)
def test_no_spacing_whole_loop_equals_the_official_sd15_config(name):
    steps = 25
    ref, ours = official(name, steps), make_sampler(name, steps)
    assert whole_loop_gap(ours, ref, seed=5, eta=0.0) < 1e-5


# diffusers does not round DPM++ 2M's Karras timesteps under the cosine schedule: it truncates them
# (998, not 999, first). Every step count up to 60, and a few larger, in every spacing.
COSINE_STEPS = tuple(range(1, 61)) + (100, 250, 999, 1000)


@pytest.mark.parametrize("name", SIGMA_SAMPLERS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("karras", (True, False))
def test_cosine_schedule_timesteps_and_sigmas_equal_diffusers(name, spacing, karras):
    for steps in COSINE_STEPS:
        ref = reference(name, steps, spacing, karras, schedule="cosine")
        ours = make_sampler(name, steps, schedule="cosine", spacing=spacing, karras=karras)
        assert ours.timesteps.dtype == ref.timesteps.dtype
        assert torch.equal(ours.timesteps, ref.timesteps), f"steps {steps}"
        assert torch.equal(ours.sigmas, ref.sigmas), f"steps {steps}"
        assert ours.init_noise_sigma == float(ref.init_noise_sigma), f"steps {steps}"


def test_dpmpp_2m_karras_cosine_timesteps_are_truncated_not_rounded():
    ours = make_sampler("dpmpp_2m", 25, schedule="cosine", karras=True)
    assert ours.timesteps[:12].tolist() == [998] * 11 + [997]
    assert ours.timesteps[-3:].tolist() == [112, 19, 0]


@pytest.mark.parametrize("name", SIGMA_SAMPLERS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", (7, 25))
def test_cosine_karras_whole_loop_equals_diffusers(name, spacing, steps):
    ref = reference(name, steps, spacing, karras=True, schedule="cosine")
    ours = make_sampler(name, steps, schedule="cosine", spacing=spacing, karras=True)
    assert whole_loop_gap(ours, ref, seed=6, eta=0.0) < 1e-5
