"""AUTOMATIC1111 hypernetwork files applied by us give the UNet output of diffusers' UNet on the same
random weights with the hypernetwork's formula written out here and put in front of every to_k and
to_v whose input width the file has; unloading gives the model's own output back exactly; hostile
and mismatched files are refused in words.

No package reads these files, so they are written here in A1111's layout (every tensor random), and
the formula is A1111's, per width w and for keys and values separately:
    c' = c + m · mlp(c),   mlp = per step: h·Wᵀ + b, activation (not after the last step unless
    activate_output), LayerNorm if is_layer_norm; dropout only holds a place in the key numbering.
"""
import copy
import math
import pickle

import pytest
import torch

import sd_scratch
from sd_scratch.checkpoints.files import CheckpointError
from tests.reference import rel_err

TOKENS = 9
# The tiny UNet's attentions read these widths: self-attention at its two attending levels' channels
# (32, 64; the middle is 64 too), cross-attention the text's 128.
WIDTHS = (32, 64, 128)

# The activations, written out (A1111's "swish" is the hard swish); prelu's slope is the file's.
ACTIVATIONS = {
    "relu": lambda h, a: h.clamp(min=0),
    "leakyrelu": lambda h, a: torch.where(h > 0, h, 0.01 * h),
    "elu": lambda h, a: torch.where(h > 0, h, torch.exp(h) - 1),
    "swish": lambda h, a: h * (h + 3).clamp(0, 6) / 6,
    "tanh": lambda h, a: torch.tanh(h),
    "sigmoid": lambda h, a: 1 / (1 + torch.exp(-h)),
    "mish": lambda h, a: h * torch.tanh(torch.log1p(torch.exp(h))),
    "prelu": lambda h, a: torch.where(h > 0, h, a * h),
}


def random_module(width: int, meta: dict, g: torch.Generator, old_names: bool = False):
    """(state dict in A1111's numbering, the steps for the formula) of one key or value MLP. The
    numbering counts every entry of A1111's sequence: Linear, activation, LayerNorm, dropout."""
    structure = meta.get("layer_structure", [1, 2, 1])
    activation = meta.get("activation_func")
    steps = len(structure) - 1
    dropout = meta.get("dropout_structure")
    if dropout is None:  # A1111's rule: after every step but the last two; the second-last with last_layer_dropout
        use, last = meta.get("use_dropout", False), meta.get("last_layer_dropout", False)
        dropout = [0] + [0.3 * (use and (i < steps - 2 or (i == steps - 2 and last))) for i in range(steps)]
    state, formula_steps, n = {}, [], 0
    for i in range(steps):
        w_in, w_out = int(width * structure[i]), int(width * structure[i + 1])
        W = torch.randn(w_out, w_in, generator=g) / math.sqrt(w_in)
        b = 0.1 * torch.randn(w_out, generator=g)
        state[f"linear.{n}.weight"], state[f"linear.{n}.bias"] = W, b
        n += 1
        act = slope = None
        if activation not in (None, "linear") and (i < steps - 1 or meta.get("activate_output", True)):
            act = ACTIVATIONS.get(activation)  # None for one the reader must refuse
            if activation == "prelu":
                slope = 0.25 + 0.1 * torch.randn(1, generator=g)
                state[f"linear.{n}.weight"] = slope
            n += 1
        norm = None
        if meta.get("is_layer_norm", False):
            norm = 1 + 0.1 * torch.randn(w_out, generator=g), 0.1 * torch.randn(w_out, generator=g)
            state[f"linear.{n}.weight"], state[f"linear.{n}.bias"] = norm
            n += 1
        n += i + 1 < len(dropout) and dropout[i + 1] > 0
        formula_steps.append((W, b, act, slope, norm))
    if old_names:  # NovelAI's [1, 2, 1] files: linear1, linear2
        state = {k.replace("linear.0.", "linear1.").replace("linear.1.", "linear2."): t for k, t in state.items()}
    return state, formula_steps


def write_hypernetwork(path, meta: dict, widths=(64, 128), seed: int = 0, old_names: bool = False):
    """An A1111 hypernetwork file with `meta` as its metadata; returns {width: (k steps, v steps)}."""
    g = torch.Generator().manual_seed(seed)
    contents, steps = dict(meta), {}
    for w in widths:
        (k_state, k_steps), (v_state, v_steps) = (random_module(w, meta, g, old_names) for _ in "kv")
        contents[w], steps[w] = (k_state, v_state), (k_steps, v_steps)
    torch.save(contents, path)
    return steps


