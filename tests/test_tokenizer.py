"""Tokenizer vs llama.cpp golden data (tests/data) on both shipped models, plus the
pre-tokenizer against an independent regex oracle and the stream decoder."""
from __future__ import annotations

import hashlib
import re
import time
import unicodedata

import numpy as np
import pytest

from golden import load_golden
from tp_numa.errors import ModelFormatError, TpNumaError, UnsupportedError
from tp_numa.pretokenize import split_llama3, split_qwen2
from tp_numa.tokenizer import StreamDecoder, Tokenizer

MODELS = ("qwen2.5-coder-0.5b", "gemma3-270m")


@pytest.fixture(scope="module", params=MODELS)
def case(request, model_path):
    """(tokenizer, golden data) for one model."""
    tok = Tokenizer.from_gguf(model_path(request.param))
    return tok, load_golden(request.param)


VARIANTS = {  # golden key -> encode() keyword arguments
    "ids_special": dict(parse_special=True),
    "ids_special_raw": dict(parse_special=True, add_bos=False, add_eos=False),
    "ids_nospecial": dict(parse_special=False),
    "ids_nospecial_raw": dict(parse_special=False, add_bos=False, add_eos=False),
}


def test_ids_equal_llama_cpp(case):
    tok, g = case
    bad = []
    for e in g["texts"]:
        for key, kw in VARIANTS.items():
            ours = tok.encode(e["text"], **kw)
            if ours != e[key]:
                bad.append(f"{e['name']}/{key}: ours {ours[:24]} llama.cpp {e[key][:24]}")
    assert not bad, "\n".join(bad)
    assert len(g["texts"]) >= 30


def test_prompt_and_teacher_ids_equal_llama_cpp(case):
    tok, g = case
    for item in g["greedy"]:
        assert tok.encode(item["prompt"]) == item["prompt_ids"], item["prompt"]
    lp = g["logprobs"]
    assert tok.encode(lp["text"]) == lp["ids"].tolist()


def test_decode_equals_llama_detokenize(case):
    tok, g = case
    for e in g["texts"]:
        assert tok.decode(e["ids_special"]) == e["detok"], e["name"]
        assert tok.decode(e["ids_special"], skip_special=False) == e["detok_unparse"], e["name"]
    for item in g["greedy"]:
        assert tok.decode(item["ids"]) == item["text"], item["prompt"]


def test_roundtrip_where_llama_cpp_roundtrips(case):
    tok, g = case
    n = 0
    for e in g["texts"]:
        if e["detok"] != e["text"]:
            continue  # llama.cpp itself does not give the text back (e.g. BOS-less '▁')
        for ps in (True, False):
            assert tok.decode(tok.encode(e["text"], add_bos=False, parse_special=ps),
                              skip_special=not ps) == e["text"], e["name"]
        n += 1
    assert n >= 20


def test_every_piece_equals_llama_cpp(case):
    tok, g = case
    h = hashlib.sha256()
    for i in range(tok.vocab_size):
        p = tok.token_to_piece(i, special=True)
        h.update(len(p).to_bytes(4, "little"))
        h.update(p)
    assert h.hexdigest() == g["piece_digest"]
    for i, (with_special, without) in g["pieces"].items():
        assert tok.token_to_piece(int(i), special=True).hex() == with_special, i
        assert tok.token_to_piece(int(i), special=False).hex() == without, i


def test_end_of_generation_ids(case):
    tok, g = case
    assert sorted(tok.eos_ids) == g["eog_ids"]
    assert all(tok.is_eog(i) for i in g["eog_ids"])
    assert not tok.is_eog(tok.encode("a", add_bos=False)[0])


def test_stream_decoder_matches_decode_and_never_splits_characters(case):
    tok, g = case
    for e in g["texts"]:
        ids = e["ids_special"]
        dec = tok.stream_decoder()
        chunks = [dec.add(t) for t in ids] + [dec.flush()]
        # Neither model strips a space prefix or cleans spaces, so streaming = decode.
        assert "".join(chunks) == e["detok"], e["name"]
        assert not any("\ufffd" in c for c in chunks), e["name"]


