"""The CLIP text encoder against transformers' CLIPTextModel on the same random weights."""
import pytest
import torch

from sd_scratch.text_encoder import CLIPTextEncoder, TextEncoderConfig
from tests.reference import SD15_PARAMETERS, SD15_TEXT, TINY_TEXT, make_text_encoder, rel_err

START, END = 49406, 49407  # <|startoftext|>, <|endoftext|> (also SD v1's padding id)
# "a photo of a cat" and "an astronaut riding a horse on the moon" as CLIP's tokenizer writes them.
PROMPTS = [[320, 1125, 539, 320, 2368], [550, 18376, 6765, 320, 4558, 525, 518, 3293]]


def padded_ids(prompts: list[list[int]], length: int = 77) -> torch.Tensor:
    return torch.tensor([[START, *p, END] + [END] * (length - len(p) - 2) for p in prompts])


def ours_from(ref) -> CLIPTextEncoder:
    sd = {k.removeprefix("text_model."): v for k, v in ref.state_dict().items()}
    model = CLIPTextEncoder(TextEncoderConfig.from_state_dict(sd)).eval()
    model.load_state_dict(sd, strict=True)
    return model


@pytest.fixture(scope="module")
def tiny():
    ref = make_text_encoder(TINY_TEXT)
    return ref, ours_from(ref)


@pytest.fixture(scope="module")
def sd15():
    ref = make_text_encoder(SD15_TEXT)
    return ref, ours_from(ref)


@torch.no_grad()
def test_matches_clip_text_model(tiny):
    ref, ours = tiny
    ids = torch.randint(0, TINY_TEXT["vocab_size"], (3, 77), generator=torch.Generator().manual_seed(0))
    assert rel_err(ours(ids), ref(ids).last_hidden_state) <= 1e-4


@torch.no_grad()
def test_shorter_sequences_use_the_first_positions(tiny):
    ref, ours = tiny
    ids = padded_ids(PROMPTS, length=12)
    assert ours(ids).shape == (2, 12, TINY_TEXT["hidden_size"])
    assert rel_err(ours(ids), ref(ids).last_hidden_state) <= 1e-4


@torch.no_grad()
@pytest.mark.parametrize("clip_skip", [1, TINY_TEXT["num_hidden_layers"] - 1])
def test_clip_skip_is_an_earlier_layer_through_the_final_layer_norm(tiny, clip_skip):
    ref, ours = tiny
    ids = padded_ids(PROMPTS)
    hidden = ref(ids, output_hidden_states=True).hidden_states  # (embeddings, block 1, ..., block N)
    expected = ref.text_model.final_layer_norm(hidden[-1 - clip_skip])
    assert rel_err(ours(ids, clip_skip=clip_skip), expected) <= 1e-4


@torch.no_grad()
def test_gelu_variant_matches():
    ref = make_text_encoder(dict(TINY_TEXT, hidden_act="gelu"))
    ours = CLIPTextEncoder(TextEncoderConfig.from_transformers_config(ref.config.to_dict())).eval()
    ours.load_state_dict({k.removeprefix("text_model."): v for k, v in ref.state_dict().items()})
    ids = padded_ids(PROMPTS)
    assert rel_err(ours(ids), ref(ids).last_hidden_state) <= 1e-4


def test_config_from_state_dict(tiny):
    _, ours = tiny
    assert TextEncoderConfig.from_state_dict(ours.state_dict()) == TextEncoderConfig(
        width=128, layers=2, heads=2, mlp_width=256)


def test_config_from_transformers_config(tiny):
    ref, ours = tiny
    assert TextEncoderConfig.from_transformers_config(ref.config.to_dict()) == ours.config
    assert TextEncoderConfig.from_transformers_config(SD15_TEXT) == TextEncoderConfig.sd15()


def test_unsupported_activation_is_named():
    with pytest.raises(ValueError, match="relu"):
        TextEncoderConfig.from_transformers_config(dict(SD15_TEXT, hidden_act="relu"))


def test_position_ids_are_not_in_the_state_dict(tiny):
    assert not any("position_ids" in k for k in tiny[1].state_dict())


def test_rejects_too_many_tokens_and_bad_clip_skip(tiny):
    _, ours = tiny
    with pytest.raises(ValueError, match="context_length"):
        ours(torch.zeros(1, 78, dtype=torch.long))
    for clip_skip in (-1, TINY_TEXT["num_hidden_layers"]):
        with pytest.raises(ValueError, match="clip_skip"):
            ours(torch.zeros(1, 77, dtype=torch.long), clip_skip=clip_skip)


@pytest.mark.full_size
def test_sd15_parameter_count(sd15):
    _, ours = sd15
    assert ours.config == TextEncoderConfig.sd15()
    assert sum(p.numel() for p in ours.parameters()) == SD15_PARAMETERS["text_encoder"] == 123_060_480


@pytest.mark.full_size
@torch.no_grad()
def test_sd15_prompts_give_77_vectors_of_768_matching_the_reference(sd15):
    ref, ours = sd15
    ids = padded_ids(PROMPTS)
    out = ours(ids)
    assert out.shape == (2, 77, 768)
    assert rel_err(out, ref(ids).last_hidden_state) <= 1e-4
    expected = ref.text_model.final_layer_norm(ref(ids, output_hidden_states=True).hidden_states[-2])
    assert rel_err(ours(ids, clip_skip=1), expected) <= 1e-4
