"""From prompt strings to the text embeddings the UNet reads: (N, 77·chunks, width).

Mirrors `000 · 文生图` 步骤一 and `004 · 文本调节`: the tokenizer turns each prompt into the 77-id
row (start, up to 75 tokens, end, padding), the text encoder turns the row into 77 vectors.

Prompts are read in AUTOMATIC1111's syntax by default (`syntax="a1111"`; "plain" reads them as
text), as the prompts people share were written for it:

    (word)  weight × 1.1      [word]  weight ÷ 1.1      (word:1.5)  weight × 1.5     nesting multiplies
    \\( \\) \\[ \\] \\\\  literal brackets; an unclosed bracket closes at the end of the prompt
    BREAK   starts a new 75-token chunk

The weights act after the transformer, per 75-token chunk, as A1111's "Original" emphasis does:
z ← z · w, then z ← z · mean(z_before) / mean(z), the means over the batch encoded together (so
the weights move the tokens against each other, not the whole embedding's size). A prompt longer
than 75 tokens (or a BREAK-separated part of one) is truncated (with a warning naming the dropped
words) or, with `long_prompts="chunk"`, cut into chunks of 75 whose embeddings are concatenated along the token axis; a chunk
full within 20 tokens after a comma breaks after the comma (A1111's comma backtrack), and an
embedding's vectors are never split between chunks. `explain(tokenizer, text)` shows it all.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .tokenizer import CONTEXT_LENGTH, MAX_PROMPT_TOKENS, CLIPTokenizer

if TYPE_CHECKING:
    from .stable_diffusion import StableDiffusion

LONG_PROMPT_MODES = ("truncate", "chunk")
SYNTAXES = ("a1111", "plain")
EMPHASES = ("original", "no_norm")  # A1111's "Original" (mean restored) and "No norm"
ROUND_FACTOR = 1.1  # (word): A1111's attention multiplier; [word] divides by it
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack: tokens a chunk may hand on after its last comma
BREAK = "BREAK"

# Pieces of the syntax: an escaped character, an opening bracket, ":number)" (an explicit weight),
# a closing bracket, a run of ordinary text, and a lone ":" or "\".
_PIECE = re.compile(r"\\[()\[\]\\]|[(\[]|:\s*([+-]?[.\d]+)\s*\)|[)\]]|[^\\()\[\]:]+|[:\\]")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


@dataclass
class Fragment:
    """A run of prompt text and the weight its brackets give it (BREAK: the text "BREAK", weight None)."""

    text: str
    weight: float | None = 1.0


def parse_weights(prompt: str) -> list[Fragment]:
    """The prompt cut into runs of equal weight, as AUTOMATIC1111 reads `(…)`, `[…]`, `(…:w)`, escapes
    and BREAK. Each closing bracket multiplies the weights of everything since its opening one."""
    fragments: list[Fragment] = []
    open_brackets: list[tuple[str, int]] = []  # (kind, index of the first fragment inside)

    def close(kind: str, factor: float) -> None:
        for i in range(len(open_brackets) - 1, -1, -1):
            if open_brackets[i][0] == kind:
                _, start = open_brackets.pop(i)
                for f in fragments[start:]:
                    if f.weight is not None:
                        f.weight *= factor
                return
        fragments.append(Fragment({"(": ")", "[": "]"}[kind]))  # nothing to close: a literal bracket

    for match in _PIECE.finditer(prompt):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\") and len(piece) == 2:
            fragments.append(Fragment(piece[1]))
        elif piece in "([":
            open_brackets.append((piece, len(fragments)))
        elif weight is not None and any(kind == "(" for kind, _ in open_brackets):
            close("(", float(weight))
        elif piece == ")" and any(kind == "(" for kind, _ in open_brackets):
            close("(", ROUND_FACTOR)
        elif piece == "]" and any(kind == "[" for kind, _ in open_brackets):
            close("[", 1 / ROUND_FACTOR)
        else:
            for k, part in enumerate(_BREAK.split(piece)):
                if k:
                    fragments.append(Fragment(BREAK, None))
                fragments.append(Fragment(part))
    for kind, start in reversed(open_brackets):  # unclosed: closed at the end, innermost first
        for f in fragments[start:]:
            if f.weight is not None:
                f.weight *= ROUND_FACTOR if kind == "(" else 1 / ROUND_FACTOR
    merged: list[Fragment] = []
    for f in fragments:
        if merged and f.weight is not None and merged[-1].weight == f.weight:
            merged[-1].text += f.text
        else:
            merged.append(f)
    return merged or [Fragment("")]


# ---- prompt editing: [from:to:when], [to:when], [from::when], [a|b] ---------------------------------
#
# A prompt is parsed into a tree of pieces: text, a scheduled piece (`[from:to:when]`: from until
# step `when`, then to), an alternating piece (`[a|b|…]`: a at step 1, b at step 2, …) and brackets
# kept as text around their inside. Where a bracket does not parse as any of them, it stays as text
# (at the top level; inside another bracket that bracket fails in turn), as AUTOMATIC1111's grammar does.

_NUMBER = re.compile(r"\s*((?:\d+(?:\.\d*)?|\.\d+))\s*\]")
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")


@dataclass
class _Scheduled:
    before: list
    after: list
    when: str  # as written: with a dot a fraction of the steps, else a step number


@dataclass
class _Alternate:
    options: list


class _Fail(Exception):
    pass


def _parse_sequence(text: str, i: int, stops: str, top: bool) -> tuple[list, int]:
    """Pieces from text[i] up to (not including) a character of `stops` at this level."""
    out: list = []
    while i < len(text) and text[i] not in stops:
        if text[i] in "([":
            try:
                piece, i = _parse_bracket(text, i)
                out.append(piece)
                continue
            except _Fail:
                if not top:
                    raise
        if text[i] in "()[]:|" or (text[i] == "\\" and i + 1 == len(text)):
            if not top:
                raise _Fail
            out.append(text[i])  # a stray bracket at the top level is text
            i += 1
            continue
        m = _PLAIN.match(text, i)
        out.append(m.group(0))
        i = m.end()
    return out, i


def _parse_bracket(text: str, i: int) -> tuple[object, int]:
    """One bracketed piece starting at text[i] ("(" or "["); _Fail if it is none."""
    if text[i] == "(":
        inner, j = _parse_sequence(text, i + 1, ":)", top=False)
        if j < len(text) and text[j] == ":":
            weight, j = _parse_sequence(text, j + 1, ")", top=False)
            inner = inner + [":"] + weight
        if j >= len(text) or text[j] != ")":
            raise _Fail
        return ["(", *inner, ")"], j + 1
    first, j = _parse_sequence(text, i + 1, ":|]", top=False)
    if j >= len(text):
        raise _Fail
    if text[j] == "]":
        return ["[", *first, "]"], j + 1
    if text[j] == "|":
        options = [first]
        while j < len(text) and text[j] == "|":
            option, j = _parse_sequence(text, j + 1, "|]", top=False)
            options.append(option)
        if j >= len(text) or text[j] != "]":
            raise _Fail
        return _Alternate(options), j + 1
    # text[j] == ":": [to:when], [from:to:when] or [from::when]
    number = _NUMBER.match(text, j + 1)
    if number:
        return _Scheduled([], first, number.group(1)), number.end()
    second, k = _parse_sequence(text, j + 1, ":", top=False)
    number = _NUMBER.match(text, k + 1) if k < len(text) and text[k] == ":" else None
    if number is None:
        raise _Fail
    return _Scheduled(first, second, number.group(1)), number.end()


def _switch_steps(pieces: list, steps: int) -> set[int]:
    out: set[int] = set()
    for p in pieces:
        if isinstance(p, _Scheduled):
            when = float(p.when) * steps if "." in p.when else float(p.when)
            if min(steps, int(when)) >= 1:
                out.add(min(steps, int(when)))
            out |= _switch_steps(p.before, steps) | _switch_steps(p.after, steps)
        elif isinstance(p, _Alternate):
            out |= set(range(1, steps + 1))
        elif isinstance(p, list):
            out |= _switch_steps(p, steps)
    return out


def _text_at(pieces: list, step: int, steps: int) -> str:
    parts = []
    for p in pieces:
        if isinstance(p, _Scheduled):
            when = min(steps, int(float(p.when) * steps if "." in p.when else float(p.when)))
            parts.append(_text_at(p.before if step <= when else p.after, step, steps))
        elif isinstance(p, _Alternate):
            parts.append(_text_at(p.options[(step - 1) % len(p.options)], step, steps))
        elif isinstance(p, list):
            parts.append(_text_at(p, step, steps))
        else:
            parts.append(p)
    return "".join(parts)


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """[(last step, prompt text), …]: which text the prompt means at each of `steps` sampling steps
    (counted from 1), as AUTOMATIC1111's prompt editing reads it."""
    pieces, _ = _parse_sequence(prompt, 0, "", top=True)
    return [(step, _text_at(pieces, step, steps)) for step in sorted(_switch_steps(pieces, steps) | {steps})]


