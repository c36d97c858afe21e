"""The engine's view of the model's tokenizer."""
from __future__ import annotations

from typing import Any

from model_server.engine.types import InvalidRequest
from model_server.tokenizer import Tokenizer


class EngineTokenizer(Tokenizer):
    """The model's tokenizer: `model_server.tokenizer.Tokenizer`'s methods, and everything of
    the underlying Hugging Face tokenizer (`len()`, `eos_token`, ...) by delegation.

    A text too long for the context window is refused before it is tokenized (a 10 MB prompt
    took 22 s of CPU to tokenize): no token covers more characters than the longest entry of
    the vocabulary, so a text over twice `max_seq_len` times that cannot fit."""

    def __init__(self, hf_tokenizer: Any, max_seq_len: int) -> None:
        super().__init__(hf_tokenizer)
        self.max_seq_len = max_seq_len
        longest = max(map(len, hf_tokenizer.get_vocab()), default=1)
        self.max_text_chars = 2 * max_seq_len * max(longest, 1)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > self.max_text_chars:
            raise InvalidRequest(f"the prompt has {len(text)} characters, more than this model's context "
                                 f"window of {self.max_seq_len} tokens can hold", "prompt")
        return super().encode(text, add_special_tokens)

    def __getattr__(self, name: str) -> Any:
        if name == "hf":
            raise AttributeError(name)
        return getattr(self.hf, name)

    def __len__(self) -> int:
        return len(self.hf)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs: Any) -> Any:
        """The wrapper's (text, TokenizerError on failure); with `tokenize=...` given, HF's."""
        if "tokenize" in kwargs:
            return self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                               **kwargs)
        return super().apply_chat_template(messages, add_generation_prompt, **kwargs)
