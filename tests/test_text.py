"""Text conditioning (model/text.py): tokenizer formats, truncation, unconditional input."""
from __future__ import annotations


import pytest
import torch

from latentd.model.loader import load_text_encoder, load_tokenizer
from latentd.model.text import TextEncoder


@pytest.fixture(scope="module")
def text(tiny_model):
    return TextEncoder(load_tokenizer(tiny_model / "tokenizer"), load_text_encoder(tiny_model / "text_encoder"))


def test_tokenizer_json_only_gives_the_same_ids(tiny_model, tmp_path, text):
    tok = load_tokenizer(tiny_model / "tokenizer")
    out = tmp_path / "tok"
    tok.save_pretrained(out)
    for f in ("vocab.json", "merges.txt"):
        (out / f).unlink(missing_ok=True)
    assert (out / "tokenizer.json").is_file()
    only_json = TextEncoder(load_tokenizer(out), text.model)
    prompts = ["a red cat and the dog", "", "The  DOG!"]
    ids_a, _ = text.tokenize(prompts)
    ids_b, _ = only_json.tokenize(prompts)
    assert torch.equal(ids_a, ids_b) and ids_a.shape == (3, 77)


def test_truncation_is_reported(text):
    ids, cut = text.tokenize(["cat " * 75, "cat " * 76, "a red cat"])
    assert cut == [False, True, False]       # 75 words + BOS + EOS = 77 tokens fit; 76 do not
    assert ids.shape == (3, 77)
    assert ids[1, -1].item() == text.tokenizer.eos_token_id   # truncated, still ends with EOS


def test_encode_matches_the_text_model_and_empty_is_its_own_row(text):
    hidden, cut = text.encode(["a red cat", ""])
    assert hidden.shape == (2, 77, 32) and cut == [False, False]
    ids = text.tokenizer(["a red cat", ""], padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    with torch.inference_mode():
        want = text.model(ids)[0]
    assert torch.equal(hidden, want)
    assert not torch.equal(hidden[0], hidden[1])


def test_missing_tokenizer_files(tmp_path):
    from latentd.model.errors import ModelLoadError

    (tmp_path / "tok").mkdir()
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_tokenizer(tmp_path / "tok")