# ---- composition: "a cat AND a dog :0.6" (Liu et al. 2022, composable diffusion, as A1111 writes it)

_AND = re.compile(r"\bAND\b")
_PART_WEIGHT = re.compile(r"^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?\d*|\.\d+)))?\s*$", re.DOTALL)


def split_and(prompt: str) -> list[tuple[str, float]]:
    """The prompt's AND-separated parts, each with the weight a trailing `:w` gives it (default 1)."""
    parts = []
    for part in _AND.split(prompt):
        text, weight = _PART_WEIGHT.match(part).groups()
        parts.append((text, float(weight) if weight else 1.0))
    return parts


@dataclass
class Chunk:
    """Up to 75 token ids with their weights and where each came from."""

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    part: int = 0  # which BREAK-separated part of the prompt it belongs to

    def take(self, start: int) -> Chunk:
        """Cut off and return the tokens from `start` on."""
        rest = Chunk(self.ids[start:], self.weights[start:], self.sources[start:], self.part)
        del self.ids[start:], self.weights[start:], self.sources[start:]
        return rest


def _units(tokenizer: CLIPTokenizer, ids: list[int]) -> list[list[int]]:
    """`ids` as the units a chunk may not split: one token, or one embedding's run of placeholders."""
    starts = {run[0]: run for run in tokenizer.embeddings.values()}
    units, i = [], 0
    while i < len(ids):
        run = starts.get(ids[i])
        n = len(run) if run is not None and ids[i:i + len(run)] == run else 1
        units.append(ids[i:i + n])
        i += n
    return units


