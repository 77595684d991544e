"""Tokenizer built from GGUF metadata, giving the same token ids as llama.cpp.

Two algorithms, chosen by ``tokenizer.ggml.model`` (see docs/tokenizer.md):

* ``llama`` -- SentencePiece-style BPE (Llama 2, Mistral, Gemma): spaces become '▁', the
  text is split into UTF-8 characters and the adjacent pair whose concatenation is the
  vocabulary entry with the highest *score* is merged first (ties: leftmost), until no
  pair forms a token; characters that never became a token are emitted as byte tokens
  ``<0xXX>``. ``tokenizer.ggml.add_space_prefix`` puts a space before the text and after
  every special token.
* ``gpt2`` -- byte-level BPE (Llama 3, Qwen2/3): the text is split into words by the
  pre-tokenizer named in ``tokenizer.ggml.pre`` (tp_numa.pretokenize), each word's UTF-8
  bytes are mapped to printable characters (GPT-2's byte-to-unicode table), and the
  adjacent pair with the lowest *merge rank* is merged first (ties: leftmost).

Before either, special tokens are cut out of the text exactly as llama.cpp does: control
and unknown tokens only when ``parse_special`` is true, user-defined tokens always,
longest token text first.

Decoding mirrors llama.cpp's ``token_to_piece`` (bytes per token) and ``llama_detokenize``;
``StreamDecoder`` turns a stream of ids into text without splitting UTF-8 characters.
"""
from __future__ import annotations

import codecs
import heapq
import os
from typing import Iterable, Sequence

import numpy as np

from .errors import ModelFormatError, UnsupportedError
from .gguf_metadata import metadata_from_reader, read_metadata
from .pretokenize import LLAMA3_PRES, PRE_TOKENIZERS

# llama.cpp token attributes (bit flags) and the GGUF token_type -> attribute map.
ATTR_UNDEFINED, ATTR_UNKNOWN, ATTR_UNUSED, ATTR_NORMAL = 0, 1 << 0, 1 << 1, 1 << 2
ATTR_CONTROL, ATTR_USER_DEFINED, ATTR_BYTE = 1 << 3, 1 << 4, 1 << 5
# token_type: 0 undefined, 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
_TYPE_TO_ATTR = np.array([ATTR_UNDEFINED, ATTR_NORMAL, ATTR_UNKNOWN, ATTR_CONTROL,
                          ATTR_USER_DEFINED, ATTR_UNUSED, ATTR_BYTE], dtype=np.int32)

# Token texts llama.cpp treats as end of generation (llama-vocab.cpp, by text), and the
# end-of-turn / fill-in-the-middle tokens it also adds to the end-of-generation set.
EOG_TEXTS = frozenset([
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<｜end▁of▁sentence｜>",
])
EOT_TEXTS = frozenset([
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>",
])
FIM_EOG_TEXTS = frozenset(["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]",
                           "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>",
                           "<|file_sep|>"])
FIM_TEXTS = FIM_EOG_TEXTS | frozenset([
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
    "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
    "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
])

