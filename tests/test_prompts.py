"""AUTOMATIC1111's prompt syntax: the parser against its documented behaviour, the chunks, and the
weighted embeddings against the formula computed by hand on transformers' CLIPTextModel; the
images against diffusers' pipeline fed those embeddings."""
import copy

import pytest
import torch
from safetensors.torch import save_file

import sd_scratch
from sd_scratch.prompts import MAX_PROMPT_TOKENS, chunks_of, explain, parse_weights
from tests.reference import SD15_SCHEDULER_CONFIG, rel_err
from tests.test_pipelines import as_uint8, assert_close_images, reference_uint8

# AUTOMATIC1111's prompt_parser doctests, restated: (prompt, [(text, weight), ...]); BREAK's weight None.
PARSER_CASES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("[unbalanced", [("unbalanced", 1 / 1.1)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", None), ("b", 1.0)]),
    ("]stray) :1.2)", [("]stray) :1.2)", 1.0)]),
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize("prompt,expected", PARSER_CASES)
def test_the_parser_reads_a1111s_syntax(prompt, expected):
    assert [(f.text, f.weight) for f in parse_weights(prompt)] == expected


@pytest.fixture(scope="module")
def ours(tiny_checkpoint):
    return sd_scratch.load(tiny_checkpoint["folder"])


def test_break_starts_a_chunk_and_a_full_chunk_breaks_after_its_last_comma(ours):
    tok = ours.tokenizer
    assert [len(c.ids) for c in chunks_of(tok, "a red circle BREAK a blue square")] == [3, 3]
    words = " ".join(["red"] * 70)
    chunks = chunks_of(tok, f"{words}, circle square triangle star moon sun tree house")  # 70 + 1 + 8
    assert [len(c.ids) for c in chunks] == [71, 8]  # the chunk broke after the comma at 71, not at 75
    far = chunks_of(tok, " ".join(["red"] * 40) + ", " + " ".join(["blue"] * 40))  # comma 41 tokens back
    assert [len(c.ids) for c in far] == [75, 6]


def test_an_embedding_is_never_split_between_chunks(ours, tmp_path):
    sd = copy.deepcopy(ours)
    save_file({"emb_params": torch.randn(3, 128)}, str(tmp_path / "trio.safetensors"))
    sd.load_textual_inversion(tmp_path / "trio.safetensors")
    chunks = chunks_of(sd.tokenizer, " ".join(["red"] * 73) + " trio")
    assert [len(c.ids) for c in chunks] == [73, 3]  # 73 + 3 > 75: the whole embedding moves on
    assert "trio" in explain(sd.tokenizer, "a (trio:1.2)") or "embedding" in explain(sd.tokenizer, "a (trio:1.2)")


def weighted_by_hand(reference_text, tokenizer_folder, fragments, negative=False):
    """Transformers' tokenizer on each fragment, the 77-id row, CLIPTextModel's hidden states, the
    weights multiplied in and the mean restored (AUTOMATIC1111's Original emphasis)."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder)
    ids, weights = [tokenizer.bos_token_id], [1.0]
    for text, w in fragments:
        pieces = tokenizer(text, add_special_tokens=False).input_ids
        ids, weights = ids + pieces, weights + [w] * len(pieces)
    ids += [tokenizer.eos_token_id] * (77 - len(ids))
    weights += [1.0] * (77 - len(weights))
    with torch.no_grad():
        z = reference_text(torch.tensor([ids])).last_hidden_state
    w = torch.tensor([weights])[..., None]
    return z * w * (z.mean() / (z * w).mean())


def test_weighted_embeddings_equal_the_formula_on_transformers_hidden_states(ours, tiny_models, tiny_checkpoint):
    prompt = "a (red:1.5) circle, [blue] square ((small))"
    fragments = [(f.text, f.weight) for f in parse_weights(prompt)]
    assert fragments == [("a ", 1.0), ("red", 1.5), (" circle, ", 1.0), ("blue", 1 / 1.1), (" square ", 1.0),
                         ("small", 1.1 * 1.1)]
    cond, uncond = ours.encode_prompt(prompt, "blurry")
    expected = weighted_by_hand(tiny_models["text_encoder"], tiny_checkpoint["folder"] / "tokenizer", fragments)
    assert rel_err(cond, expected) <= 1e-5
    plain, _ = ours.encode_prompt(prompt, None, prompt_syntax="plain")
    assert rel_err(plain, expected) > 1e-3  # the syntax is what changed it
    no_norm, _ = ours.encode_prompt(prompt, None, emphasis="no_norm")
    assert rel_err(no_norm * (expected.mean() / no_norm.mean()), expected) <= 1e-5


def reference_pipeline(tiny_models, tiny_checkpoint):
    """diffusers' pipeline on a copy of the reference models, DDIM from the official config."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    models = copy.deepcopy(tiny_models)
    pipe = StableDiffusionPipeline(vae=models["vae"], text_encoder=models["text_encoder"],
                                   tokenizer=CLIPTokenizer.from_pretrained(tiny_checkpoint["folder"] / "tokenizer"),
                                   unet=models["unet"], scheduler=DDIMScheduler.from_config(SD15_SCHEDULER_CONFIG),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_images_equal_diffusers_fed_the_same_embeddings(ours, tiny_models, tiny_checkpoint):
    pipe = reference_pipeline(tiny_models, tiny_checkpoint)
    prompt, negative = "a (red:1.4) circle BREAK on a [[green]] background", "(blurry:1.3)"
    cond, uncond = ours.encode_prompt(prompt, negative)
    assert cond.shape[1] == 2 * 77 and uncond.shape == cond.shape  # BREAK: two chunks; uncond padded
    images = ours.txt2img(prompt, negative, height=32, width=32, steps=5, seed=4, progress=False)
    expected = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=32, width=32, num_inference_steps=5,
                    generator=torch.Generator("cpu").manual_seed(4), output_type="np")
    assert_close_images(as_uint8(images), reference_uint8(expected))


def test_a_long_prompt_is_truncated_with_a_warning_unless_chunked(ours):
    long_prompt = " ".join(["red"] * 80) + " hidden"
    with pytest.warns(UserWarning, match="hidden"):
        cond, _ = ours.encode_prompt(long_prompt, None)
    assert cond.shape[1] == 77
    cond, _ = ours.encode_prompt(long_prompt, None, long_prompts="chunk")
    assert cond.shape[1] == 2 * 77
    assert MAX_PROMPT_TOKENS == 75


# ---- prompt editing ------------------------------------------------------------------------------

def alternating(options: list[str], steps: int = 10) -> list[tuple[int, str]]:
    return [(k, options[(k - 1) % len(options)]) for k in range(1, steps + 1)]


# AUTOMATIC1111's get_learned_conditioning_prompt_schedules doctests, restated: 10 steps.
SCHEDULE_CASES = [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", alternating(["a", "(b:1.1)"])),
    ("[fe|]male", alternating(["female", "male"])),
    ("[fe|||]male", alternating(["female", "male", "male", "male"])),
]


@pytest.mark.parametrize("prompt,expected", SCHEDULE_CASES)
def test_prompt_editing_schedules_read_as_a1111_reads_them(prompt, expected):
    from sd_scratch.prompts import prompt_schedule

    assert prompt_schedule(prompt, 10) == expected


def test_an_edited_prompt_switches_its_embeddings_where_diffusers_is_told_to(ours, tiny_models, tiny_checkpoint):
    """[red:blue:3] over 6 steps: "red" for steps 1–3, "blue" from step 4. The reference is diffusers'
    pipeline started on "a red circle" whose embeddings a step callback swaps for "a blue circle"'s
    after step 3."""
    pipe = reference_pipeline(tiny_models, tiny_checkpoint)
    blue, negative = pipe.encode_prompt("a blue circle", "cpu", 1, True, "blurry")

    def swap(pipeline, i, t, tensors):
        return {"prompt_embeds": torch.cat([negative, blue])} if i == 2 else {}

    expected = pipe("a red circle", negative_prompt="blurry", height=32, width=32, num_inference_steps=6,
                    generator=torch.Generator("cpu").manual_seed(8), output_type="np",
                    callback_on_step_end=swap, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    images = ours.txt2img("a [red:blue:3] circle", "blurry", height=32, width=32, steps=6, seed=8, progress=False)
    assert_close_images(as_uint8(images), reference_uint8(expected))
    unedited = ours.txt2img("a red circle", "blurry", height=32, width=32, steps=6, seed=8, progress=False)
    assert (as_uint8(unedited) != as_uint8(images)).any()
    assert images[0].info["parameters"].startswith("a [red:blue:3] circle\n")


# ---- AND -------------------------------------------------------------------------------------------

def test_and_splits_a_prompt_into_weighted_parts():
    from sd_scratch.prompts import split_and

    assert split_and("a cat AND a dog :0.6") == [("a cat", 1.0), (" a dog", 0.6)]  # trailing spaces go
    assert split_and("(word:1.2) AND ANDROID") == [("(word:1.2)", 1.0), (" ANDROID", 1.0)]
    assert split_and("no composition") == [("no composition", 1.0)]


def test_and_composes_the_predictions_as_the_formula_on_diffusers_parts(ours, tiny_models, tiny_checkpoint):
    """ε = ε_u + w · Σ_k weight_k (ε_k − ε_u), each ε from diffusers' UNet on diffusers' own text
    embeddings, stepped by diffusers' DDIM and decoded by its VAE, by hand."""
    import numpy as np

    pipe = reference_pipeline(tiny_models, tiny_checkpoint)
    parts, w, steps, seed = [("a red circle", 1.0), ("a blue square", 0.6)], 7.5, 5, 6
    embeds = [pipe.encode_prompt(text, "cpu", 1, True, "blurry") for text, _ in parts]
    uncond = embeds[0][1]
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(seed))
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps_u = pipe.unet(x, t, uncond).sample
            eps = eps_u + w * sum(weight * (pipe.unet(x, t, cond).sample - eps_u)
                                  for (cond, _), (_, weight) in zip(embeds, parts))
            x = scheduler.step(eps, t, x).prev_sample
        image = pipe.vae.decode(x / 0.18215).sample
    expected = ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    images = ours.txt2img("a red circle AND a blue square :0.6", "blurry", height=32, width=32, steps=steps,
                          seed=seed, progress=False)
    assert np.abs(as_uint8(images) - expected.astype(np.int16)).max() <= 2
