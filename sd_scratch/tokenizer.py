"""CLIP's byte-level BPE tokenizer: a prompt becomes 77 integer ids.

Mirrors `004 · 标记器(Tokenizer)`: the prompt is cut into tokens the CLIP model saw in training, a
word is not always one token ("dreambeach" is two), where a word ends is part of the token, and
SD v1 takes at most 75 tokens. The steps, top to bottom:

1. clean: `ftfy.fix_text` (mojibake, HTML entities, full-width forms, curly quotes), every run of
   whitespace to one space, lower case. The text is first cut around the literal special-token
   strings and each piece is cleaned on its own, as transformers 4.57's slow `CLIPTokenizer` does
   (it matters: ftfy leaves `&amp;` alone in a text that contains both `<` and `>`).
2. pre-tokenize with CLIP's regex: letter runs, single digits, runs of other non-space characters.
3. write each pre-token's UTF-8 bytes as printable characters (`bytes_to_unicode`), so the BPE
   works on strings yet any text can be encoded: 'café' becomes 'cafÃ©', '🏖' 'ðŁıĸ'.
4. BPE: start from single characters, the last marked `</w>` (end of word), and keep merging the
   adjacent pair that comes first in the merges list until no listed pair is left.
5. look the pieces up in the vocabulary, add start and end tokens, pad to 77.

`python -m sd_scratch.tokenizer` shows the work for document 004's example. Where 004 says the
space becomes part of "[space]beach", CLIP marks the end of the word before it: "dream" is a
different token from "dream</w>", while "beach</w>" is the same in both.

    text        'dreambeach'
    cleaned     'dreambeach'
    pre-tokens  ['dreambeach']
      'dreambeach' as bytes->unicode 'dreambeach'
        d r e a m b e a c h</w>
        d re a m b e a c h</w>       merged 'r' + 'e'
        d re a m b e ac h</w>        merged 'a' + 'c'
        d re am b e ac h</w>         merged 'a' + 'm'
        d re am be ac h</w>          merged 'b' + 'e'
        dre am be ac h</w>           merged 'd' + 're'
        dre am be ach</w>            merged 'ac' + 'h</w>'
        dre am beach</w>             merged 'be' + 'ach</w>'
        dream beach</w>              merged 'dre' + 'am'
    ids         [49406, 4595, 2117, 49407]

    text        'dream beach'
    cleaned     'dream beach'
    pre-tokens  ['dream', 'beach']
      'dream' as bytes->unicode 'dream'
        d r e a m</w>
        d re a m</w>                 merged 'r' + 'e'
        d re am</w>                  merged 'a' + 'm</w>'
        dre am</w>                   merged 'd' + 're'
        dream</w>                    merged 'dre' + 'am</w>'
      'beach' as bytes->unicode 'beach'
        b e a c h</w>
        b e ac h</w>                 merged 'a' + 'c'
        be ac h</w>                  merged 'b' + 'e'
        be ach</w>                   merged 'ac' + 'h</w>'
        beach</w>                    merged 'be' + 'ach</w>'
    ids         [49406, 2984, 2117, 49407]
"""

import gzip
import json
import warnings
from pathlib import Path

import ftfy
import regex
import torch

# The vocabulary file vendored from open_clip (OpenAI CLIP's `bpe_simple_vocab_16e6.txt.gz`).
DEFAULT_BPE_PATH = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"

# OpenAI CLIP's simple_tokenizer.py keeps `merges[1 : 49152 - 256 - 2 + 1]` of the file: 48894 merges.
# The vocabulary is 256 byte symbols, the same 256 + `</w>`, one token per merge, then the two special
# tokens: 49408 entries, the text encoder's `vocab_size`.
NUM_MERGES = 49152 - 256 - 2
START_TOKEN, END_TOKEN = "<|startoftext|>", "<|endoftext|>"
START_OF_TEXT = 49406  # id of <|startoftext|>, the second-to-last vocabulary entry
END_OF_TEXT = 49407  # id of <|endoftext|>, the last; SD v1's tokenizer also pads with it
CONTEXT_LENGTH = 77  # CLIP ViT-L/14 text encoder's max_position_embeddings
MAX_PROMPT_TOKENS = CONTEXT_LENGTH - 2  # 75: what is left after the start and end tokens

SPECIAL_SPLIT = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")  # case-sensitive, as transformers
# OpenAI CLIP's pre-tokenizer: special tokens, English contractions, letter runs, single digits,
# and runs of anything else that is not whitespace.
PRETOKENIZE = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)