_SPACE_ESCAPE = "\u2581"  # '▁'


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (byte b -> table[b])."""
    keep = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table = [""] * 256
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in enumerate(_BYTE_TO_CHAR)}


class Tokenizer:
    """Encoder/decoder for one GGUF vocabulary.

    Attributes: ``model`` ('llama' or 'gpt2'), ``pre`` (pre-tokenizer name), ``vocab_size``,
    ``tokens`` (list of token texts), ``bos_id``/``eos_id`` (int or None), ``eos_ids``
    (frozenset: every id that ends generation in llama.cpp), ``add_bos``, ``add_eos``,
    ``add_space_prefix``, ``chat_template`` (str or None), ``architecture``.
    """

    def __init__(self, meta: dict, source: str = "<metadata>"):
        self.source = source
        model = meta.get("tokenizer.ggml.model")
        if model is None:
            raise ModelFormatError(f"{source}: GGUF has no tokenizer (tokenizer.ggml.model missing)")
        if model not in ("llama", "gpt2"):
            raise UnsupportedError(f"{source}: tokenizer model '{model}' is not supported (supported: llama, gpt2)")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ModelFormatError(f"{source}: tokenizer.ggml.tokens missing or empty")
        n = len(tokens)
        self.model = model
        self.architecture = meta.get("general.architecture", "")
        self.chat_template = meta.get("tokenizer.chat_template")
        tokens = list(tokens)
        if "" in tokens:  # llama.cpp renames empty entries
            tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self.tokens = tokens
        self.vocab_size = n
        self.token_to_id = dict(zip(tokens, range(n)))  # duplicates: last wins, as in llama.cpp

        types = meta.get("tokenizer.ggml.token_type")
        if types is None:
            attr = np.full(n, ATTR_NORMAL, dtype=np.int32)
        else:
            types = np.asarray(types, dtype=np.int64)
            if len(types) < n:
                raise ModelFormatError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
            types = types[:n]
            attr = np.where((types >= 0) & (types < len(_TYPE_TO_ATTR)),
                            _TYPE_TO_ATTR[np.clip(types, 0, len(_TYPE_TO_ATTR) - 1)], ATTR_UNDEFINED)
            attr = attr.astype(np.int32)

        if model == "llama":
            self.pre = "default"
            defaults = dict(bos=1, eos=2, unk=0)
            self.add_space_prefix, self.add_bos, self.add_eos, self.clean_spaces = True, True, False, False
            scores = meta.get("tokenizer.ggml.scores")
            if scores is not None and len(scores) < n:
                raise ModelFormatError(f"{source}: tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
            self._scores = (np.asarray(scores, dtype=np.float32)[:n].tolist() if scores is not None
                            else [0.0] * n)
        else:
            self.pre = meta.get("tokenizer.ggml.pre") or "default"
            if self.pre not in PRE_TOKENIZERS:
                raise UnsupportedError(f"{source}: pre-tokenizer '{self.pre}' is not supported "
                                       f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
            self._split_words = PRE_TOKENIZERS[self.pre]
            defaults = dict(bos=11, eos=11, unk=None)
            # llama.cpp's per-pre-tokenizer settings: the llama3 family looks whole words
            # up before merging, adds BOS and keeps the " ." clean-up; qwen2 does neither.
            llama3 = self.pre in LLAMA3_PRES
            self.add_space_prefix, self.add_bos, self.add_eos = False, llama3, False
            self.clean_spaces = self._ignore_merges = llama3
            merges = meta.get("tokenizer.ggml.merges")
            if merges is None:
                raise ModelFormatError(f"{source}: tokenizer.ggml.merges missing (needed by the gpt2 tokenizer)")
            # Keyed by the merge text "left right" (byte-level tokens never hold a literal
            # space); built back to front so a duplicate keeps its first rank, as in llama.cpp.
            self._ranks = dict(zip(reversed(merges), range(len(merges) - 1, -1, -1)))
            self._bpe_cache: dict[str, list[int]] = {}

        self.add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", self.add_space_prefix))
        self.add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", self.add_bos))
        self.add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", self.add_eos))

        def special(key: str, default):
            # An id outside the vocabulary falls back to the default, as in llama.cpp.
            v = meta.get(f"tokenizer.ggml.{key}_token_id")
            if v is not None and 0 <= int(v) < n:
                return int(v)
            return default if default is not None and default < n else None

        self.bos_id = special("bos", defaults["bos"])
        self.eos_id = special("eos", defaults["eos"])
        self.unk_id = special("unknown", defaults["unk"])
        self.pad_id = special("padding", None)
        eot_id = special("eot", None)
        eom_id = special("eom", None)

        # Control-looking tokens become control tokens (llama.cpp overrides their type).
        tid = self.token_to_id
        forced = [tid[t] for t in (EOG_TEXTS | EOT_TEXTS | FIM_TEXTS | {"<|eom_id|>"}) if t in tid]
        if forced:
            attr[forced] |= ATTR_CONTROL
        eog = {tid[t] for t in EOG_TEXTS | FIM_EOG_TEXTS if t in tid}
        eog |= {i for i in (self.eos_id, eot_id, eom_id) if i is not None}
        self.eos_ids = frozenset(eog)
        self._attr = attr

        # Special tokens matched in raw text: control/user-defined/unknown, longest first.
        special_ids = np.nonzero(attr & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN))[0].tolist()
        special_ids.sort(key=lambda i: -len(self.tokens[i].encode("utf-8")))
        self._specials = [(self.tokens[i], i, bool(attr[i] & (ATTR_CONTROL | ATTR_UNKNOWN)))
                          for i in special_ids]
        self._piece_cache: dict[int, bytes] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_gguf(cls, source) -> "Tokenizer":
        """Build from a GGUF path, an open ``gguf.GGUFReader`` or a metadata dict."""
        if isinstance(source, dict):
            return cls(source)
        if isinstance(source, (str, os.PathLike)):
            return cls(read_metadata(source), os.fspath(source))
        if hasattr(source, "fields"):
            name = getattr(getattr(source, "data", None), "filename", None) or "<GGUFReader>"
            return cls(metadata_from_reader(source), str(name))
        raise TypeError(f"Tokenizer.from_gguf: expected a path, GGUFReader or dict, got {type(source).__name__}")

    # ------------------------------------------------------------------ queries
    def is_eog(self, token_id: int) -> bool:
        """True when ``token_id`` ends generation (EOS, end-of-turn, FIM separators)."""
        return token_id in self.eos_ids

    def is_control(self, token_id: int) -> bool:
        return bool(self._attr[token_id] & (ATTR_CONTROL | ATTR_UNKNOWN))

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True,
               add_eos: bool | None = None) -> list[int]:
        """Token ids of ``text``.

        ``add_bos``/``add_eos``: None = the model's default (llama.cpp ``add_special=True``),
        True/False force it. ``parse_special``: match control tokens such as
        '<|im_start|>' in the text (llama.cpp's CLI does; user-defined tokens are always
        matched).
        """
        out: list[int] = []
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            out.append(self.bos_id)
        fragments = self._partition(text, parse_special) if text else []
        if self.model == "llama":
            prev_special = True
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                    prev_special = True
                    continue
                if self.add_space_prefix and prev_special:
                    frag = " " + frag
                self._spm(frag.replace(" ", _SPACE_ESCAPE), out)
                prev_special = False
        else:
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    self._bpe_text(frag, out)
        if (self.add_eos if add_eos is None else add_eos) and self.eos_id is not None:
            out.append(self.eos_id)
        return out

    def _partition(self, text: str, parse_special: bool) -> list:
        """Cut special tokens out of ``text``: a list of str fragments and int token ids.

        Longest token text first, each splitting every remaining text fragment at all its
        (non-overlapping, left to right) occurrences: llama.cpp's tokenizer_st_partition.
        """
        frags: list = [text]
        for tok_text, tok_id, ctrl in self._specials:
            if ctrl and not parse_special:
                continue
            if tok_text not in text:
                continue
            new: list = []
            for fr in frags:
                if isinstance(fr, int) or tok_text not in fr:
                    new.append(fr)
                    continue
                for k, part in enumerate(fr.split(tok_text)):
                    if k:
                        new.append(tok_id)
                    if part:
                        new.append(part)
            frags = new
        return frags

    def _spm(self, text: str, out: list[int]) -> None:
        """SentencePiece-style BPE of one escaped fragment (llama.cpp llm_tokenizer_spm).

        Symbols start as single characters; a max-heap keyed by (score, -left) picks the
        pair to merge; stale heap entries (a side already merged) are skipped.
        """
        n = len(text)
        if n == 0:
            return
        vocab, scores = self.token_to_id, self._scores
        sym = list(text)  # text of each live symbol ('' once merged away)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap = []
        for i in range(n - 1):
            t = sym[i] + sym[i + 1]
            tok = vocab.get(t)
            if tok is not None:
                heap.append((-scores[tok], i, i + 1, len(t)))
        heapq.heapify(heap)
        push, pop = heapq.heappush, heapq.heappop
        while heap:
            _, left, right, size = pop(heap)
            ls, rs = sym[left], sym[right]
            if not ls or not rs or len(ls) + len(rs) != size:
                continue
            sym[left] = ls + rs
            sym[right] = ""
            nn = nxt[right]
            nxt[left] = nn
            if nn >= 0:
                prv[nn] = left
            p = prv[left]
            if p >= 0:
                t = sym[p] + sym[left]
                tok = vocab.get(t)
                if tok is not None:
                    push(heap, (-scores[tok], p, left, len(t)))
            if nn >= 0:
                t = sym[left] + sym[nn]
                tok = vocab.get(t)
                if tok is not None:
                    push(heap, (-scores[tok], left, nn, len(t)))
        i = 0
        while i != -1:
            s = sym[i]
            tok = vocab.get(s)
            if tok is not None:
                out.append(tok)
            else:
                out.extend(self._byte_token(b) for b in s.encode("utf-8", "surrogatepass"))
            i = nxt[i]

    def _byte_token(self, b: int) -> int:
        tok = self.token_to_id.get(f"<0x{b:02X}>")
        if tok is None:
            tok = self.token_to_id.get(chr(b))
        if tok is None:
            raise ModelFormatError(f"{self.source}: vocabulary has no byte token <0x{b:02X}> for byte fallback")
        return tok

    def _bpe_text(self, text: str, out: list[int]) -> None:
        cache = self._bpe_cache
        for word in self._split_words(text):
            ids = cache.get(word)
            if ids is None:
                ids = self._bpe_word("".join([_BYTE_TO_CHAR[b] for b in word.encode("utf-8", "surrogatepass")]))
                if len(cache) < 100_000:
                    cache[word] = ids
            out.extend(ids)

    def _bpe_word(self, word: str) -> list[int]:
        """Byte-level BPE of one byte-encoded word (llama.cpp llm_tokenizer_bpe_session).

        Min-heap on (merge rank, left index); a popped pair is applied only if both sides
        still hold the texts it was made from.
        """
        vocab = self.token_to_id
        if self._ignore_merges and word in vocab:
            return [vocab[word]]
        n = len(word)
        ranks = self._ranks
        sym = list(word)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap = []
        for i in range(n - 1):
            r = ranks.get(sym[i] + " " + sym[i + 1])
            if r is not None:
                heap.append((r, i, i + 1, sym[i] + sym[i + 1]))
        heapq.heapify(heap)
        push, pop = heapq.heappush, heapq.heappop
        while heap:
            _, left, right, merged = pop(heap)
            ls, rs = sym[left], sym[right]
            if not ls or not rs or ls + rs != merged:
                continue
            sym[left] = merged
            sym[right] = ""
            nn = nxt[right]
            nxt[left] = nn
            if nn >= 0:
                prv[nn] = left
            p = prv[left]
            if p >= 0:
                r = ranks.get(sym[p] + " " + merged)
                if r is not None:
                    push(heap, (r, p, left, sym[p] + merged))
            if nn >= 0:
                r = ranks.get(merged + " " + sym[nn])
                if r is not None:
                    push(heap, (r, left, nn, merged + sym[nn]))
        ids = []
        i = 0
        while i != -1:
            s = sym[i]
            tok = vocab.get(s)
            if tok is not None:
                ids.append(tok)
            else:  # llama.cpp: fall back to single-byte tokens, dropping what has none
                for ch in s.encode("utf-8"):
                    t = vocab.get(chr(ch))
                    if t is not None:
                        ids.append(t)
            i = nxt[i]
        return ids

    # ------------------------------------------------------------------ decoding
    def token_to_piece(self, token_id: int, special: bool = True) -> bytes:
        """Bytes of one token (llama.cpp token_to_piece): control tokens give b'' unless
        ``special``; '▁' -> ' ' (SentencePiece); GPT-2 characters -> bytes (byte BPE)."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} outside the vocabulary (size {self.vocab_size})")
        attr = int(self._attr[token_id])
        if not special and attr & (ATTR_CONTROL | ATTR_UNKNOWN):
            return b""
        piece = self._piece_cache.get(token_id)
        if piece is None:
            piece = self._piece_cache[token_id] = self._make_piece(token_id, attr)
        return piece

    def _make_piece(self, token_id: int, attr: int) -> bytes:
        text = self.tokens[token_id]
        if attr & (ATTR_CONTROL | ATTR_UNKNOWN | ATTR_USER_DEFINED):
            return text.encode("utf-8")
        if attr & ATTR_NORMAL:
            if self.model == "llama":
                return text.replace(_SPACE_ESCAPE, " ").encode("utf-8")
            out = bytearray()
            for ch in text:
                b = _CHAR_TO_BYTE.get(ch)
                if b is not None:
                    out.append(b)
                else:
                    out += f"[UNK_BYTE_0x{ch.encode('utf-8').hex()}{text}]".encode("utf-8")
            return bytes(out)
        if attr & ATTR_BYTE:
            return bytes([int(text[3:5], 16)])
        return b""  # unused/undefined tokens print nothing

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of ``ids`` as llama.cpp's llama_detokenize(remove_special=skip_special,
        unparse_special=not skip_special) gives it, decoded as UTF-8 (invalid -> U+FFFD)."""
        ids = list(ids)
        remove_space = self.add_space_prefix
        if skip_special and self.add_bos and ids and ids[0] == self.bos_id:
            remove_space = False
            ids = ids[1:]
        if skip_special and self.add_eos and ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        parts = []
        for k, t in enumerate(ids):
            p = self.token_to_piece(t, special=not skip_special)
            if k == 0 and remove_space and p[:1] == b" ":
                p = p[1:]
            parts.append(p)
        data = b"".join(parts)
        if self.clean_spaces:
            data = _clean_spaces(data)
        return data.decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages, add_generation_prompt: bool = True,
                            template: str | None = None, **extra) -> str:
        """Prompt text for chat ``messages``: the GGUF's Jinja template, or a built-in
        one chosen by architecture (tp_numa.chat_template). Encode the result with
        ``parse_special=True``."""
        from .chat_template import apply_chat_template

        return apply_chat_template(self, messages, add_generation_prompt, template, **extra)


def _clean_spaces(text: bytes) -> bytes:
    """llama.cpp's clean_up_tokenization_spaces, transcribed pass for pass (in place, as
    there): ' ?' ' !' ' .' ' ,' lose the space; " ' " loses both spaces; " 's" " 'm" " 're"
    " 've" lose the space."""
    t = bytearray(text)
    total = len(t)
    n1, total = total, (1 if total else 0)
    for i in range(1, n1):
        x = t[i]
        if t[i - 1] == 0x20 and x in b"?!.,":
            total -= 1
        t[total] = x
        total += 1
    n2, total = total, (1 if total else 0)
    i = 1
    while i < n2:
        x = t[i]
        if x == 0x27 and i + 1 < n2 and t[i - 1] == 0x20 and t[i + 1] == 0x20:
            total -= 1
            i += 1
            t[i] = 0  # the next space is skipped (and reads as NUL from here on)
        t[total] = x
        total += 1
        i += 1
    n3, total = total, (1 if total else 0)
    for i in range(1, n3):
        x = t[i]
        if t[i - 1] == 0x20 and x == 0x27 and i + 1 < n3:
            x1 = t[i + 1]
            if x1 in b"sm":
                total -= 1
            elif i + 2 < n3 and bytes(t[i + 1:i + 3]) in (b"re", b"ve"):
                total -= 1
        t[total] = x
        total += 1
    return bytes(t[:total])


class StreamDecoder:
    """Incremental detokenizer: feed ids one at a time, get text as soon as it is whole.

    Pieces are bytes; a UTF-8 character may be split over several byte tokens, so the
    bytes pass through an incremental UTF-8 decoder that holds back an unfinished
    sequence (at most 3 bytes) and replaces invalid bytes with U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        """Text completed by ``token_id`` (may be '')."""
        return self._utf8.decode(self.tokenizer.token_to_piece(token_id, special=not self.skip_special))

    def add_many(self, ids: Iterable[int]) -> str:
        return "".join(self.add(t) for t in ids)

    def flush(self) -> str:
        """Whatever is held back (an unfinished UTF-8 sequence becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
