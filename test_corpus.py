"""
corpus.py: the prepared token files against a direct tokenization (bytes, uint16 and uint32, and
SentencePiece where it is installed; one process and several), the cache (an interrupted preparation
is redone, a changed source or tokenizer is prepared again, a corrupt file is a clear error, nothing
is written when up to date), the validation split and the sequences by hand, batches that never hold
a held-out line (lines with readable labels), masking and language sampling against hand computations.

    python -m pytest -q test_corpus.py
"""

import collections
import importlib.util
import json
import os

import numpy as np
import pytest

import corpus
from corpus import (BadInput, ByteTokenizer, bert_mask, first_validation_line, global_batch, open_corpus,
                    prepare_corpus, read_manifest, sampling_probs, sequence, validation_rows)

TEXTS = {  # blank lines, spaces around a line, CRLF, three scripts: what the byte tokenizer must see
    "en": "the cat sat\n\n  on the mat  \r\nand ran\n" * 40,
    "ru": "кот сидел\nна коврике\n" * 30,
    "hi": "बिल्ली बैठी\n\n" * 20,
}


def write_texts(folder, texts=TEXTS):
    folder.mkdir(parents=True, exist_ok=True)
    for lang, text in texts.items():
        (folder / f"{lang}.txt").write_text(text, encoding="utf-8", newline="")
    return folder


def direct(text, encode):
    """The ids and line starts a language should get: every non-blank line, stripped, encoded."""
    lines = [s.strip() for s in text.encode("utf-8").split(b"\n") if s.strip()]
    ids = [encode(s) for s in lines]
    return np.concatenate(ids), np.cumsum([0] + [len(i) for i in ids])


def prepared_arrays(prepared, lang, dtype):
    return np.fromfile(prepared / f"{lang}.bin", dtype=dtype), np.fromfile(prepared / f"{lang}.idx", dtype=np.int64)


# ------------------------------------------------------------------------------------------------
# Preparation against a direct tokenization


@pytest.mark.parametrize("workers", [1, 2])
def test_prepared_bytes_equal_a_direct_tokenization(tmp_path, monkeypatch, workers):
    monkeypatch.setattr(corpus, "CHUNK_BYTES", 64)  # many chunks, cut at line breaks, in two processes
    data = write_texts(tmp_path / "data")
    manifest = prepare_corpus(data, tmp_path / "prep", ByteTokenizer(), workers=workers)
    assert manifest["dtype"] == "uint16" and sorted(manifest["languages"]) == ["en", "hi", "ru"]
    for lang, text in TEXTS.items():
        ids, starts = prepared_arrays(tmp_path / "prep", lang, np.uint16)
        want_ids, want_starts = direct(text, lambda s: np.frombuffer(s, dtype=np.uint8).astype(np.int64) + 4)
        assert np.array_equal(ids, want_ids) and np.array_equal(starts, want_starts)
        assert manifest["languages"][lang]["lines"] == len(want_starts) - 1


def test_a_vocabulary_over_65536_is_prepared_as_uint32(tmp_path):
    class Large(ByteTokenizer):  # XLM-R's size: ids beyond uint16
        vocab_size = 250_002

        def encode_lines(self, lines):
            ids, lengths = super().encode_lines(lines)
            return ids + 200_000, lengths

    prepare_corpus(write_texts(tmp_path / "data"), tmp_path / "prep", Large())
    ids, _ = prepared_arrays(tmp_path / "prep", "ru", np.uint32)
    assert read_manifest(tmp_path / "prep")["dtype"] == "uint32"
    assert np.array_equal(ids, direct(TEXTS["ru"], lambda s: np.frombuffer(s, dtype=np.uint8).astype(np.int64) + 200_004)[0])


