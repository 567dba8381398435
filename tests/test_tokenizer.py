"""The tokenizer gives exactly the ids of transformers' (slow, ftfy-based) CLIPTokenizer.

The reference is built on the same vocabulary: a session fixture writes the vendored BPE file out
as an official diffusers `tokenizer/` folder (vocab.json + merges.txt), and transformers loads it.
"""
import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import transformers

from sd_scratch.tokenizer import (
    CONTEXT_LENGTH,
    DEFAULT_BPE_PATH,
    END_OF_TEXT,
    START_OF_TEXT,
    CLIPTokenizer,
)
from tests.reference import write_tokenizer_folder
from tests.tokenizer_prompts import LONG, PROMPTS


@pytest.fixture(scope="session")
def tokenizer_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sd15") / "tokenizer"
    write_tokenizer_folder(DEFAULT_BPE_PATH, folder)
    return folder


@pytest.fixture(scope="session")
def reference(tokenizer_folder) -> transformers.CLIPTokenizer:
    return transformers.CLIPTokenizer(str(tokenizer_folder / "vocab.json"), str(tokenizer_folder / "merges.txt"))


@pytest.fixture(scope="session")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer()


def test_the_reference_is_the_ftfy_tokenizer(reference, tokenizer):
    assert reference.fix_text is not None, "transformers fell back to BasicTokenizer: ftfy is not installed"
    assert len(reference) == len(tokenizer.encoder) == 49408


def test_there_are_enough_varied_prompts():
    assert len(set(PROMPTS)) >= 200


@pytest.mark.parametrize("prompt", PROMPTS)
def test_encode_equals_transformers(tokenizer, reference, prompt):
    assert tokenizer.encode(prompt) == reference(prompt)["input_ids"]


