"""Tokenizer: text <-> token ids, the way MiMo-V2-Flash's checkpoint defines them.

MiMo uses a Qwen-style **byte-level BPE**, like Qwen2/Qwen3 (the model card's chat format is
their ChatML; a GGUF conversion of the checkpoint lists it as a Qwen2 tokenizer). Byte-level means the alphabet is the 256
possible bytes, each drawn as a printable stand-in character (byte 0x20, the space, is `Ġ`;
0x0A, the newline, is `Ċ`). UTF-8 text is first turned into bytes, so *any* string can be encoded
and nothing is ever "unknown". BPE then merges the most frequent adjacent pairs into new
symbols, learned once from a corpus (the split below is one small vocabulary's):

    "hi 🙂"  --utf-8-->  68 69 20 F0 9F 99 82  --merges-->  [h][i][ĠðŁ][Ļ][Ĥ]  -> ids

The emoji's four bytes may land in several tokens, so decoding a *single* token can give half a
character. `IncrementalDecoder` below is the streaming decoder that copes with that.

Around the learned vocabulary sit the special tokens of the chat format (`<|im_start|>`,
`<|im_end|>`, `<|endoftext|>`, `<think>`, `</think>`): each is one id, matched verbatim in the
text before BPE runs. Their ids are read from the checkpoint's `tokenizer.json` /
`tokenizer_config.json` at run time, never written into this code: the Qwen2 numbering
(`<|im_end|>` = 151645, ...) is a likely guess for MiMo, not a fact we checked.

Because `encode` turns every marker string into its id, it must never see text that a user typed
inside a chat: `encode_chat` builds a chat prompt with the template's markers as ids and every
message's content as plain text.

The model's embedding has 152576 rows, more than the tokenizer has tokens: the extra rows are
padding and never produced by `encode`.

This module also trains a tiny tokenizer of the same kind (`train_bpe_tokenizer`) and writes it
in the hub's file layout (`save_tokenizer`), so that tests and notebooks exercise the real
loading path without downloading the 150k-token original.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

from .chat import ENDOFTEXT, IM_END, IM_START, THINK_END, THINK_START, chat_segments

DEFAULT_SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, THINK_START, THINK_END]

# How text is cut into words before BPE (the Qwen2 pattern): English contractions, runs of letters
# with at most one leading non-letter, single digits (so numbers are spelled digit by digit),
# runs of punctuation, newlines, and whitespace. A merge never crosses a cut.
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class Tokenizer:
    """A checkpoint's tokenizer: `tokenizers.Tokenizer` plus the special tokens its config names.

        tok = Tokenizer.from_pretrained("path/to/MiMo-V2-Flash")
        ids = tok.encode("<|im_start|>user\\nhi<|im_end|>\\n")   # the markers are one id each
        tok.decode(ids)                                         # -> the same text
        tok.eos_token_ids                                       # stop generation on any of these

    `backend` is the wrapped `tokenizers.Tokenizer`; the rest of minimimo uses only this class.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        eos_token: str | None = None,
        pad_token: str | None = None,
        bos_token: str | None = None,
        source: str = "tokenizer",
    ):
        self.backend = backend
        self._plain_backend: tokenizers.Tokenizer | None = None  # made by `encode_plain` when needed
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.bos_token = bos_token
        for role, token in (("eos_token", eos_token), ("pad_token", pad_token), ("bos_token", bos_token)):
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"{source}: {role} {token!r} is not in the vocabulary")

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "Tokenizer":
        """Read `tokenizer.json` (required) and `tokenizer_config.json` (when present).

        `tokenizer.json` holds everything needed to encode: normalizer, pre-tokenizer, BPE
        vocabulary and merges, the added (special) tokens with their ids. `tokenizer_config.json`
        adds which of those tokens play the roles eos / pad / bos.
        """
        directory = Path(directory)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {tokenizer_file}")
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))

        config_file = directory / "tokenizer_config.json"
        if not config_file.is_file():
            return cls(backend, source=str(tokenizer_file))
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_file}: not valid JSON ({err})") from None
        # `chat_template` (a Jinja program) is deliberately not read: minimimo spells the chat
        # format out in Python in `chat.py`, where it can be read, tested and explained.
        _check_added_tokens(backend, config.get("added_tokens_decoder", {}), config_file)
        return cls(
            backend,
            eos_token=_token_content(config.get("eos_token")),
            pad_token=_token_content(config.get("pad_token")),
            bos_token=_token_content(config.get("bos_token")),
            source=str(config_file),
        )

    # ------------------------------------------------------------------ text <-> ids
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings in `text` (`<|im_start|>`, ...) become their
        single id whatever `add_special_tokens` says: that flag only asks the post-processor to
        add a template's tokens (none for MiMo, which has no bos)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of `text` read as plain text: a special-token string in it is spelled with
        ordinary tokens (`<|im_start|>` -> `<`, `|`, `im`, ...), so text from a user can never
        produce a marker. `decode` gives the same string back.

        It runs a copy of the backend with `encode_special_tokens` set (the switch `tokenizers`
        offers for this), made once, so that the shared backend is never flipped back and forth.
        """
        if self._plain_backend is None:
            self._plain_backend = tokenizers.Tokenizer.from_str(self.backend.to_str())
            self._plain_backend.encode_special_tokens = True
        return self._plain_backend.encode(text, add_special_tokens=False).ids

    def encode_chat(self, messages: list[dict], *, enable_thinking: bool = False, add_generation_prompt: bool = True,
                    system_prompt: str | None = None, date: datetime.date | None = None) -> list[int]:
        """The chat prompt of `messages` (see `chat.chat_segments` for the format and options) as ids.

        The template's markers become their ids; everything between them, every message's content
        included, is encoded as plain text (`encode_plain`). Markers split the text into pieces that
        are encoded on their own anyway, so for messages without marker strings the ids are exactly
        `encode(format_chat(messages))`.
        """
        segments = chat_segments(messages, add_generation_prompt=add_generation_prompt,
                                 enable_thinking=enable_thinking, system_prompt=system_prompt, date=date)
        ids, text = [], ""
        for piece, is_marker in segments:
            if not is_marker:
                text += piece  # neighbouring texts are encoded together, as in the joined string
                continue
            ids += self.encode_plain(text) + [self.token_id(piece)]
            text = ""
        return ids + self.encode_plain(text)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Note the default: `tokenizers` itself drops special tokens unless told
        not to; we keep them, so that a decoded chat shows its `<|im_end|>` and `<think>`."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        """The id of one token string, e.g. `token_id("<|im_end|>")`."""
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return token_id

    def incremental_decoder(self, skip_special_tokens: bool = False) -> "IncrementalDecoder":
        """A fresh streaming decoder (see `IncrementalDecoder`)."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ special ids
    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer knows, added tokens included (less than the embedding's rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end generation: the config's eos token, plus `<|im_end|>` when the vocabulary
        has it, because a chat reply ends its turn with `<|im_end|>`, not with eos."""
        ids = []
        for token in (self.eos_token, IM_END):
            token_id = None if token is None else self.backend.token_to_id(token)
            if token_id is not None and token_id not in ids:
                ids.append(token_id)
        return ids

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.token_id(self.pad_token)

    @property
    def bos_token_id(self) -> int | None:
        """None for MiMo: like Qwen, it starts a sequence with no bos token."""
        return None if self.bos_token is None else self.token_id(self.bos_token)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}, pad={self.pad_token!r}, "
                f"bos={self.bos_token!r})")


class IncrementalDecoder:
    """Turns a stream of token ids into printable text pieces, one `push` per generated id.

    Decoding each id on its own is wrong for byte-level BPE: a character's UTF-8 bytes may be
    spread over several tokens, and half a character decodes to the replacement character
    U+FFFD ("�"). So we hold text back while it ends in U+FFFD and print it once the character
    is complete:

        ids        [ĠðŁ]       [Ļ]        [Ĥ]
        bytes      20 F0 9F    99         82
        decode     " �"        " �"       " 🙂"
        push ->    ""          ""         " 🙂"

    Two offsets into the ids seen so far make this cheap: text before `_read_offset` has been
    printed; `_prefix_offset` is where the last printed piece began. Each step decodes the short
    window `ids[_prefix_offset:]` and prints whatever it adds beyond `ids[_prefix_offset:
    _read_offset]`. (Decoding from a little before the new ids, rather than from the new ids
    alone, also suits decoders that drop a leading space from the first token, like
    SentencePiece's; byte-level BPE does not, but the method is the general one.)
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" while a character is still partial)."""
        self._ids.append(token_id)
        printed = self._decode(self._ids[self._prefix_offset:self._read_offset])
        window = self._decode(self._ids[self._prefix_offset:])
        if window.endswith("\ufffd") or len(window) <= len(printed):
            return ""  # hold back: a partial character (or nothing new, e.g. a skipped special)
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return window[len(printed):]

    def flush(self) -> str:
        """At the end of the stream: whatever is still held back, partial characters included."""
        printed = self._decode(self._ids[self._prefix_offset:self._read_offset])
        window = self._decode(self._ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self._ids)
        return window[len(printed):]


# ---------------------------------------------------------------------- training and saving
def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: list[str] = DEFAULT_SPECIAL_TOKENS,
) -> tokenizers.Tokenizer:
    """Learn a Qwen-style byte-level BPE tokenizer from `texts` (deterministic for the same input).

    The pipeline is the one Qwen2/Qwen3 ship in their `tokenizer.json`:
      normalizer      NFC (one spelling per accented letter)
      pre-tokenizer   split by `QWEN_SPLIT_PATTERN`, then map bytes to the 256 byte symbols
      model           BPE, starting from all 256 byte symbols (so any text encodes, even bytes
                      absent from `texts`), merging until `vocab_size` tokens or no pair repeats
      decoder         byte symbols -> bytes -> UTF-8 text

    The special tokens take the first ids (0, 1, ...) here; in the Qwen/MiMo vocabulary they sit
    after the ~151k learned tokens. Code that reads ids from the files does not care. (Qwen3 marks
    `<think>`/`</think>` as not special, so `decode(..., skip_special_tokens=True)` keeps them;
    here every token of `special_tokens` is special.)
    """
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def save_tokenizer(
    tokenizer: tokenizers.Tokenizer,
    directory: str | Path,
    *,
    eos_token: str = ENDOFTEXT,
    pad_token: str = ENDOFTEXT,
    model_max_length: int = 262144,  # the model's max_position_embeddings
) -> Path:
    """Write `tokenizer.json` and `tokenizer_config.json` in the hub's form; return the directory.

    The config names the roles (no bos, eos, pad) and lists every added token with its id in
    `added_tokens_decoder`, as the Qwen/MiMo files do. `tokenizer_class` is the generic
    `PreTrainedTokenizerFast`, which makes transformers load `tokenizer.json` as written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for role, token in (("eos_token", eos_token), ("pad_token", pad_token)):
        if tokenizer.token_to_id(token) is None:
            raise ValueError(f"{role} {token!r} is not in the vocabulary")
    tokenizer.save(str(directory / "tokenizer.json"))
    added_tokens = {
        str(token_id): {
            "content": token.content,
            "lstrip": token.lstrip,
            "normalized": token.normalized,
            "rstrip": token.rstrip,
            "single_word": token.single_word,
            "special": token.special,
        }
        for token_id, token in sorted(tokenizer.get_added_tokens_decoder().items())
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos_token,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": pad_token,
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return directory


# ---------------------------------------------------------------------- helpers
def _token_content(entry: Any) -> str | None:
    """`"<|endoftext|>"`, `{"content": "<|endoftext|>", ...}` or null -> the token string or None."""
    if entry is None or isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    raise ValueError(f"a special token should be a string or {{'content': ...}}, got {entry!r}")


def _check_added_tokens(backend: tokenizers.Tokenizer, added_tokens: dict[str, Any], file: Path) -> None:
    """Every token of the config's `added_tokens_decoder` must have the same id in tokenizer.json.

    Two files that disagree about an id would give a marker one id when we build a prompt and
    another in the checkpoint's own view of it, so we stop instead of picking one.
    """
    for key, entry in added_tokens.items():
        content = _token_content(entry)
        found = backend.token_to_id(content)
        if found != int(key):
            raise ValueError(f"{file}: added token {content!r} has id {key} here but "
                             f"{'is absent' if found is None else f'id {found}'} in tokenizer.json")
