"""LoRA files (kohya/A1111 layout) merged by us equal diffusers' `load_lora_weights` + `fuse_lora`
(peft) on the same random weights, module by module; unloading restores the weights bit for bit.

Where diffusers 0.39 (with peft 0.17.1) reads a file differently from kohya and A1111, the case is
checked against FORMATS.md's formula instead: a module without alpha, a LoCon convolution's alpha,
and alphas that differ between modules all become diffusers' first alpha there (kohya: each
module's α / r, and 1 without α). The files compared with diffusers give every module one alpha,
as most real files do.
"""
import copy

import pytest
import torch
from safetensors.torch import save_file

import sd_scratch
from sd_scratch.addons.lora import module_names
from sd_scratch.checkpoints.files import CheckpointError
from tests.reference import SD15_SCHEDULER_CONFIG, rel_err
from tests.test_pipelines import as_uint8, assert_close_images, reference_uint8

pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft (the test extra)")

RANK = 4
# What a plain SD1 LoRA wraps (SD1's proj_in/proj_out as 1×1-conv factors), and one LoCon convolution.
UNET_MODULES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                "mlp.fc2")
LOCON = "down_blocks.0.resnets.0.conv1"


def random_lora(model, seed: int = 0, compvis: bool = False, locon: bool = False,
                some_without_alpha: bool = False, alpha: float | None = 2.0) -> dict[str, torch.Tensor]:
    """A kohya-layout LoRA for `model` (ours, for the module shapes), in diffusers' module names or
    CompVis's; `locon`: also a 3×3 ResNet convolution; `some_without_alpha`: every third has none;
    `alpha` None: a different alpha for neighbouring modules."""
    g = torch.Generator().manual_seed(seed)
    chosen = [m for n, m in model.unet.named_modules() if n.endswith(UNET_MODULES) or (locon and n == LOCON)]
    chosen += [m for n, m in model.text_encoder.named_modules() if n.endswith(TEXT_MODULES)]
    compvis_words = ("input_blocks", "middle_block", "output_blocks")
    name_of = {}
    for name, (module, part) in module_names(model).items():
        if part == "text encoder" or compvis == any(w in name for w in compvis_words):
            name_of[id(module)] = name
    out = {}
    for i, module in enumerate(chosen):
        name, w = name_of[id(module)], module.weight
        if w.ndim == 4:
            down = torch.randn(RANK, w.shape[1], *w.shape[2:], generator=g)
            up = torch.randn(w.shape[0], RANK, 1, 1, generator=g)
        else:
            down, up = torch.randn(RANK, w.shape[1], generator=g), torch.randn(w.shape[0], RANK, generator=g)
        out[name + ".lora_down.weight"], out[name + ".lora_up.weight"] = down * 0.05, up * 0.05
        if i % 3 or not some_without_alpha:
            out[name + ".alpha"] = torch.tensor(float(1 + i % RANK) if alpha is None else alpha)
    return out


@pytest.fixture
def ours(tiny_checkpoint):
    return sd_scratch.load(tiny_checkpoint["folder"])