def test_padded_batch_equals_transformers(tokenizer, reference):
    expected = reference(PROMPTS, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long prompts warn; that is tested below
        ids = tokenizer(PROMPTS)
    assert ids.dtype == torch.long and ids.shape == (len(PROMPTS), CONTEXT_LENGTH)
    assert ids.tolist() == expected["input_ids"]


def test_ids_of_the_official_sd_v1_tokenizer(tokenizer):
    # As printed by the official openai/clip-vit-large-patch14 tokenizer (and quoted widely).
    assert tokenizer.encode("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.encode("Hello, world!") == [49406, 3306, 267, 1002, 256, 49407]
    assert tokenizer.encoder["<|startoftext|>"] == START_OF_TEXT == 49406
    assert tokenizer.encoder["<|endoftext|>"] == END_OF_TEXT == 49407


def test_from_folder_equals_the_default(tokenizer, tokenizer_folder):
    from_folder = CLIPTokenizer.from_folder(tokenizer_folder)
    assert from_folder.encoder == tokenizer.encoder
    assert from_folder.merge_rank == CLIPTokenizer.from_bpe_file().merge_rank == tokenizer.merge_rank
    assert all(from_folder.encode(p) == tokenizer.encode(p) for p in PROMPTS)


def test_dreambeach_is_two_tokens_and_differs_from_dream_beach(tokenizer):
    # Document 004: one word is not always one token, and the word boundary is part of the token.
    # In CLIP the boundary is the `</w>` end-of-word mark, so "dream" differs, not "beach".
    glued, spaced = tokenizer.encode("dreambeach"), tokenizer.encode("dream beach")
    assert [tokenizer.decoder[i] for i in glued[1:-1]] == ["dream", "beach</w>"]
    assert [tokenizer.decoder[i] for i in spaced[1:-1]] == ["dream</w>", "beach</w>"]
    assert glued == [49406, 4595, 2117, 49407] and spaced == [49406, 2984, 2117, 49407]


def test_explain_shows_the_cleaning_the_bytes_and_each_merge(tokenizer):
    shown = tokenizer.explain("dreambeach")
    assert "pre-tokens  ['dreambeach']" in shown
    assert "d r e a m b e a c h</w>" in shown
    assert "merged 'dre' + 'am'" in shown and shown.endswith("ids         [49406, 4595, 2117, 49407]")
    assert "as bytes->unicode 'cafÃ©'" in tokenizer.explain("&amp; Café")


def test_pads_with_end_of_text_to_77(tokenizer):
    ids = tokenizer(["a photo of a cat", "dream beach"])
    assert ids.shape == (2, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == END_OF_TEXT).all() and (ids[1, 4:] == 49407).all()
    assert tokenizer("").tolist() == [[49406] + [49407] * 76]


def test_pad_id_is_a_choice(tokenizer):
    padded_with_zero = CLIPTokenizer(tokenizer.encoder, list(tokenizer.merge_rank), pad_id=0)
    assert padded_with_zero("a cat")[0, :4].tolist() == [49406, 320, 2368, 49407]
    assert (padded_with_zero("a cat")[0, 4:] == 0).all()


def test_a_single_string_is_a_batch_of_one(tokenizer):
    assert tokenizer("a cat").shape == (1, 77)
    assert tokenizer([]).shape == (0, 77)


def test_truncation_warns_and_names_the_dropped_words(tokenizer):
    prompt = "a photo of a cat " * 15 + "and the dropped tail"  # 75 tokens of cats, then 4 more
    with pytest.warns(UserWarning, match="dropped: 'and the dropped tail'"):
        ids = tokenizer(prompt)
    assert ids[0, -1] == END_OF_TEXT and ids[0, 1:76].tolist() == tokenizer.encode(prompt)[1:76]
    assert len(tokenizer.encode(prompt)) == 2 + 75 + 4  # encode itself never truncates


def test_exactly_75_tokens_do_not_warn(tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = tokenizer(("word " * 75).strip())
    assert ids[0].tolist() == [49406] + [tokenizer.encoder["word</w>"]] * 75 + [49407]
    with pytest.warns(UserWarning, match="dropped: 'word'"):
        tokenizer(("word " * 76).strip())


@pytest.mark.parametrize("prompt", LONG)
def test_a_prompt_warns_exactly_when_it_is_truncated(tokenizer, prompt):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokenizer(prompt)
    assert len(caught) == (1 if len(tokenizer.encode(prompt)) > CONTEXT_LENGTH else 0)


def test_decode_equals_transformers(tokenizer, reference):
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        assert tokenizer.decode(ids) == reference.decode(ids)
        assert tokenizer.decode(ids[1:-1]) == reference.decode(ids[1:-1])
    # The cleaned text comes back, with a space wherever a word ended.
    assert tokenizer.decode(tokenizer.encode("Fish &amp; Chips")) == "<|startoftext|>fish & chips <|endoftext|>"
    assert tokenizer.decode(torch.tensor([320, 2368])) == "a cat"


# ---- a missing or malformed tokenizer folder fails in words -----------------------------------

def test_missing_folder_or_file(tmp_path, tokenizer_folder):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_folder(tmp_path / "nowhere")
    shutil.copy(tokenizer_folder / "vocab.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        CLIPTokenizer.from_folder(tmp_path)


@pytest.mark.parametrize(
    "vocab_text, message",
    [
        ("{not json", "vocab.json is not valid JSON"),
        ('["a", "b"]', "vocab.json should be a JSON object"),
        ('{"a": "zero"}', "vocab.json should be a JSON object"),
        ('{"a": 0}', "vocab.json has no '<|startoftext|>'"),
    ],
)
def test_malformed_vocab(tmp_path, tokenizer_folder, vocab_text, message):
    (tmp_path / "vocab.json").write_text(vocab_text)
    shutil.copy(tokenizer_folder / "merges.txt", tmp_path)
    with pytest.raises(ValueError, match=re.escape(message)):
        CLIPTokenizer.from_folder(tmp_path)


@pytest.mark.parametrize(
    "merges_text, message",
    [
        ("i n\nt h\n", "should start with a '#version"),
        ("#version: 0.2\ni n\nthree symbols here\n", "line 3: expected two symbols"),
        ("#version: 0.2\ni n\nж ж\n", "line 3: expected two symbols whose join is in vocab.json"),
    ],
)
def test_malformed_merges(tmp_path, tokenizer_folder, merges_text, message):
    shutil.copy(tokenizer_folder / "vocab.json", tmp_path)
    (tmp_path / "merges.txt").write_text(merges_text, encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(message)):
        CLIPTokenizer.from_folder(tmp_path)
