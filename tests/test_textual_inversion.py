"""Textual-inversion embeddings in each file format give the text-encoder output diffusers'
`load_textual_inversion` gives on the same random weights; hostile or mismatched files are refused."""
import copy
import pickle

import pytest
import torch
from safetensors.torch import save_file

import sd_scratch
from sd_scratch.checkpoints.files import CheckpointError
from tests.reference import rel_err

WIDTH = 128  # the tiny text encoder's
PROMPT = "a photo of {} on the beach, <cat-toy> again"


def vectors(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(seed))


def write(fmt: str, v: torch.Tensor, path):
    if fmt == "a1111":
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": "x", "step": 1000}, path)
    elif fmt == "a1111-old":  # what A1111 saved in 2022: the vectors inside a pickled nn.ParameterDict
        params = torch.nn.ParameterDict({"*": torch.nn.Parameter(v.clone())})
        torch.save({"string_to_token": {"*": 265}, "string_to_param": params, "name": "x", "step": 1000,
                    "sd_checkpoint": "81761151", "sd_checkpoint_name": "v1-5-pruned-emaonly"}, path)
    elif fmt == "kohya":
        save_file({"emb_params": v}, str(path))
    else:  # diffusers' learned_embeds
        save_file({"<cat-toy>": v[0] if len(v) == 1 else v}, str(path))
    return path


def reference_hidden_states(tiny_models, tokenizer_folder, v, token, prompt):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    models = copy.deepcopy(tiny_models)
    pipe = StableDiffusionPipeline(vae=models["vae"], text_encoder=models["text_encoder"],
                                   tokenizer=CLIPTokenizer.from_pretrained(tokenizer_folder), unet=models["unet"],
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.load_textual_inversion({token: v[0] if len(v) == 1 else v}, token=token)
    prompt = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)  # a multi-vector token becomes tok tok_1 ...
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids).last_hidden_state


@pytest.mark.parametrize("fmt,n", [("a1111", 1), ("a1111", 3), ("a1111-old", 1), ("a1111-old", 2), ("kohya", 2),
                                   ("diffusers", 1), ("diffusers", 4)])
def test_an_embedding_file_gives_diffusers_text_encoding(fmt, n, tiny_models, tiny_checkpoint, tmp_path):
    v = vectors(n, seed=n)
    path = write(fmt, v, tmp_path / ("cat-toy.pt" if fmt.startswith("a1111") else "cat-toy.safetensors"))
    ours = sd_scratch.load(tiny_checkpoint["folder"])
    word = ours.load_textual_inversion(path, token="<cat-toy>")
    prompt = PROMPT.format(word)
    with torch.no_grad():
        got = ours.text_encoder(ours.tokenizer([prompt]))
    want = reference_hidden_states(tiny_models, tiny_checkpoint["folder"] / "tokenizer", v, "<cat-toy>", prompt)
    assert rel_err(got, want) <= 1e-4
    plain = sd_scratch.load(tiny_checkpoint["folder"])
    with torch.no_grad():
        assert rel_err(plain.text_encoder(plain.tokenizer([prompt])), want) > 1e-2  # the vectors were used


def test_the_name_is_the_file_name_and_the_weights_are_untouched(tiny_checkpoint, tmp_path):
    ours = sd_scratch.load(tiny_checkpoint["folder"])
    before = {k: t.clone() for k, t in ours.text_encoder.state_dict().items()}
    assert ours.load_textual_inversion(write("kohya", vectors(2), tmp_path / "easynegative.safetensors")) == "easynegative"
    ids = ours.tokenizer.encode("easynegative, blurry")
    assert ids[1:3] == [49408, 49409]  # two placeholders past the vocabulary
    assert ours.text_encoder.state_dict().keys() == before.keys()
    assert all(torch.equal(t, before[k]) for k, t in ours.text_encoder.state_dict().items())


def test_an_embedding_of_another_width_is_refused_naming_both(tiny_checkpoint, tmp_path):
    ours = sd_scratch.load(tiny_checkpoint["folder"])
    path = tmp_path / "sd2-style.safetensors"
    save_file({"emb_params": torch.zeros(2, 1024)}, str(path))
    with pytest.raises(CheckpointError, match=r"sd2-style\.safetensors: its vectors are 1024 wide, this text encoder's are 128"):
        ours.load_textual_inversion(path)


class _Payload:
    def __reduce__(self):
        import os
        return os.system, ("touch ran-code",)


def test_a_hostile_pickle_named_pt_runs_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "style.pt"
    path.write_bytes(pickle.dumps({"string_to_param": {"*": _Payload()}}))
    ours = sd_scratch.load(tiny_checkpoint["folder"])
    with pytest.raises(CheckpointError, match="style.pt"):
        ours.load_textual_inversion(path)
    assert not (tmp_path / "ran-code").exists()


def test_a_hostile_pickle_inside_an_old_parameter_dict_runs_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors(1))})
    params.smuggled = _Payload()  # pickled with the module's state, past the file-format check
    path = tmp_path / "old-style.pt"
    torch.save({"string_to_param": params}, path)
    ours = sd_scratch.load(tiny_checkpoint["folder"])
    with pytest.raises(CheckpointError, match=r"old-style\.pt: its pickle references `\w+\.system` which is not allowed"):
        ours.load_textual_inversion(path)
    assert not (tmp_path / "ran-code").exists()