def bytes_to_unicode() -> dict[int, str]:
    """Map each of the 256 byte values to a printable, non-whitespace character.

    The 188 bytes that are already visible Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') stand
    for themselves; the other 68 (controls, space, soft hyphen...) get 'Ā' (256), 'ā' (257), ... in
    order. Dict order is the order of the first 256 vocabulary ids.
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    hidden = [b for b in range(256) if b not in visible]
    return {b: chr(b) for b in visible} | {b: chr(256 + n) for n, b in enumerate(hidden)}


def clean_text(text: str) -> str:
    """ftfy fix, whitespace runs -> one space, strip, lower case (transformers' CLIPTokenizer with ftfy)."""
    return regex.sub(r"\s+", " ", ftfy.fix_text(text)).strip().lower()


def merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Replace every non-overlapping occurrence of `pair` in `word`, left to right, by one symbol."""
    merged, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(word[i] + word[i + 1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return tuple(merged)


def read_bpe_file(path: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges from OpenAI's gzipped merges file, built as CLIP's `simple_tokenizer` does."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : NUM_MERGES + 1]  # line 0 is a "#version" header
    merges = [tuple(line.split()) for line in lines]
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges]
    tokens += [START_TOKEN, END_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, merges


def read_folder(path: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges from a diffusers `tokenizer/` folder: vocab.json (token -> id) and merges.txt."""
    folder = Path(path)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    for file in (vocab_file, merges_file):
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found; a CLIP tokenizer folder holds vocab.json and merges.txt")
    try:
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{vocab_file} is not valid JSON ({e}); expected an object token -> id") from e
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise ValueError(f"{vocab_file} should be a JSON object mapping token strings to integer ids")
    for special in (START_TOKEN, END_TOKEN):
        if special not in vocab:
            raise ValueError(f"{vocab_file} has no {special!r} entry; expected a CLIP vocabulary")
    lines = merges_file.read_text(encoding="utf-8").strip().split("\n")
    if not lines[0].startswith("#version"):
        raise ValueError(f"{merges_file} should start with a '#version: ...' line, got {lines[0][:40]!r}")
    merges = []
    for n, line in enumerate(lines[1 : NUM_MERGES + 1], start=2):
        pair = tuple(line.split())
        if len(pair) != 2 or "".join(pair) not in vocab:
            raise ValueError(
                f"{merges_file} line {n}: expected two symbols whose join is in vocab.json, got {line!r}"
            )
        merges.append(pair)
    return vocab, merges


class CLIPTokenizer:
    """Text -> ids for SD v1's CLIP text encoder. `tok("a cat")` is a [1, 77] LongTensor."""

    def __init__(
        self,
        vocab: dict[str, int] | None = None,
        merges: list[tuple[str, str]] | None = None,
        pad_id: int = END_OF_TEXT,
    ) -> None:
        """With no vocab and merges, loads the vendored default (`from_bpe_file()`)."""
        if vocab is None or merges is None:
            vocab, merges = read_bpe_file(DEFAULT_BPE_PATH)
        self.encoder = vocab
        self.decoder = {i: token for token, i in vocab.items()}
        self.merge_rank = {pair: rank for rank, pair in enumerate(merges)}  # lower rank merges first
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.start_id, self.end_id, self.pad_id = vocab[START_TOKEN], vocab[END_TOKEN], pad_id
        self.cache: dict[str, tuple[str, ...]] = {}
        # textual-inversion embeddings: the ids of a name -> the placeholder ids that replace them
        self.embeddings: dict[tuple[int, ...], list[int]] = {}

    @classmethod
    def from_bpe_file(cls, path: str | Path | None = None, pad_id: int = END_OF_TEXT) -> "CLIPTokenizer":
        return cls(*read_bpe_file(path or DEFAULT_BPE_PATH), pad_id=pad_id)

    @classmethod
    def from_folder(cls, path: str | Path, pad_id: int = END_OF_TEXT) -> "CLIPTokenizer":
        return cls(*read_folder(path), pad_id=pad_id)

    def bpe(self, word: str, steps: list | None = None) -> tuple[str, ...]:
        """A byte-encoded pre-token -> vocabulary pieces; `steps`, if given, gets (pair, result) per merge."""
        if word in (START_TOKEN, END_TOKEN):
            return (word,)
        if word in self.cache and steps is None:
            return self.cache[word]
        symbols = (*word[:-1], word[-1] + "</w>")
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda pair: self.merge_rank.get(pair, float("inf")))
            if best not in self.merge_rank:
                break
            symbols = merge_pair(symbols, best)
            if steps is not None:
                steps.append((best, symbols))
        self.cache[word] = symbols
        return symbols

    def pretokenize(self, text: str) -> list[str]:
        """Cleaned regex pieces of `text`; special-token strings are cut out first and kept whole."""
        pieces = []
        for part in SPECIAL_SPLIT.split(text):
            pieces += [part] if part in (START_TOKEN, END_TOKEN) else PRETOKENIZE.findall(clean_text(part))
        return pieces

    def byte_encode(self, piece: str) -> str:
        return "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))

    def encode(self, text: str) -> list[int]:
        """Ids of `text` with start and end tokens, neither padded nor truncated. The ids of a loaded
        embedding's name are replaced by its placeholder ids (longest name first)."""
        pieces = [token for piece in self.pretokenize(text) for token in self.bpe(self.byte_encode(piece))]
        return [self.start_id, *self.substitute_embeddings([self.encoder[t] for t in pieces]), self.end_id]

    def substitute_embeddings(self, ids: list[int]) -> list[int]:
        """`ids` with every run that spells an embedding's name replaced by its placeholders."""
        if not self.embeddings:
            return ids
        names = sorted(self.embeddings, key=len, reverse=True)
        out, i = [], 0
        while i < len(ids):
            name = next((n for n in names if tuple(ids[i:i + len(n)]) == n), None)
            if name is None:
                out.append(ids[i])
                i += 1
            else:
                out += self.embeddings[name]
                i += len(name)
        return out

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Ids back to text; `</w>` becomes a space. Special tokens are written out as their strings."""
        text = "".join(self.decoder[int(i)] for i in ids)
        text = bytes(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")  # as transformers
        return text.replace("</w>", " ").strip()

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """[B, 77] LongTensor: start, up to 75 prompt tokens, end, then pad_id. Warns when it truncates."""
        texts = [texts] if isinstance(texts, str) else texts
        rows = []
        for text in texts:
            ids = self.encode(text)[1:-1]
            if len(ids) > MAX_PROMPT_TOKENS:
                warnings.warn(
                    f"prompt has {len(ids)} tokens, SD v1 uses {MAX_PROMPT_TOKENS}; "
                    f"dropped: {self.decode(ids[MAX_PROMPT_TOKENS:])!r}",
                    stacklevel=2,
                )
            rows.append(self.row(ids[:MAX_PROMPT_TOKENS]))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), CONTEXT_LENGTH)

    def row(self, ids: list[int]) -> list[int]:
        """The 77 ids the text encoder reads for up to 75 prompt ids: start, the ids, end, then this
        tokenizer's pad id (SD v1's CLIP pads with the end id, 49407; other families with 0)."""
        if len(ids) > MAX_PROMPT_TOKENS:
            raise ValueError(f"a row holds at most {MAX_PROMPT_TOKENS} prompt ids, got {len(ids)}")
        row = [self.start_id, *ids, self.end_id]
        return row + [self.pad_id] * (CONTEXT_LENGTH - len(row))

    def explain(self, text: str) -> str:
        """Each step of `encode` for `text`, as printable lines."""
        lines = [f"text        {text!r}", f"cleaned     {clean_text(text)!r}"]
        pieces = self.pretokenize(text)
        lines.append(f"pre-tokens  {pieces}")
        for piece in pieces:
            if piece in (START_TOKEN, END_TOKEN):
                lines.append(f"  {piece!r} special token, kept whole")
                continue
            word = self.byte_encode(piece)
            lines.append(f"  {piece!r} as bytes->unicode {word!r}")
            steps: list = []
            self.bpe(word, steps)
            lines.append("    " + " ".join((*word[:-1], word[-1] + "</w>")))
            for (first, second), symbols in steps:
                lines.append(f"    {' '.join(symbols):<28} merged {first!r} + {second!r}")
        lines.append(f"ids         {self.encode(text)}")
        return "\n".join(lines)


if __name__ == "__main__":
    tokenizer = CLIPTokenizer()
    for prompt in ("dreambeach", "dream beach"):
        print(tokenizer.explain(prompt), end="\n\n")
