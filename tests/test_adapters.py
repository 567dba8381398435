"""Training the add-ons (sd_scratch/training/adapters.py): what the trained model computes is what
diffusers computes from the file written, and the model's own weights never change."""
import copy

import pytest
import torch
from safetensors.torch import save_file

import sd_scratch
from sd_scratch.training.adapters import attach_lora, lora_tensors, train_embedding, train_lora
from tests.reference import rel_err
from tests.test_lora import fused_reference
from tests.test_textual_inversion import reference_hidden_states

pytest.importorskip("peft", reason="diffusers' LoRA loading needs peft (the test extra)")

PROMPTS = ["a red circle at the top left", "a small blue square"]


def attention_and_text(name: str) -> bool:
    return name.startswith("lora_te_") or (name.startswith("lora_unet_down_blocks") and "attentions" in name)


def inputs(sd, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    return x, torch.tensor([10, 600]), sd.tokenizer(PROMPTS)


def snapshot(sd):
    return {f"{part}.{k}": v.clone() for part in ("unet", "text_encoder")
            for k, v in getattr(sd, part).state_dict().items()}


@torch.no_grad()
def test_the_hooked_layers_compute_what_diffusers_reads_from_the_written_file(tiny_models, tiny_checkpoint):
    ours = sd_scratch.load(tiny_checkpoint["folder"])
    torch.manual_seed(0)
    adapters, handles = attach_lora(ours, rank=4, alpha=2.0, wanted=attention_and_text)
    for a in adapters.values():  # every factor random: the zero-initialised up would test nothing
        for p in a.parameters():
            p.normal_(0, 0.05)
    x, t, ids = inputs(ours)
    context = ours.text_encoder(ids)
    hooked = ours.unet(x, t, context)
    for h in handles:
        h.remove()
    assert rel_err(ours.unet(x, t, ours.text_encoder(ids)), hooked) > 1e-3  # the change is there
    ref = fused_reference(tiny_models, tiny_checkpoint["folder"] / "tokenizer", lora_tensors(adapters), 1.0, 1.0)
    ref_context = ref.text_encoder(ids).last_hidden_state
    assert rel_err(ref_context, context) <= 1e-4
    assert rel_err(ref.unet(x, t, ref_context).sample, hooked) <= 1e-4


def test_training_a_lora_changes_only_the_factors_and_loads_as_a_kohya_file(tiny_checkpoint, tmp_path):
    ours = sd_scratch.load(tiny_checkpoint["folder"])
    before = snapshot(ours)
    latents = torch.randn(4, 4, 8, 8)
    tensors = train_lora(ours, latents, lambda index, g: [PROMPTS[i % 2] for i in index.tolist()], attention_and_text,
                         steps=3, batch=2)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(ours).items())  # frozen, hooks gone
    ups = [v for k, v in tensors.items() if k.endswith(".lora_up.weight")]
    assert ups and all(v.abs().sum() > 0 for v in ups)  # it trained (the ups start at zero)
    save_file(tensors, str(tmp_path / "trained.safetensors"))
    ours.load_lora(tmp_path / "trained.safetensors")  # strict: every key matches a layer
    ours.unload_lora()


def test_a_trained_embedding_gives_diffusers_text_encoding_and_touches_no_weight(tiny_models, tiny_checkpoint,
                                                                                 tmp_path):
    ours = sd_scratch.load(tiny_checkpoint["folder"])
    before = snapshot(ours)
    vectors = train_embedding(ours, torch.randn(4, 4, 8, 8), lambda g: ["a photo of my-thing"] * 2, "my-thing",
                              "circle", vectors=2, steps=3, batch=2)
    assert vectors.shape == (2, ours.text_encoder.config.width)
    start = ours.text_encoder.embeddings.token_embedding.weight[ours.tokenizer.encode("circle")[1]]
    assert not torch.allclose(vectors, start.expand_as(vectors))  # it moved from its initial word
    assert all(torch.equal(v, before[k]) for k, v in snapshot(ours).items())
    with torch.no_grad():
        ours_states = ours.text_encoder(ours.tokenizer(["a photo of my-thing"]))
    expected = reference_hidden_states(copy.deepcopy(tiny_models), tiny_checkpoint["folder"] / "tokenizer", vectors,
                                       "my-thing", "a photo of my-thing")
    assert rel_err(ours_states, expected) <= 1e-4


def test_the_shipped_examples_load_into_the_built_in_model_strictly():
    from pathlib import Path

    examples = Path(sd_scratch.__file__).parent / "data" / "examples"
    sd = sd_scratch.load()
    before = snapshot(sd)
    assert sd.load_textual_inversion(examples / "my-scene.safetensors") == "my-scene"
    sd.load_lora(examples / "ring.safetensors")  # strict: every key names a layer of this model
    assert any(not torch.equal(v, before[k]) for k, v in snapshot(sd).items())
    sd.unload_lora()
    assert all(torch.equal(v, before[k]) for k, v in snapshot(sd).items())
