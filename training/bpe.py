"""CLIP-style byte-level BPE tokenizer for the shapes vocabulary (Radford et al. 2021 use the
same scheme: lowercase, byte-level, "</w>" marks the end of a word, <|startoftext|> and
<|endoftext|> around every sequence, 77 positions).

`build_tokenizer(out_dir)` learns merges on the caption words until every word is one token and
writes vocab.json + merges.txt (+ tokenizer_config.json / special_tokens_map.json) that
transformers' CLIPTokenizer loads.  Vocabulary layout, like CLIP's: 256 byte symbols, the same
256 with "</w>", one entry per merge, then <|startoftext|>, <|endoftext|>.
"""
from __future__ import annotations

import json
import os
from collections import Counter

from latentd.training.data import BACKGROUNDS, COLORS, SHAPES

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
# Every word a caption may use (plus a few harmless extras for prompts people type).
WORDS = sorted(set(["a", "an", "on", "background", "the", "and", "of"]
                   + list(COLORS) + list(SHAPES) + list(BACKGROUNDS) + ["grey"]))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE (Sennrich et al. 2016) until every word is a single symbol."""
    b2u = bytes_to_unicode()
    seqs = {w: [b2u[b] for b in w.encode("utf-8")] for w in words}
    for w in seqs:
        seqs[w][-1] = seqs[w][-1] + "</w>"
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter()
        for sym in seqs.values():
            for a, b in zip(sym, sym[1:]):
                pairs[(a, b)] += 1
        if not pairs:
            return merges
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]  # deterministic tie-break
        merges.append(best)
        for w, sym in seqs.items():
            out, i = [], 0
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == best:
                    out.append(sym[i] + sym[i + 1])
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            seqs[w] = out


def build_tokenizer(out_dir: str) -> dict:
    """Write the tokenizer folder; returns {"vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"}."""
    os.makedirs(out_dir, exist_ok=True)
    b2u = bytes_to_unicode()
    base = list(b2u.values())
    vocab_list = base + [c + "</w>" for c in base]
    merges = learn_merges(WORDS)
    vocab_list += ["".join(m) for m in merges]
    vocab_list += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    assert len(vocab) == len(vocab_list), "duplicate vocabulary entries"
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH,
                   "do_lower_case": True, "clean_up_tokenization_spaces": True,
                   "errors": "replace", **special}, f, indent=2)
    return {"vocab_size": len(vocab), "bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS],
            "pad_token_id": vocab[EOS]}


def load_tokenizer(folder: str):
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(folder)


def tokenize(tok, texts: list[str]):
    """(B, 77) input ids, padded with <|endoftext|> like SD 1.x."""
    return tok(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
               return_tensors="pt").input_ids
