"""Tokenizer loading, chat templates and incremental detokenization."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from model_server.tokenizer import REPLACEMENT_CHAR, TokenizerError, load_tokenizer

TEXTS = ["héllo 世界 🙂", "The quick brown fox 🚀✨ jumps", "naïve café — ça va? こんにちは", "plain ascii"]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def test_round_trip(tok):
    assert tok.vocab_size == 384
    assert tok.eos_token_id == tok.hf.convert_tokens_to_ids("<|endoftext|>")
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_chat_template(tok):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo"}]
    text = tok.apply_chat_template(messages)
    assert text == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhéllo<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tok.encode_chat(messages)
    assert ids[0] == tok.hf.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert not tok.apply_chat_template(messages, add_generation_prompt=False).endswith("assistant\n")


def test_no_chat_template(tokenizer_dir, tmp_path):
    for f in tokenizer_dir.iterdir():
        if f.name != "chat_template.jinja":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    t = load_tokenizer(tmp_path)
    t.hf.chat_template = None
    with pytest.raises(TokenizerError, match="no chat template"):
        t.apply_chat_template([{"role": "user", "content": "x"}])


def test_load_missing(tmp_path):
    with pytest.raises(TokenizerError):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer(tok, text):
    ids = tok.encode(text)
    detok = tok.detokenizer()
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == text == detok.text
    assert not any(REPLACEMENT_CHAR in d for d in deltas)
    if any(len(c.encode()) > 1 for c in text):
        # some token ended inside a multi-byte character and was held back
        assert "" in deltas[:-1]


def test_holds_back_partial_character(tok):
    ids = tok.encode("🙂")
    assert len(ids) > 1  # the emoji spans several byte-level tokens
    detok = tok.detokenizer()
    assert [detok.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1]) == "🙂"
    # an unfinished character at the very end comes out on flush
    detok = tok.detokenizer()
    assert detok.add(ids[0]) == ""
    assert detok.flush() == REPLACEMENT_CHAR


def test_detokenizer_with_prompt_and_special_tokens(tok):
    prompt = tok.encode("héllo")
    completion = tok.encode(" 世界 🙂") + [tok.eos_token_id]
    detok = tok.detokenizer(prompt_ids=prompt)
    assert detok.add_many(completion) + detok.flush() == " 世界 🙂"
    keep = tok.detokenizer(prompt_ids=prompt, skip_special_tokens=False)
    assert keep.add_many(completion) + keep.flush() == " 世界 🙂<|endoftext|>"


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    """A tokenizer built as Llama 2's and TinyLlama's are: SentencePiece-style BPE over
    '▁'-marked words, byte fallback (<0xNN> pieces) for characters outside its vocabulary,
    and a decoder that turns '▁' into spaces and strips the sequence's first one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_pieces = [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog.", "Hello world, naive cafe."] * 4,
                            trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                special_tokens=["<unk>", "<s>", "</s>"] + byte_pieces))
    spec = json.loads(tok.to_str())  # the byte pieces are ordinary vocabulary, as in Llama's
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in byte_pieces]
    out = Path(tmp_path_factory.mktemp("sp-tokenizer"))
    LlamaTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>", eos_token="</s>",
                       unk_token="<unk>", add_bos_token=True).save_pretrained(str(out))
    return load_tokenizer(out)


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_byte_fallback_detokenizes_incrementally(sp_tok, text):
    prompt = sp_tok.encode("Hello")
    assert sp_tok.convert_ids_to_tokens(prompt)[0] == "<s>"
    completion = sp_tok.encode(text, add_special_tokens=False) + [sp_tok.eos_token_id]
    tokens = sp_tok.convert_ids_to_tokens(completion)
    assert tokens[0].startswith("\u2581")  # the completion's first piece carries its space
    if any(len(c.encode()) > 1 for c in text):
        assert any(t.startswith("<0x") for t in tokens)  # characters outside the vocabulary
    assert b"".join(sp_tok.token_bytes(i) for i in completion[:-1]) == (" " + text).encode()
    want = sp_tok.decode(prompt + completion)[len(sp_tok.decode(prompt)):]
    assert want == " " + text
    detok = sp_tok.detokenizer(prompt_ids=prompt)
    deltas = [detok.add(i) for i in completion] + [detok.flush()]
    assert "".join(deltas) == want and not any(REPLACEMENT_CHAR in d for d in deltas)
    if any(len(c.encode()) > 1 for c in text):
        assert "" in deltas[:-2]  # bytes of an unfinished character were held back
    # at the start of a sequence the first space is the tokenizer's, not the text's
    fresh = sp_tok.detokenizer()
    assert fresh.add_many(completion) + fresh.flush() == text