@pytest.mark.skipif(importlib.util.find_spec("sentencepiece") is None, reason="needs sentencepiece")
def test_prepared_sentencepiece_ids_equal_a_direct_tokenization(tmp_path, monkeypatch):
    import sentencepiece
    monkeypatch.setattr(corpus, "CHUNK_BYTES", 64)  # several chunks: the workers make their own tokenizer
    data = write_texts(tmp_path / "data")
    sentencepiece.SentencePieceTrainer.train(input=str(data / "en.txt"), model_prefix=str(tmp_path / "sp"),
                                             vocab_size=16, minloglevel=2)
    tok = corpus.SentencePieceTokenizer(tmp_path / "sp.model")
    prepare_corpus(data, tmp_path / "prep", tok, workers=2)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    fairseq = lambda s: np.array([3 if i == 0 else i + 1 for i in sp.encode(s.decode())])  # <unk>=3, piece+1
    for lang, text in TEXTS.items():  # ru and hi are unknown to an English model: <unk> there
        ids, starts = prepared_arrays(tmp_path / "prep", lang, np.uint16)
        want_ids, want_starts = direct(text, fairseq)
        assert np.array_equal(ids, want_ids) and np.array_equal(starts, want_starts)


# ------------------------------------------------------------------------------------------------
# The cache: interrupted, changed, corrupt, up to date, unwritable