def mlp_formula(c: torch.Tensor, steps, m: float) -> torch.Tensor:
    h = c
    for W, b, act, slope, norm in steps:
        h = h @ W.T + b
        if act is not None:
            h = act(h, slope)
        if norm is not None:
            gamma, beta = norm
            mean = h.mean(-1, keepdim=True)
            var = ((h - mean) ** 2).mean(-1, keepdim=True)
            h = (h - mean) / torch.sqrt(var + 1e-5) * gamma + beta
    return c + m * h


def reference_eps(tiny_models, x, t, context, files):
    """diffusers' UNet with each file's formula in front of to_k and to_v; `files`: [(steps, m)] in
    load order. Returns (ε, how many to_k/to_v inputs were rewritten)."""
    from diffusers.models.attention_processor import Attention

    unet = copy.deepcopy(tiny_models["unet"])
    calls = []

    def rewrite(width, which):
        def hook(module, args):
            c = args[0]
            for steps, m in files:
                if width in steps:
                    c = mlp_formula(c, steps[width][which], m)
                    calls.append(width)
            return (c,)
        return hook

    for attn in (module for module in unet.modules() if isinstance(module, Attention)):
        attn.to_k.register_forward_pre_hook(rewrite(attn.to_k.in_features, 0))
        attn.to_v.register_forward_pre_hook(rewrite(attn.to_v.in_features, 1))
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=context).sample, len(calls)