def chunks_of(tokenizer: CLIPTokenizer, prompt: str, syntax: str = "a1111") -> list[Chunk]:
    """The prompt's tokens in chunks of at most 75, with their weights (see the module docstring)."""
    fragments = parse_weights(prompt) if syntax == "a1111" else [Fragment(prompt)]
    comma = tokenizer.encoder[",</w>"]
    chunks, chunk, last_comma = [], Chunk(), -1

    def next_chunk(rest: Chunk | None = None, part: int | None = None) -> None:
        nonlocal chunk, last_comma
        chunks.append(chunk)
        chunk, last_comma = rest or Chunk(part=chunk.part if part is None else part), -1

    for f in fragments:
        if f.weight is None:  # BREAK
            next_chunk(part=chunk.part + 1)
            continue
        for unit in _units(tokenizer, tokenizer.encode(f.text)[1:-1]):
            if unit == [comma]:
                last_comma = len(chunk.ids)
            elif len(chunk.ids) == MAX_PROMPT_TOKENS and 0 <= last_comma and len(chunk.ids) - last_comma <= COMMA_BACKTRACK:
                next_chunk(rest=chunk.take(last_comma + 1))  # break after the comma, hand the rest on
            if len(chunk.ids) == MAX_PROMPT_TOKENS or len(chunk.ids) + len(unit) > MAX_PROMPT_TOKENS:
                next_chunk()  # full, or an embedding that does not fit whole
            chunk.ids += unit
            chunk.weights += [f.weight] * len(unit)
            chunk.sources += [f.text] * len(unit)
    if chunk.ids or not chunks:
        chunks.append(chunk)
    return chunks


