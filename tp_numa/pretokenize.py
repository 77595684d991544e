"""Pre-tokenizers of the GPT-2 style byte-level BPE tokenizers (word splitting before BPE).

llama.cpp splits text into words with hand-written scanners equivalent to the regexes of
the models' tokenizer.json files, and so do we, step for step, so that word boundaries
(and hence token ids) agree with llama.cpp on every input, including its treatment of
characters at the edge of the regex classes. The two supported splitters:

    llama3 ('llama-bpe', 'llama3', ...), digits in runs of at most 3:
        (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}
        | ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+
    qwen2 ('qwen2', used by Qwen2/2.5/3): the same with single digits, \\p{N}.

Character classes: \\p{L} = Unicode category L*, \\p{N} = N*, \\s = the Unicode
White_Space set (llama.cpp's table; it excludes \\x1c-\\x1f, unlike Python's isspace).
"""
from __future__ import annotations

import unicodedata

# Class codes; a character has exactly one (White_Space chars are never L or N).
LETTER, NUMBER, SPACE, OTHER = 1, 2, 4, 8
_OUT = 0  # past the end of the text: no class (llama.cpp's empty flags)

_WHITE_SPACE = frozenset(
    [0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
     0x2028, 0x2029, 0x202F, 0x205F, 0x3000])

_class_cache: dict[str, int] = {}


def _classify(ch: str) -> int:
    cp = ord(ch)
    if cp in _WHITE_SPACE:
        return SPACE
    cat = unicodedata.category(ch)[0]
    return LETTER if cat == "L" else NUMBER if cat == "N" else OTHER


def char_classes(text: str) -> list[int]:
    """Class code of every character of ``text``, followed by one ``_OUT`` sentinel."""
    cache = _class_cache
    get = cache.get
    out = [get(ch) for ch in text]
    if None in out:
        for i, v in enumerate(out):
            if v is None:
                ch = text[i]
                out[i] = cache[ch] = _classify(ch)
    out.append(_OUT)
    return out


for _c in map(chr, range(128)):
    _class_cache[_c] = _classify(_c)

_CONTRACT_1 = frozenset("sStTmMdD")
_CONTRACT_2 = frozenset(a + b for a in "rRvV" for b in "eE") | frozenset(a + b for a in "lL" for b in "lL")
_NL = frozenset("\r\n")


def split_llama3(text: str, max_digits: int = 3) -> list[str]:
    """Split ``text`` into pre-tokenizer words (llama3 regex; ``max_digits=1`` is qwen2's).

    A direct transcription of llama.cpp's unicode_regex_split_custom_llama3/_qwen2 so
    that edge cases (undefined code points, runs at the end of the text) agree.
    """
    n = len(text)
    cls = char_classes(text)
    words = []
    prev = 0
    pos = 0
    non_punct = SPACE | LETTER | NUMBER
    while pos < n:
        c = text[pos]
        f = cls[pos]
        # (?i:'s|'t|'re|'ve|'m|'ll|'d)
        if c == "'" and pos + 1 < n:
            if text[pos + 1] in _CONTRACT_1:
                pos += 2
                words.append(text[prev:pos])
                prev = pos
                continue
            if pos + 2 < n and text[pos + 1:pos + 3] in _CONTRACT_2:
                pos += 3
                words.append(text[prev:pos])
                prev = pos
                continue
        # [^\r\n\p{L}\p{N}]?\p{L}+
        if not (c in _NL or f == NUMBER) and (f == LETTER or cls[pos + 1] == LETTER):
            pos += 1
            while cls[pos] == LETTER:
                pos += 1
            words.append(text[prev:pos])
            prev = pos
            continue
        # \p{N}{1,max_digits}
        if f == NUMBER:
            ini = pos
            while cls[pos] == NUMBER:
                pos += 1
                if pos - ini >= max_digits:
                    words.append(text[prev:pos])
                    prev = ini = pos
            if pos > prev:
                words.append(text[prev:pos])
                prev = pos
            continue
        # <space>?[^\s\p{L}\p{N}]+[\r\n]*
        f2 = cls[pos + 1] if c == " " else f
        if not (f2 & non_punct):
            if c == " ":
                pos += 1
            while f2 and not (f2 & non_punct):
                pos += 1
                f2 = cls[pos]
            while pos < n and text[pos] in _NL:
                pos += 1
            words.append(text[prev:pos])
            prev = pos
            continue
        num_ws = 0
        last_end_rn = 0
        while cls[pos + num_ws] == SPACE:
            if text[pos + num_ws] in _NL:
                last_end_rn = pos + num_ws + 1
            num_ws += 1
        if last_end_rn > 0:  # \s*[\r\n]+
            pos = last_end_rn
        elif num_ws > 1 and pos + num_ws < n:  # \s+(?!\S): leave the last space to the next word
            pos += num_ws - 1
        elif num_ws > 0:  # \s+
            pos += num_ws
        else:  # no rule matched: a word of one character
            pos += 1
        words.append(text[prev:pos])
        prev = pos
    return words


def split_qwen2(text: str) -> list[str]:
    """Qwen2 pre-tokenizer: the llama3 rules with single-digit numbers."""
    return split_llama3(text, max_digits=1)


# tokenizer.ggml.pre value -> splitter (names as llama.cpp maps them).
LLAMA3_PRES = frozenset(["llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"])
QWEN2_PRES = frozenset(["qwen2", "deepseek-r1-qwen"])
PRE_TOKENIZERS = {**{p: split_llama3 for p in LLAMA3_PRES}, **{p: split_qwen2 for p in QWEN2_PRES}}