def inputs(seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor(500), torch.randn(2, TOKENS, 128, generator=g)


@pytest.fixture
def ours(tiny_checkpoint):
    return sd_scratch.load(tiny_checkpoint["folder"])


@pytest.fixture(scope="module")
def plain_eps(tiny_models):
    """diffusers' UNet on `inputs()` with no hypernetwork."""
    return reference_eps(tiny_models, *inputs(), [])[0]


CASES = {
    "novelai, no metadata, linear1/linear2": (dict(), (32, 64, 128), True),
    "relu, output not activated": (dict(layer_structure=[1, 2, 1], activation_func="relu", activate_output=False,
                                        is_layer_norm=False, use_dropout=False), (128,), False),
    "leakyrelu, layer norm, dropout after both hidden steps": (
        dict(layer_structure=[1, 1.5, 2, 1], activation_func="leakyrelu", is_layer_norm=True, activate_output=True,
             use_dropout=True, last_layer_dropout=True), WIDTHS, False),
    "swish, layer norm, a given dropout_structure": (
        dict(layer_structure=[1, 2, 1], activation_func="swish", is_layer_norm=True, activate_output=False,
             use_dropout=True, dropout_structure=[0, 0.1, 0]), (64, 128), False),
    "linear, four steps": (dict(layer_structure=[1, 2, 0.5, 2, 1], activation_func="linear", use_dropout=True,
                                last_layer_dropout=False), (128,), False),
    **{f"{name}, output activated": (dict(layer_structure=[1, 2, 1], activation_func=name, activate_output=True),
                                     (64, 128), False)
       for name in ("elu", "tanh", "sigmoid", "mish", "prelu")},
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_hypernetwork_gives_diffusers_unet_with_the_formula_on_keys_and_values(case, ours, tiny_models, plain_eps,
                                                                                 tmp_path):
    meta, widths, old_names = CASES[case]
    meta = dict(meta, name="style", step=2000, sd_checkpoint=None, weight_initialization="Normal") if meta else {}
    path = tmp_path / "style.pt"
    steps = write_hypernetwork(path, meta, widths, old_names=old_names)
    x, t, context = inputs()
    ours.load_hypernetwork(path, multiplier=0.8)
    with torch.no_grad():
        got = ours.unet(x, t, context)
    want, rewritten = reference_eps(tiny_models, x, t, context, [(steps, 0.8)])
    assert rewritten > 0
    assert rel_err(got, want) <= 1e-4
    assert rel_err(plain_eps, want) > 1e-2  # the hypernetwork changed the output


def test_the_key_numbering_is_a1111s(tmp_path):
    """The writer above against A1111's sequence counted by hand: [1, 2, 1], relu, layer norm, dropout
    asked for but not after the last hidden step: Linear 0, ReLU 1, LayerNorm 2, Linear 3, LayerNorm 4.
    [1, 2, 2, 1], relu, dropout with last_layer_dropout: Linear 0, ReLU 1, Dropout 2, Linear 3, ReLU 4,
    Dropout 5, Linear 6."""
    g = torch.Generator().manual_seed(0)
    state, _ = random_module(8, dict(layer_structure=[1, 2, 1], activation_func="relu", is_layer_norm=True,
                                     activate_output=False, use_dropout=True, last_layer_dropout=False), g)
    assert sorted(state) == [f"linear.{n}.{p}" for n in (0, 2, 3, 4) for p in ("bias", "weight")]
    state, _ = random_module(8, dict(layer_structure=[1, 2, 2, 1], activation_func="relu", activate_output=False,
                                     use_dropout=True, last_layer_dropout=True), g)
    assert sorted(state) == [f"linear.{n}.{p}" for n in (0, 3, 6) for p in ("bias", "weight")]


def test_several_hypernetworks_apply_one_after_another(ours, tiny_models, tmp_path):
    first = write_hypernetwork(tmp_path / "a.pt", dict(activation_func="relu", is_layer_norm=True), (64, 128), seed=1)
    second = write_hypernetwork(tmp_path / "b.pt", dict(layer_structure=[1, 1, 1], activation_func="tanh"),
                                (32, 128), seed=2)
    x, t, context = inputs()
    ours.load_hypernetwork(tmp_path / "a.pt", 0.5).load_hypernetwork(tmp_path / "b.pt", 1.5)
    with torch.no_grad():
        got = ours.unet(x, t, context)
    want, _ = reference_eps(tiny_models, x, t, context, [(first, 0.5), (second, 1.5)])
    assert rel_err(got, want) <= 1e-4


def test_unloading_gives_the_models_own_output_exactly_and_the_weights_are_untouched(ours, tmp_path):
    write_hypernetwork(tmp_path / "style.pt", dict(activation_func="relu"), WIDTHS)
    x, t, context = inputs()
    keys = ours.unet.state_dict().keys()
    with torch.no_grad():
        before = ours.unet(x, t, context)
        ours.load_hypernetwork(tmp_path / "style.pt")
        assert ours.unet.state_dict().keys() == keys  # the MLPs are not modules of the UNet
        assert rel_err(ours.unet(x, t, context), before) > 1e-2
        ours.unload_hypernetwork()
        assert torch.equal(ours.unet(x, t, context), before)


class _Payload:
    def __reduce__(self):
        import os
        return os.system, ("touch ran-code",)


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_a_hostile_pickle_named_pt_runs_nothing(how, ours, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "style.pt"
    contents = {128: ({"linear.0.weight": _Payload()}, {}), "layer_structure": [1, 2, 1]}
    if how == "torch.save":
        torch.save(contents, path)
    else:
        path.write_bytes(pickle.dumps(contents))
    with pytest.raises(CheckpointError, match=r"style\.pt: .*(not allowed|not unpickled)"):
        ours.load_hypernetwork(path)
    assert not (tmp_path / "ran-code").exists()


@pytest.mark.parametrize("meta, widths, message", [
    (dict(activation_func="softmax"), (128,),
     r"bad\.pt: activation_func 'softmax' is not one read here; expected one of linear, relu, leakyrelu"),
    (dict(layer_structure=[2, 1]), (128,),
     r"bad\.pt: layer_structure is \[2, 1\]; expected a list of positive width multiples that starts and ends with 1"),
    (dict(use_dropout=True, dropout_structure=[0, 0.3]), (128,),
     r"bad\.pt: dropout_structure is \[0, 0\.3\]; expected one rate per entry of layer_structure \[1, 2, 1\]"),
    (dict(), (768, 128),
     r"bad\.pt: has modules for context widths \[768\], which no attention of this model reads "
     r"\(its widths are \[32, 64, 128\]: cross-attention 128"),
])
def test_a_file_that_cannot_be_used_is_refused_naming_it_and_the_expectation(meta, widths, message, ours, tmp_path):
    write_hypernetwork(tmp_path / "bad.pt", meta, widths)
    with pytest.raises(CheckpointError, match=message):
        ours.load_hypernetwork(tmp_path / "bad.pt")


def test_metadata_that_disagrees_with_the_keys_is_refused_naming_the_key(ours, tmp_path):
    write_hypernetwork(tmp_path / "bad.pt", dict(activation_func="relu"), (128,))
    contents = torch.load(tmp_path / "bad.pt")
    contents["is_layer_norm"] = True  # the keys have no LayerNorm
    torch.save(contents, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"bad\.pt: the 128-wide keys module does not have the layout its "
                                              r"settings give \(.*is_layer_norm True.*\): linear\.3\.bias None "
                                              r"\(expected \(128,\)\)"):
        ours.load_hypernetwork(tmp_path / "bad.pt")


def test_an_embedding_file_is_not_taken_for_a_hypernetwork(ours, tmp_path):
    torch.save({"string_to_param": {"*": torch.randn(1, 128)}, "name": "cat"}, tmp_path / "cat.pt")
    with pytest.raises(CheckpointError, match=r"cat\.pt: has no module per context width \(integer keys such as 768\)"):
        ours.load_hypernetwork(tmp_path / "cat.pt")