def fused_reference(models, tokenizer_folder, lora, unet_scale: float, te_scale: float):
    """A copy of the reference models with diffusers' own reading of `lora` fused in."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    models = copy.deepcopy(models)
    pipe = StableDiffusionPipeline(vae=models["vae"], text_encoder=models["text_encoder"],
                                   tokenizer=CLIPTokenizer.from_pretrained(tokenizer_folder), unet=models["unet"],
                                   scheduler=DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(dict(lora))
    pipe.fuse_lora(components=["unet"], lora_scale=unet_scale)
    pipe.fuse_lora(components=["text_encoder"], lora_scale=te_scale)
    pipe.unload_lora_weights()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_kohya_lora_merges_as_diffusers_fuses_it(ours, tiny_models, tiny_checkpoint, tmp_path):
    lora = random_lora(ours)
    save_file(lora, str(tmp_path / "style.safetensors"))
    before = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    ours.load_lora(tmp_path / "style.safetensors", scale=0.8, text_encoder_scale=0.5)
    ref = fused_reference(tiny_models, tiny_checkpoint["folder"] / "tokenizer", lora, 0.8, 0.5)
    ref_unet, ref_text = ref.unet.state_dict(), ref.text_encoder.state_dict()
    gaps = {name: rel_err(t, ref_unet[name]) for name, t in ours.unet.state_dict().items()}
    gaps |= {name: rel_err(t, ref_text["text_model." + name]) for name, t in ours.text_encoder.state_dict().items()}
    assert max(gaps.values()) <= 1e-5, max(gaps, key=gaps.get)
    changed = sum(not torch.equal(t, before[name]) for name, t in ours.unet.state_dict().items())
    assert changed == len([k for k in lora if k.startswith("lora_unet_") and k.endswith("lora_down.weight")])
    ours.unload_lora()
    assert all(torch.equal(t, before[k]) for k, t in ours.unet.state_dict().items())  # bit for bit


def test_the_merged_model_draws_diffusers_picture(ours, tiny_models, tiny_checkpoint, tmp_path):
    lora = random_lora(ours, seed=5)
    save_file(lora, str(tmp_path / "style.safetensors"))
    ref = fused_reference(tiny_models, tiny_checkpoint["folder"] / "tokenizer", lora, 1.0, 1.0)
    ours.load_lora(tmp_path / "style.safetensors")
    images = ours.txt2img("a red circle", height=32, width=32, steps=5, seed=1, progress=False)
    expected = ref("a red circle", height=32, width=32, num_inference_steps=5,
                   generator=torch.Generator("cpu").manual_seed(1), output_type="np")
    assert_close_images(as_uint8(images), reference_uint8(expected))


def test_a_locon_3x3_convolution_merges_by_the_formula(ours, tmp_path):
    lora = random_lora(ours, seed=6, locon=True, alpha=None)
    name = "lora_unet_" + LOCON.replace(".", "_")
    down, up = lora[name + ".lora_down.weight"], lora[name + ".lora_up.weight"]
    assert tuple(down.shape[-2:]) == (3, 3)
    alpha = float(lora[name + ".alpha"])
    save_file(lora, str(tmp_path / "locon.safetensors"))
    conv = ours.unet.get_submodule(LOCON)
    before = conv.weight.clone()
    ours.load_lora(tmp_path / "locon.safetensors", scale=0.7)
    expected = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * alpha / RANK * 0.7
    assert rel_err(conv.weight - before, expected) <= 1e-5
    ours.unload_lora()
    assert torch.equal(conv.weight, before)


def test_a_module_without_alpha_has_scale_1(ours, tmp_path):
    lora = random_lora(ours, seed=7, some_without_alpha=True, alpha=None)
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert name + ".alpha" not in lora
    save_file(lora, str(tmp_path / "no-alpha.safetensors"))
    proj = ours.unet.get_submodule("down_blocks.0.attentions.0.proj_in")
    before = proj.weight.clone()
    ours.load_lora(tmp_path / "no-alpha.safetensors")
    up, down = lora[name + ".lora_up.weight"].flatten(1), lora[name + ".lora_down.weight"].flatten(1)
    assert rel_err(proj.weight - before, (up @ down).reshape(before.shape)) <= 1e-5


def test_compvis_names_merge_the_same(ours, tmp_path):
    diffusers_named = random_lora(ours, seed=1, locon=True, alpha=None)
    compvis_named = random_lora(ours, seed=1, compvis=True, locon=True, alpha=None)
    assert any("input_blocks" in k for k in compvis_named) and compvis_named.keys() != diffusers_named.keys()
    merged = []
    for name, lora in (("a", diffusers_named), ("b", compvis_named)):
        save_file(lora, str(tmp_path / f"{name}.safetensors"))
        ours.load_lora(tmp_path / f"{name}.safetensors")
        merged.append({k: v.clone() for k, v in ours.unet.state_dict().items()})
        ours.unload_lora()
    assert all(torch.equal(merged[0][k], merged[1][k]) for k in merged[0])


def test_two_loras_add_and_unload_together(ours, tmp_path):
    before = {k: v.clone() for k, v in ours.text_encoder.state_dict().items()}
    for seed in (2, 3):
        save_file(random_lora(ours, seed=seed), str(tmp_path / f"{seed}.safetensors"))
    ours.load_lora(tmp_path / "2.safetensors", scale=0.5).load_lora(tmp_path / "3.safetensors", scale=0.25)
    assert len(ours.lora.applied) == 2
    name = "encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(ours.text_encoder.state_dict()[name], before[name])
    ours.unload_lora()
    assert all(torch.equal(t, before[k]) for k, t in ours.text_encoder.state_dict().items())


def test_keys_that_match_nothing_are_an_error_naming_them(ours, tmp_path):
    lora = random_lora(ours, seed=4)
    lora["lora_unet_not_a_module.lora_down.weight"] = torch.zeros(RANK, 8)
    lora["lora_unet_not_a_module.lora_up.weight"] = torch.zeros(8, RANK)
    save_file(lora, str(tmp_path / "odd.safetensors"))
    with pytest.raises(CheckpointError, match=r"odd\.safetensors: 1 of \d+ LoRA modules match no module.*not_a_module"):
        ours.load_lora(tmp_path / "odd.safetensors")
    assert not ours.lora.originals  # nothing was merged
    with pytest.warns(UserWarning, match="not_a_module"):
        ours.load_lora(tmp_path / "odd.safetensors", strict=False)


def test_a_diffusers_peft_lora_merges_as_diffusers_fuses_it(ours, tiny_models, tiny_checkpoint, tmp_path):
    """diffusers' own layout (`unet.<module>.lora_A.weight`, `lora_B.weight`; no alpha: scale 1)."""
    kohya = random_lora(ours, seed=9)
    peft = {}
    for key, t in kohya.items():
        if key.endswith(".alpha"):
            continue
        name, _, kind = key.partition(".")
        prefix = "unet." if name.startswith("lora_unet_") else "text_encoder."
        peft[f"{prefix}{dict_path(ours, name)}.{'lora_A' if kind.startswith('lora_down') else 'lora_B'}.weight"] = t
    save_file(peft, str(tmp_path / "peft.safetensors"))
    ours.load_lora(tmp_path / "peft.safetensors", scale=0.6)
    ref = fused_reference(tiny_models, tiny_checkpoint["folder"] / "tokenizer", peft, 0.6, 0.6)
    ref_unet, ref_text = ref.unet.state_dict(), ref.text_encoder.state_dict()
    gaps = {name: rel_err(t, ref_unet[name]) for name, t in ours.unet.state_dict().items()}
    gaps |= {name: rel_err(t, ref_text["text_model." + name]) for name, t in ours.text_encoder.state_dict().items()}
    assert max(gaps.values()) <= 1e-5, max(gaps, key=gaps.get)
    assert len(ours.lora.originals) == len(peft) // 2