def test_an_interrupted_preparation_is_redone(tmp_path, monkeypatch):
    data = write_texts(tmp_path / "data")
    real, calls = corpus.tokenize_chunk, []

    def killed(task, tok=None):  # the second language dies half-way, as under kill -9
        calls.append(task)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(task, tok)

    monkeypatch.setattr(corpus, "tokenize_chunk", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(data, tmp_path / "prep", ByteTokenizer())
    assert list(read_manifest(tmp_path / "prep")["languages"]) == ["en"]  # nothing else looks complete
    monkeypatch.setattr(corpus, "tokenize_chunk", real)
    prepare_corpus(data, tmp_path / "prep", ByteTokenizer())
    ids, starts = prepared_arrays(tmp_path / "prep", "hi", np.uint16)
    assert np.array_equal(ids, direct(TEXTS["hi"], lambda s: np.frombuffer(s, dtype=np.uint8).astype(np.int64) + 4)[0])


def test_a_changed_source_or_tokenizer_is_prepared_again_and_said_so(tmp_path, capsys):
    data = write_texts(tmp_path / "data")
    prepare_corpus(data, tmp_path / "prep", ByteTokenizer())
    before = (tmp_path / "prep" / "manifest.json").stat().st_mtime_ns
    prepare_corpus(data, tmp_path / "prep", ByteTokenizer())  # up to date: nothing is written
    assert (tmp_path / "prep" / "manifest.json").stat().st_mtime_ns == before
    (data / "ru.txt").write_text("новая строка\n", encoding="utf-8")
    capsys.readouterr()
    manifest = prepare_corpus(data, tmp_path / "prep", ByteTokenizer())
    assert "ru.txt changed since it was prepared" in capsys.readouterr().out
    assert manifest["languages"]["ru"]["lines"] == 1
    assert np.array_equal(prepared_arrays(tmp_path / "prep", "ru", np.uint16)[0],
                          np.frombuffer("новая строка".encode(), dtype=np.uint8) + 4)
    other = json.loads((tmp_path / "prep" / "manifest.json").read_text())
    other["tokenizer"] = {"kind": "spm", "sha256": "0" * 64}
    (tmp_path / "prep" / "manifest.json").write_text(json.dumps(other))
    prepare_corpus(data, tmp_path / "prep", ByteTokenizer())
    assert "another tokenizer" in capsys.readouterr().out
    assert read_manifest(tmp_path / "prep")["tokenizer"] == {"kind": "byte"}


def test_corrupt_prepared_files_and_unwritable_folders_are_clear_errors(tmp_path):
    data = write_texts(tmp_path / "data")
    manifest = prepare_corpus(data, tmp_path / "prep", ByteTokenizer())
    with open(tmp_path / "prep" / "en.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(BadInput, match="en.bin is corrupt or incomplete.*delete .*manifest.json and run again"):
        open_corpus(manifest, tmp_path / "prep", data)
    (tmp_path / "prep" / "manifest.json").unlink()  # as the message says: then it is prepared again
    c = open_corpus(prepare_corpus(data, tmp_path / "prep", ByteTokenizer()), tmp_path / "prep", data)
    assert len(c.tokens[c.langs.index("en")]) == manifest["languages"]["en"]["tokens"]
    (tmp_path / "prep" / "manifest.json").write_text("{not json")
    with pytest.raises(BadInput, match="manifest.json is corrupt"):
        prepare_corpus(data, tmp_path / "prep", ByteTokenizer())
    (tmp_path / "file").write_text("")
    with pytest.raises(BadInput, match="--prepared"):
        prepare_corpus(data, tmp_path / "file", ByteTokenizer())


def test_a_bad_byte_names_the_file_and_line_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "CHUNK_BYTES", 16)
    data = write_texts(tmp_path / "data", {"de": "gut\nsehr gut\n" * 5})
    with open(data / "de.txt", "ab") as f:
        f.write("stra\u00dfe\n".encode("latin-1"))  # line 11: not UTF-8
    with pytest.raises(BadInput, match=r"de.txt, line 11: not UTF-8"):
        prepare_corpus(data, tmp_path / "prep", ByteTokenizer())


# ------------------------------------------------------------------------------------------------
# The validation split, sequences and batches


def test_validation_split_by_hand():
    # 100 lines of 29 tokens: 31 with <s> and </s>, 3100 in all; a tenth is 310: the last 10 lines
    assert first_validation_line(np.arange(0, 2901, 29)) == 90
    # 10,000 lines: 8192 tokens at most (VAL_TOKENS), 264 lines of 31
    assert first_validation_line(np.arange(0, 290_001, 29)) == 10_000 - 264
    assert first_validation_line(np.array([0, 500, 501])) == 1  # at least one line held out, never all
    assert first_validation_line(np.array([0, 5])) == 1  # one line: no validation


def test_sequences_pack_whole_lines_and_cut_long_ones_by_hand():
    tok = ByteTokenizer()
    tokens = np.arange(10, 40)  # lines of 3, 4, 2, 12 and 9 tokens
    starts = np.array([0, 3, 7, 9, 21, 30])
    row, line, offset = sequence(tokens, starts, 0, 0, 5, 14, tok)  # <s> 3 </s> <s> 4 </s>; 2 + 2 more do not fit
    assert row.tolist() == [1, 10, 11, 12, 2, 1, 13, 14, 15, 16, 2, 0, 0, 0] and (line, offset) == (2, 0)
    row, line, offset = sequence(tokens, starts, 0, 0, 5, 15, tok)
    assert row.tolist() == [1, 10, 11, 12, 2, 1, 13, 14, 15, 16, 2, 1, 17, 18, 2] and (line, offset) == (3, 0)
    row, line, offset = sequence(tokens, starts, 3, 0, 5, 8, tok)  # a line of 12 > 8 - 2: pieces of 6
    assert row.tolist() == [1, 19, 20, 21, 22, 23, 24, 2] and (line, offset) == (3, 6)
    row, line, offset = sequence(tokens, starts, 3, 6, 5, 8, tok)  # its last piece, then no room
    assert row.tolist() == [1, 25, 26, 27, 28, 29, 30, 2] and (line, offset) == (4, 0)
    row, line, offset = sequence(tokens, starts, 2, 0, 3, 14, tok)  # line 3 is beyond end_line
    assert row.tolist() == [1, 17, 18, 2] + [0] * 10 and line == 3


def test_a_long_held_out_document_is_evaluated_up_to_val_tokens():
    tok = ByteTokenizer()
    starts = np.array([0, 10, 20, 100_020])  # two short lines and a document of 100,000 tokens, held out
    c = corpus.Corpus(["xx"], [np.full(100_020, 7)], [starts], np.array([2]), np.array([24.0]))
    val, lang = validation_rows(c, 256, tok)
    assert len(val) == corpus.VAL_TOKENS // 256 and (val[:, 0] == tok.bos).all() and (val[:, 1:-1] == 7).all()


def test_global_batches_sample_languages_by_q_and_depend_on_step_only(tmp_path):
    # every line 29 letters: 31 tokens with <s> and </s>, two to a 64-token sequence
    write_texts(tmp_path / "data", {lang: (lang[0] * 29 + "\n") * k for lang, k in {"aa": 400, "bb": 100, "cc": 20}.items()})
    tok = ByteTokenizer()
    c = open_corpus(prepare_corpus(tmp_path / "data", tmp_path / "prep", tok), tmp_path / "prep", tmp_path / "data")
    assert c.langs == ["aa", "bb", "cc"] and c.n_train.tolist() == [360, 90, 18]  # a tenth held out
    assert c.n_tokens.tolist() == [360 * 31, 90 * 31, 18 * 31]
    val, lang = validation_rows(c, 64, tok)
    assert lang.tolist() == [0] * 20 + [1] * 5 + [2] and (val[:, 62:] == tok.pad).all()
    q = sampling_probs(c.n_tokens, 0.7)
    counts = np.zeros(3)
    for step in range(40):
        inp, labels = global_batch(step, 0, 256, 64, q, c, tok)
        original = np.where(labels != -100, labels, inp)
        assert (original[:, 0] == tok.bos).all() and (original[:, 30] == tok.eos).all()  # whole lines
        assert np.isin(original[:, 31], [tok.bos, tok.pad]).all()  # a second line, unless the first was the last
        letter = np.array([np.bincount(r[r >= 4]).argmax() - 4 for r in original])  # the row's letter byte
        counts += [(letter == ord(ch)).sum() for ch in "abc"]
    assert np.allclose(counts / counts.sum(), q, atol=0.015)
    a, b = (global_batch(7, 0, 32, 64, q, c, tok) for _ in range(2))
    other = global_batch(8, 0, 32, 64, q, c, tok)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and not np.array_equal(a[0], other[0])


def labelled_lines(sizes, seed=0):
    """Per language, lines that each carry a unique readable label ("de line 017 ...") and 1-3 filler
    words, so that a decoded batch tells which line each sequence came from. Lines of 14-26 bytes
    (16-28 tokens): any two consecutive lines fit in one 64-token sequence, so a sequence that starts
    with a language's last training line takes the first held-out one along, unless it stops there."""
    rng = np.random.default_rng(seed)
    word = lambda: "".join(rng.choice(list("abcdefghij"), rng.integers(2, 5)))
    return {lang: [f"{lang} line {i:03d} " + " ".join(word() for _ in range(rng.integers(1, 4))) for i in range(n)]
            for lang, n in sizes.items()}


def write_labelled(folder, lines):
    """<lang>.txt files as a user's are: a blank line now and then, spaces around some lines (which
    preparation drops)."""
    return write_texts(folder, {lang: "".join(("  " + s + " \n" if i % 5 == 2 else s + "\n") + ("\n" if i % 7 == 3 else "")
                                              for i, s in enumerate(ls)) for lang, ls in lines.items()})


def split_by_hand(lines):
    """-> (training lines, held-out lines) of one language by the documented rule: the last lines that
    hold at most min(8192, a tenth of the language's tokens) tokens, counting <s> and </s>; at least
    one line, never all. Bytes: a line of b bytes is b + 2 tokens."""
    size = [len(s.encode()) + 2 for s in lines]
    budget, held, used = min(8192, sum(size) // 10), 0, 0
    while held < len(lines) and used + size[-1 - held] <= budget:
        used, held = used + size[-1 - held], held + 1
    held = min(max(held, 1), len(lines) - 1)
    return lines[:len(lines) - held], lines[len(lines) - held:]


def decode_lines(inp, labels, tok):
    """The text lines of each row of a masked batch (the labels give the masked tokens back): a row is
    <s> line </s> <s> line </s> ..., then padding, and holds at least one line."""
    rows = []
    for r in np.where(labels != -100, labels, inp):
        lines, i = [], 0
        while i < len(r) and r[i] == tok.bos:
            j = i + 1 + int(np.flatnonzero(r[i + 1:] == tok.eos)[0])
            assert (r[i + 1:j] >= 4).all(), r
            lines.append(bytes((r[i + 1:j] - 4).astype(np.uint8).tolist()).decode())
            i = j + 1
        assert lines and (r[i:] == tok.pad).all(), r
        rows.append(lines)
    return rows


def test_batches_never_hold_a_validation_line_and_reach_every_training_line(tmp_path):
    lines = labelled_lines({"de": 60, "en": 35, "sw": 4})
    write_labelled(tmp_path / "data", lines)
    tok = ByteTokenizer()
    c = open_corpus(prepare_corpus(tmp_path / "data", tmp_path / "prep", tok), tmp_path / "prep", tmp_path / "data")
    split = {lang: split_by_hand(ls) for lang, ls in lines.items()}
    assert len(split["sw"][1]) == 1  # 4 lines: a tenth of their tokens is less than a line, one is held out
    assert c.langs == ["de", "en", "sw"] and c.n_train.tolist() == [len(split[lang][0]) for lang in c.langs]
    val, lang = validation_rows(c, 64, tok)
    val_lines = decode_lines(val, np.full_like(val, -100), tok)
    for i, code in enumerate(c.langs):  # exactly the held-out lines, in order
        assert [s for row, k in zip(val_lines, lang) if k == i for s in row] == split[code][1]
    train = {s for t, _ in split.values() for s in t}
    held = {s for _, h in split.values() for s in h}
    seen, q = collections.Counter(), np.full(3, 1 / 3)
    for step in range(30):
        for row in decode_lines(*global_batch(step, 0, 256, 64, q, c, tok), tok):
            seen.update(row)
            code, first = row[0][:2], lines[row[0][:2]].index(row[0])  # a row: consecutive lines of one language
            assert row == lines[code][first:first + len(row)], row
    assert not set(seen) & held, sorted(set(seen) & held)[:5]
    assert set(seen) == train, sorted(train - set(seen))[:5]  # every training line can be drawn


# ------------------------------------------------------------------------------------------------
# Masking and language sampling against hand computations


def test_bert_masking_statistics():
    tok = ByteTokenizer()
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 260, size=(256, 512))
    ids[:, 0], ids[:, 100], ids[:, 101], ids[:, -50:] = 1, 2, 1, 0  # <s>, </s>, <s>, padding
    inp, labels = bert_mask(ids, np.random.default_rng(1), tok)
    special = ids < 4
    assert (labels[special] == -100).all() and (inp[special] == ids[special]).all()  # never touched
    sel = labels != -100
    assert (labels[sel] == ids[sel]).all()  # the label is the original token
    assert abs(sel.sum() / (~special).sum() - 0.15) < 0.005  # 15% of the non-special tokens
    to_mask, kept = inp[sel] == 3, inp[sel] == ids[sel]
    replaced = ~to_mask & ~kept
    # a random byte equals the original with probability 1/256, so "unchanged" is 10% + 10%/256
    assert abs(to_mask.mean() - 0.8) < 0.01
    assert abs(kept.mean() - (0.1 + 0.1 / 256)) < 0.01
    assert abs(replaced.mean() - (0.1 - 0.1 / 256)) < 0.01
    assert (inp[sel][replaced] >= 4).all() and (inp[sel][replaced] < 260).all()  # a byte, never a special
    assert len(np.unique(inp[sel][replaced])) > 250  # drawn over all 256 bytes
    assert (inp[~sel & ~special] == ids[~sel & ~special]).all()


def test_sampling_probabilities_follow_n_to_the_alpha():
    n = [1000.0, 100.0, 10.0]
    total = sum(n)
    for alpha in (0.7, 0.3, 1.0, 0.0):
        p = [x / total for x in n]
        hand = [x ** alpha / sum(y ** alpha for y in p) for x in p]  # Conneau and Lample 2019
        assert np.allclose(sampling_probs(n, alpha), hand, rtol=1e-12)


def test_the_default_corpus_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "make_synthetic", lambda out, seed: (os.makedirs(out / "mlm"), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        corpus.synthetic_corpus(tmp_path / "world")
    assert not (tmp_path / "world").exists()  # a killed generation leaves nothing that looks finished
