import numpy as np
import pytest

from nightshift.prep.clean import Document, write_corpus
from nightshift.training.data import is_heldout, pack, tokenize_and_pack


def test_pack_cuts_rows_and_pads_only_the_heldout_tail():
    rows = pack([[1, 2, 3], [4, 5]], seq_len=2, keep_tail=False)
    assert rows.tolist() == [[1, 2], [3, 4]]
    tail = pack([[1, 2, 3], [4, 5, 6]], seq_len=4, keep_tail=True)
    assert tail.tolist() == [[1, 2, 3, 4], [5, 6, -1, -1]]
    # a lone leftover token has no context to be predicted from, so it is not kept
    assert pack([[1, 2, 3]], seq_len=2, keep_tail=True).tolist() == [[1, 2]]


def test_heldout_split_is_stable_and_roughly_the_fraction():
    ids = [f"doc-{i}" for i in range(2000)]
    share = sum(is_heldout(i, 0.1) for i in ids) / len(ids)
    assert 0.07 < share < 0.13
    assert [is_heldout(i, 0.1) for i in ids] == [is_heldout(i, 0.1) for i in ids]


def corpus(tmp_path, n):
    docs = [Document(f"d{i}", "file:///x", "text", f"Document number {i} talks about telescopes and stars. " * 5, "h")
            for i in range(n)]
    return write_corpus(docs, tmp_path / "corpus.jsonl")


def test_tokenize_and_pack_writes_both_splits(tmp_path, tokenizer_dir):
    packed = tokenize_and_pack(corpus(tmp_path, 12), tokenizer_dir, tmp_path / "out", seq_len=32, heldout_fraction=0.2)
    train, heldout = np.load(packed.train_path), np.load(packed.heldout_path)
    assert train.shape == (packed.train_blocks, 32) and (train >= 0).all()
    assert packed.heldout_documents >= 1 and packed.train_documents + packed.heldout_documents == 12
    assert int((heldout >= 0).sum()) == packed.heldout_tokens > 0


def test_a_corpus_too_small_for_one_block_says_what_to_change(tmp_path, tokenizer_dir):
    with pytest.raises(ValueError, match="lower seq_len"):
        tokenize_and_pack(corpus(tmp_path, 2), tokenizer_dir, tmp_path / "out", seq_len=4096, heldout_fraction=0.1)