def test_stream_decoder_holds_back_partial_utf8():
    class Bytes:  # minimal tokenizer whose tokens are single bytes
        def token_to_piece(self, t, special=True):
            return bytes([t])

    dec = StreamDecoder(Bytes())
    emoji = "😀".encode("utf-8")  # 4 bytes
    assert [dec.add(b) for b in emoji] == ["", "", "", "😀"]
    assert dec.add(0xC3) == "" and dec.flush() == "\ufffd"  # unfinished sequence at the end


def test_speed(case):
    """Thousands of characters encode well under a second. CPU time of this process, not
    wall time: the test machine is small and shared."""
    tok, g = case
    text = "\n".join(e["text"] for e in g["texts"]) * 2
    t0 = time.process_time()
    ids = tok.encode(text)
    t_enc = time.process_time() - t0
    assert len(text) > 4000 and len(ids) > 1000
    assert t_enc < 0.5, f"encoding {len(text)} chars took {t_enc:.2f}s CPU"


def test_load_time(model_path):
    """Gemma's 262144-token vocabulary loads in about a second or less (~0.25 s CPU)."""
    path = model_path("gemma3-270m")
    Tokenizer.from_gguf(path)  # warm the page cache
    t0 = time.process_time()
    Tokenizer.from_gguf(path)
    assert time.process_time() - t0 < 1.0


# ---------------------------------------------------------------- pre-tokenizer oracle
def _regex_oracle(text: str, digits: str) -> list[str]:
    """The tokenizer.json regex run by Python's re, with \\p{L}, \\p{N} and \\s spelled
    out as explicit sets of the characters present in ``text`` (re has no \\p{..})."""
    chars = set(text)
    white = {c for c in chars if ord(c) in (0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680,
                                            *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000)}
    letters = {c for c in chars if unicodedata.category(c)[0] == "L"}

    def cls(s):
        return "".join(re.escape(c) for c in sorted(s)) or r"\x00-\x00"

    numbers = {c for c in chars if unicodedata.category(c)[0] == "N"}
    L, N, S = cls(letters), cls(numbers), cls(white)
    pat = (rf"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n{L}{N}]?[{L}]+|[{N}]{digits}"
           rf"| ?[^{S}{L}{N}]+[\r\n]*|[{S}]*[\r\n]+|[{S}]+(?![^{S}])|[{S}]+")
    return re.findall(pat, text)


ORACLE_TEXTS = [
    "Hello world, it's 2024! I'M here   now\n\n\tok",
    "def f(x):\n    return x**2  # square\r\n\r\n",
    "12345678901 1.5e10 ١٢٣ Ⅻ ½",
    "日本語のテキスト 한국어 Ελληνικά café naïve",
    "a  b   c    \n  \n\n x\u3000y\u00a0z\u2009 ",
    "'s 'S 'Re 'vE 'll 'LL 'd ' s '' x'",
    "!!!??? ... ,,,;;; --- ((([[[ ]]]))) @#$ 😀🎉 ∑∫ →∞",
    "   ", " ", "", "\n", "x", "  leading", "trailing  ",
]


@pytest.mark.parametrize("text", ORACLE_TEXTS)
def test_pretokenizers_equal_regex(text):
    assert split_llama3(text) == _regex_oracle(text, "{1,3}")
    assert split_qwen2(text) == _regex_oracle(text, "")
    assert "".join(split_llama3(text)) == text


# ---------------------------------------------------------------- construction errors
def _meta(**kw):
    base = {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
            "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"],
            "tokenizer.ggml.token_type": np.array([1, 1, 1], dtype=np.int32)}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


def test_small_gpt2_vocabulary_merges_by_rank():
    tok = Tokenizer.from_gguf(_meta())
    assert tok.encode("abab", add_bos=False) == [2, 2]
    assert tok.encode("ba", add_bos=False) == [1, 0]
    assert tok.decode([2, 0]) == "aba"


