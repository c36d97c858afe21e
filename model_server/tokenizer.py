"""Tokenizers through transformers, chat templates, and incremental detokenization."""
from __future__ import annotations

import functools
import os
import re
from typing import Any, Iterable, Optional, Sequence

REPLACEMENT_CHAR = "\ufffd"


class TokenizerError(Exception):
    """The tokenizer could not be loaded or cannot do what was asked (e.g. no chat template)."""


class Tokenizer:
    """Thin wrapper over a transformers tokenizer with the operations the server needs."""

    def __init__(self, hf_tokenizer: Any):
        self.hf = hf_tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (incl. added tokens)."""
        return len(self.hf)

    @property
    def eos_token_id(self) -> Optional[int]:
        return self.hf.eos_token_id

    @property
    def bos_token_id(self) -> Optional[int]:
        return self.hf.bos_token_id

    @property
    def pad_token_id(self) -> Optional[int]:
        return self.hf.pad_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return list(self.hf.convert_ids_to_tokens(list(ids)))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """The prompt text for `messages` rendered by the tokenizer's chat template."""
        if not self.has_chat_template:
            raise TokenizerError("this model's tokenizer has no chat template")
        try:
            return self.hf.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=add_generation_prompt, **kwargs)
        except Exception as e:  # jinja errors, bad roles raised by the template
            raise TokenizerError(f"chat template failed: {e}") from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    **kwargs: Any) -> list[int]:
        """Token ids of the chat prompt (the template already holds any special tokens)."""
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a single token stands for (byte-level BPE, <0xNN> byte fallback)."""
        return self._token_bytes(int(token_id))

    @functools.lru_cache(maxsize=65536)
    def _token_bytes(self, token_id: int) -> bytes:
        token = self.hf.convert_ids_to_tokens(token_id)
        if token is None:
            return b""
        if self._byte_level and all(c in _BYTE_DECODER for c in token):
            return bytes(_BYTE_DECODER[c] for c in token)
        m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", token)
        if m:
            return bytes([int(m.group(1), 16)])
        return token.replace("\u2581", " ").encode("utf-8")

    @functools.cached_property
    def _byte_level(self) -> bool:
        backend = getattr(self.hf, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None)
        return decoder is not None and "ByteLevel" in type(decoder).__name__ + repr(decoder)

    def detokenizer(self, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
                    ) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas without splitting UTF-8 characters.

    Decodes a small window (from `prefix_offset`) so that tokenizers that treat leading
    spaces specially decode correctly; while the decoded tail ends in U+FFFD (an incomplete
    multi-byte character) the delta is held back. `flush()` returns whatever is left.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids)[-6:]
        self.prefix_offset = max(len(self.ids) - 5, 0)
        self.read_offset = len(self.ids)
        self.text = ""  # all text emitted so far

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; returns the new text (possibly '')."""
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT_CHAR):
            delta = full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += delta
            return delta
        return ""

    def add_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.add(t) for t in token_ids)

    def flush(self) -> str:
        """Text held back so far (e.g. an incomplete character at the end), emitted as is."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        delta = full[len(prefix):] if len(full) > len(prefix) else ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """`AutoTokenizer.from_pretrained(path)` for a local directory."""
    from transformers import AutoTokenizer

    try:
        return Tokenizer(AutoTokenizer.from_pretrained(str(path)))
    except Exception as e:
        raise TokenizerError(f"cannot load a tokenizer from {path}: {e}") from e