def dict_path(model, kohya_name: str) -> str:
    """The dotted module path (diffusers layout; `text_model.` for the text encoder) of a kohya name."""
    module, part = module_names(model)[kohya_name]
    if part == "unet":
        return next(n for n, m in model.unet.named_modules() if m is module)
    return "text_model." + next(n for n, m in model.text_encoder.named_modules() if m is module)


def test_lycoris_loha_and_lokr_merge_by_their_formulas(ours, tmp_path):
    """LoHa ΔW = (w1a @ w1b) ⊙ (w2a @ w2b) · α/r; LoKr ΔW = w1 ⊗ (w2a @ w2b) · α/r (r: the factors'
    rank). No reference library is installed for them, so the formulas are written out here."""
    g = torch.Generator().manual_seed(11)
    q = ours.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    k = ours.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k")
    out_q, in_q = q.weight.shape
    r = 2
    loha = {n: torch.randn(*shape, generator=g) * 0.7 for n, shape in  # ΔW well above float32 rounding of W
            (("hada_w1_a", (out_q, r)), ("hada_w1_b", (r, in_q)), ("hada_w2_a", (out_q, r)), ("hada_w2_b", (r, in_q)))}
    w1 = torch.randn(4, 4, generator=g) * 0.1  # LoKr: (out/4 × in/4) ⊗ … = out × in
    w2a, w2b = torch.randn(out_q // 4, r, generator=g) * 0.1, torch.randn(r, in_q // 4, generator=g) * 0.1
    base_q, base_k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    tensors = {f"{base_q}.{n}": t for n, t in loha.items()} | {f"{base_q}.alpha": torch.tensor(1.0)}
    tensors |= {f"{base_k}.lokr_w1": w1, f"{base_k}.lokr_w2_a": w2a, f"{base_k}.lokr_w2_b": w2b,
                f"{base_k}.alpha": torch.tensor(4.0)}
    save_file(tensors, str(tmp_path / "lycoris.safetensors"))
    before_q, before_k = q.weight.clone(), k.weight.clone()
    ours.load_lora(tmp_path / "lycoris.safetensors", scale=0.5)
    loha_delta = (loha["hada_w1_a"] @ loha["hada_w1_b"]) * (loha["hada_w2_a"] @ loha["hada_w2_b"]) * (1.0 / r)
    lokr_delta = torch.kron(w1, w2a @ w2b) * (4.0 / r)
    assert rel_err(q.weight - before_q, 0.5 * loha_delta) <= 1e-5
    assert rel_err(k.weight - before_k, 0.5 * lokr_delta) <= 1e-5
    ours.unload_lora()
    assert torch.equal(q.weight, before_q) and torch.equal(k.weight, before_k)
    save_file({f"{base_q}.lokr_w1": w1, f"{base_q}.lokr_w2": torch.zeros(2, 2), f"{base_q}.lokr_t2": torch.zeros(1)},
              str(tmp_path / "tucker.safetensors"))
    with pytest.raises(CheckpointError, match="CP/Tucker"):
        ours.load_lora(tmp_path / "tucker.safetensors")