def test_llama3_family_settings():
    """llama-bpe: whole words found in the vocabulary skip the merges, BOS is added by
    default, and decode applies llama.cpp's space clean-up (qwen2 does none of these)."""
    toks = ["a", "b", "c", "ab", "abc", "\u0120.", ".", "\u0120", "<|begin_of_text|>"]
    meta = _meta(**{"tokenizer.ggml.tokens": toks, "tokenizer.ggml.merges": ["a b", "\u0120 ."],
                    "tokenizer.ggml.token_type": np.array([1] * 8 + [3], dtype=np.int32),
                    "tokenizer.ggml.bos_token_id": 8})
    qwen = Tokenizer.from_gguf(meta)
    llama3 = Tokenizer.from_gguf({**meta, "tokenizer.ggml.pre": "llama-bpe"})
    assert qwen.encode("abc") == [3, 2] and llama3.encode("abc") == [8, 4]
    assert qwen.decode([0, 5]) == "a ." and llama3.decode([8, 0, 5]) == "a."


def test_errors_name_the_problem():
    with pytest.raises(UnsupportedError, match="pre-tokenizer 'gpt-9'"):
        Tokenizer.from_gguf(_meta(**{"tokenizer.ggml.pre": "gpt-9"}))
    with pytest.raises(UnsupportedError, match="tokenizer model 'bert'"):
        Tokenizer.from_gguf(_meta(**{"tokenizer.ggml.model": "bert"}))
    with pytest.raises(ModelFormatError, match="merges"):
        Tokenizer.from_gguf(_meta(**{"tokenizer.ggml.merges": None}))
    with pytest.raises(ModelFormatError, match="tokenizer.ggml.model"):
        Tokenizer.from_gguf(_meta(**{"tokenizer.ggml.model": None}))
    with pytest.raises(TpNumaError, match="no_such.gguf"):
        Tokenizer.from_gguf("/nonexistent/no_such.gguf")


def test_reader_and_path_give_the_same_tokenizer(tmp_path):
    """from_gguf(GGUFReader) and from_gguf(path) agree (checked on a small GGUF file)."""
    import gguf

    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    toks = ["<unk>", "<s>", "</s>", "▁", "a", "b", "▁a", "ab", "▁ab"] + [f"<0x{b:02X}>" for b in range(256)]
    w.add_token_list(toks)
    w.add_token_scores([0.0, 0.0, 0.0, -1.0, -2.0, -2.0, -0.5, -0.7, -0.1] + [0.0] * 256)
    w.add_token_types([2, 3, 3, 1, 1, 1, 1, 1, 1] + [6] * 256)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_tensor("x", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    a = Tokenizer.from_gguf(str(path))
    b = Tokenizer.from_gguf(gguf.GGUFReader(str(path)))
    text = "ab a b\u00e9 ab"
    assert a.encode(text) == b.encode(text)
    assert a.tokens == b.tokens and a.eos_ids == b.eos_ids and a.bos_id == b.bos_id == 1
    # SentencePiece: space prefix, merges by score, byte fallback for 'é'
    assert a.encode("ab") == [1, 8]
    assert a.encode("b\u00e9", add_bos=False)[-2:] == [9 + 0xC3, 9 + 0xA9]
    assert a.decode(a.encode(text, add_bos=False)) == text
    # llama_detokenize keeps the space prefix when it removes a BOS (llama.cpp quirk)
    assert a.decode(a.encode(text)) == " " + text


def test_metadata_reader_rejects_bad_files(tmp_path):
    from tp_numa.gguf_metadata import read_metadata

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(60))
    with pytest.raises(ModelFormatError, match="bad magic"):
        read_metadata(bad)
    good = tmp_path / "good.gguf"
    import gguf

    w = gguf.GGUFWriter(str(good), "llama")
    w.add_token_list([f"t{i}" for i in range(1000)])
    w.add_tensor("x", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert read_metadata(good)["tokenizer.ggml.tokens"][999] == "t999"
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:3000])  # inside the token list
    with pytest.raises(ModelFormatError, match="truncated"):
        read_metadata(cut)