def explain(tokenizer: CLIPTokenizer, prompt: str) -> str:
    """The prompt's fragments and weights, then each chunk's tokens with their weights."""
    lines = [f"prompt      {prompt!r}", "fragments   " + ", ".join(
        f"{f.text!r}" if f.weight is None else f"{f.text!r} ×{f.weight:.4g}" for f in parse_weights(prompt))]
    for n, chunk in enumerate(chunks_of(tokenizer, prompt)):
        lines.append(f"chunk {n}     {len(chunk.ids)} tokens")
        for i, w, src in zip(chunk.ids, chunk.weights, chunk.sources):
            token = tokenizer.decoder.get(i, f"<embedding {i}>")
            lines.append(f"    {token:<20} ×{w:<8.4g} from {src!r}")
    return "\n".join(lines)


def as_prompt_list(prompt: str | list[str], name: str) -> list[str]:
    """One prompt or a non-empty list of them, as a list; `name` is the parameter, for errors."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {prompt!r}")


def encode_prompts(sd: StableDiffusion, texts: list[str], clip_skip: int = 0, long_prompts: str = "truncate",
                   syntax: str = "a1111", emphasis: str = "original") -> torch.Tensor:
    """(len(texts), 77·chunks, width): one row of token embeddings per text, weighted as its syntax
    says; every text gets as many chunks as the longest (empty chunks pad the others)."""
    if long_prompts not in LONG_PROMPT_MODES:
        raise ValueError(f"long_prompts must be one of {LONG_PROMPT_MODES}, got {long_prompts!r}")
    if syntax not in SYNTAXES:
        raise ValueError(f"syntax must be one of {SYNTAXES}, got {syntax!r}")
    if emphasis not in EMPHASES:
        raise ValueError(f"emphasis must be one of {EMPHASES}, got {emphasis!r}")
    per_text = [chunks_of(sd.tokenizer, t, syntax) for t in texts]
    if long_prompts == "truncate":
        per_text = [_truncated(sd.tokenizer, chunks, text) for chunks, text in zip(per_text, texts)]
    n_chunks = max(len(c) for c in per_text)
    per_text = [c + [Chunk()] * (n_chunks - len(c)) for c in per_text]
    parts = []
    for k in range(n_chunks):
        chunk = [c[k] for c in per_text]
        ids = torch.tensor([sd.tokenizer.row(c.ids) for c in chunk], device=sd.device)  # (N, 77)
        z = sd.text_encoder(ids, clip_skip=clip_skip)  # (N, 77, C)
        weights = [[1.0, *c.weights] + [1.0] * (CONTEXT_LENGTH - 1 - len(c.weights)) for c in chunk]
        parts.append(apply_weights(z, torch.tensor(weights, device=z.device), emphasis))
    return torch.cat(parts, dim=1)


def apply_weights(z: torch.Tensor, weights: torch.Tensor, emphasis: str = "original") -> torch.Tensor:
    """z (N, 77, C) times each token's weight (N, 77); "original" then restores the mean over the
    whole batch (A1111's "Original" emphasis), "no_norm" does not. All weights 1 changes nothing."""
    if bool((weights == 1).all()):
        return z
    mean = z.float().mean()
    weighted = z * weights[..., None].to(z.dtype)
    if emphasis == "original":
        weighted = weighted * (mean / weighted.float().mean()).to(z.dtype)
    return weighted


def _truncated(tokenizer: CLIPTokenizer, chunks: list[Chunk], text: str) -> list[Chunk]:
    """Each BREAK-separated part's first 75 tokens as one chunk, with a warning naming what was dropped."""
    out = []
    for part in sorted({c.part for c in chunks}):
        mine = [c for c in chunks if c.part == part]
        ids = [i for c in mine for i in c.ids]
        if len(ids) > MAX_PROMPT_TOKENS:
            dropped = tokenizer.decode([i for i in ids[MAX_PROMPT_TOKENS:] if i in tokenizer.decoder])
            warnings.warn(f"prompt has {len(ids)} tokens in a chunk, the text encoder reads {MAX_PROMPT_TOKENS}; "
                          f"dropped: {dropped!r} (long_prompts='chunk' keeps them)", stacklevel=4)
        out.append(Chunk(ids[:MAX_PROMPT_TOKENS], [w for c in mine for w in c.weights][:MAX_PROMPT_TOKENS],
                         [s for c in mine for s in c.sources][:MAX_PROMPT_TOKENS], part))
    return out
