"""Training the add-ons users bring, with the model frozen: a textual-inversion embedding and a LoRA.

Both learn with document 003's loss, ‖ε − ε_θ(x_t, t, c)‖² (`losses.DiffusionLoss`), on a handful of pictures, and change
nothing of the model's own weights; they differ in what is trained (`004 · 嵌入`, `004 · LoRA`):

    textual inversion  n new vectors in the token-embedding space, standing for one new word
                       (`Embeddings.extra_vectors`); everything else frozen
    LoRA               for chosen Linear and Conv2d layers W, two thin matrices: the layer computes
                       W x + (α / r) · up(down(x)), with down (r × in), up (out × r), up starting at 0

What they write is what users download: the embedding as kohya's `{"emb_params": (n, width)}`, the
LoRA in kohya's layout (`lora_unet_…`/`lora_te_….lora_down.weight`, `.lora_up.weight`, `.alpha`),
so `sd.load_textual_inversion` and `sd.load_lora` read them like any file from Civitai.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from ..addons.lora import ALPHA, DOWN, UP, module_names
from .losses import DiffusionLoss

if TYPE_CHECKING:
    from ..stable_diffusion import StableDiffusion


def freeze(sd: StableDiffusion) -> None:
    for part in (sd.text_encoder, sd.unet, sd.vae):
        part.requires_grad_(False)


# ---- textual inversion ------------------------------------------------------------------------------

def train_embedding(sd: StableDiffusion, latents: torch.Tensor, prompts: Callable[[torch.Generator], list[str]],
                    word: str, init_word: str, vectors: int = 2, steps: int = 400, batch: int = 16,
                    lr: float = 5e-3, seed: int = 0) -> torch.Tensor:
    """Learn `vectors` vectors for `word` so that prompts naming it give `latents`' pictures.

    The vectors start as copies of `init_word`'s embedding; the word is registered in the tokenizer
    as a loaded embedding would be, so `prompts(generator)` (a batch of captions with the word in
    them) is tokenised exactly as at inference. Returns the (vectors, width) tensor; the word stays
    loaded in `sd` with the trained vectors."""
    embeddings, tokenizer = sd.text_encoder.embeddings, sd.tokenizer
    init_ids = tokenizer.encode(init_word)[1:-1]
    if len(init_ids) != 1:
        raise ValueError(f"init_word {init_word!r} must be one token, it is {len(init_ids)}")
    if embeddings.extra_vectors is not None:
        raise ValueError("train the embedding on a model with no other embedding loaded")
    start = embeddings.token_embedding.weight[init_ids[0]].detach()
    learned = start.repeat(vectors, 1).clone().requires_grad_(True)  # (vectors, width)
    vocab = embeddings.token_embedding.num_embeddings
    tokenizer.embeddings[tuple(tokenizer.encode(word)[1:-1])] = list(range(vocab, vocab + vectors))
    freeze(sd)
    optimizer = torch.optim.AdamW([learned], lr=lr, weight_decay=0.0)
    generator, loss_of = torch.Generator().manual_seed(seed), DiffusionLoss(sd.text_encoder, sd.unet)
    for _ in range(steps):
        embeddings.extra_vectors = learned  # a leaf that needs grad: the lookup passes gradients to it
        index = torch.randint(0, len(latents), (batch,), generator=generator)
        loss = loss_of(latents[index], tokenizer(prompts(generator)), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    embeddings.extra_vectors = learned.detach()
    return learned.detach().clone()


# ---- LoRA ------------------------------------------------------------------------------------------------

class LowRank(nn.Module):
    """The trainable change of one layer: x -> (α / r) · up(down(x)). For a Conv2d, down has the
    layer's kernel, stride and padding and up is 1×1 (LoCon); up starts at zero, so the change does."""

    def __init__(self, layer: nn.Module, rank: int, alpha: float):
        super().__init__()
        if isinstance(layer, nn.Linear):
            self.down = nn.Linear(layer.in_features, rank, bias=False)
            self.up = nn.Linear(rank, layer.out_features, bias=False)
        else:
            self.down = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, bias=False)
            self.up = nn.Conv2d(rank, layer.out_channels, 1, bias=False)
        nn.init.zeros_(self.up.weight)
        self.scale = alpha / rank
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.down(x))


def attach_lora(sd: StableDiffusion, rank: int, alpha: float, wanted: Callable[[str], bool]):
    """A LowRank beside every Linear/Conv2d whose kohya name passes `wanted`, added to its output
    by a forward hook. Returns ({kohya name: LowRank}, hook handles to remove)."""
    adapters, handles, seen = {}, [], set()
    for name, (layer, _) in module_names(sd).items():
        if id(layer) in seen or not wanted(name):  # module_names lists UNet layers under two names
            continue
        seen.add(id(layer))
        adapter = LowRank(layer, rank, alpha).to(layer.weight.device)
        handles.append(layer.register_forward_hook(lambda m, args, out, a=adapter: out + a(args[0])))
        adapters[name] = adapter
    return adapters, handles


def lora_tensors(adapters: dict[str, LowRank]) -> dict[str, torch.Tensor]:
    """kohya's layout: `<name>.lora_down.weight` (r, in[, k, k]), `.lora_up.weight` (out, r[, 1, 1]), `.alpha`."""
    out = {}
    for name, a in adapters.items():
        out[name + DOWN] = a.down.weight.detach().clone()
        out[name + UP] = a.up.weight.detach().clone()
        out[name + ALPHA] = torch.tensor(float(a.alpha))
    return out


def train_lora(sd: StableDiffusion, latents: torch.Tensor, prompts: Callable[[torch.Tensor, torch.Generator], list[str]],
               wanted: Callable[[str], bool], rank: int = 4, alpha: float = 4.0, steps: int = 600, batch: int = 16,
               lr: float = 2e-3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Train a LoRA on `latents` with `prompts(index, generator)` their captions; the model stays
    frozen and unchanged (the hooks are removed at the end). Returns the file's tensors."""
    freeze(sd)
    torch.manual_seed(seed)  # the down matrices' initial values
    adapters, handles = attach_lora(sd, rank, alpha, wanted)
    parameters = [p for a in adapters.values() for p in a.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    generator, loss_of = torch.Generator().manual_seed(seed), DiffusionLoss(sd.text_encoder, sd.unet)
    try:
        for _ in range(steps):
            index = torch.randint(0, len(latents), (batch,), generator=generator)
            loss = loss_of(latents[index], sd.tokenizer(prompts(index, generator)), generator=generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        for handle in handles:
            handle.remove()
    return lora_tensors(adapters)
