"""
Tests of the synthetic world: python -m pytest -q test_synth_draft.py

The world is generated once per module (seed 0) and every file is read back with small parsers
written here, independently of the generator, following XTREME.md sections 3.2-3.5.
"""

import csv
import io
import json
import os
import unicodedata

import pytest

from eval_xtreme import SYN_LANGS, SYN_SIZES, make_synthetic

_SYN_TEST_UPOS = {"ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN",
                  "PUNCT", "SCONJ", "SYM", "VERB", "X"}
_SYN_TEST_NER = {"O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"}


@pytest.fixture(scope="module")
def _syn_test_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return str(out), make_synthetic(str(out), seed=0)


def _syn_test_all_files(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def _syn_test_read_tagging(path):
    """XTREME.md 3.3/3.4: word<TAB>tag lines, one blank line between sentences, none at the end."""
    with open(path, "rb") as f:
        text = f.read().decode("utf-8")
    assert "\r" not in text and text.endswith("\n") and not text.endswith("\n\n"), path
    sentences = []
    for block in text[:-1].split("\n\n"):
        sent = []
        for line in block.split("\n"):
            fields = line.split("\t")
            assert len(fields) == 2 and fields[0] and fields[1], (path, line)
            assert not any(ch.isspace() for ch in fields[0]), (path, line)
            sent.append((fields[0], fields[1]))
        sentences.append(sent)
    return sentences


def _syn_test_read_pairs(path):
    """XTREME.md 3.2: rows from csv.writer(delimiter TAB): CRLF, no header; read back as XTREME
    does, with quoting off, so that quote characters stay in the text."""
    with open(path, "rb") as f:
        raw = f.read().decode("utf-8")
    lines = raw.split("\r\n")
    assert lines[-1] == "" and all("\n" not in line and "\r" not in line for line in lines[:-1]), path
    rows = list(csv.reader(io.StringIO(raw, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    assert all(len(r) == 3 for r in rows), path
    # the file is exactly what csv.writer writes for the quote-aware reading of itself
    decoded = list(csv.reader(io.StringIO(raw, newline=""), delimiter="\t"))
    buf = io.StringIO(newline="")
    csv.writer(buf, delimiter="\t").writerows(decoded)
    assert buf.getvalue() == raw, path
    return rows, decoded


def _syn_test_entities(sent):
    """IOB2 chunks (type, text); asserts that no I-X follows O or another type."""
    chunks, prev = [], "O"
    for w, t in sent:
        if t.startswith("I-"):
            assert prev != "O" and prev[2:] == t[2:], sent
            chunks[-1] = (chunks[-1][0], chunks[-1][1] + " " + w)
        elif t.startswith("B-"):
            chunks.append((t[2:], w))
        prev = t
    return chunks


def _syn_test_script(ch):
    return unicodedata.name(ch).split()[0]


def test_synth_layout_and_counts(_syn_test_world):
    root, summary = _syn_test_world
    expected = {os.path.join("mlm", f"{lang}.txt") for lang in SYN_LANGS}
    for task in ("udpos", "panx", "pawsx"):
        expected.add(os.path.join(task, "train-en.tsv"))
        expected |= {os.path.join(task, f"{s}-{lang}.tsv") for s in ("dev", "test") for lang in SYN_LANGS}
    expected |= {os.path.join("squad", "train-v1.1.json"), os.path.join("squad", "dev-v1.1.json")}
    expected |= {os.path.join("xquad", f"xquad.{lang}.json") for lang in SYN_LANGS}
    assert set(_syn_test_all_files(root)) == expected
    assert summary["languages"] == list(SYN_LANGS) and summary["train_language"] == "en"
    assert SYN_SIZES == {"train": 2000, "dev": 200, "test": 300}
    for task in ("udpos", "panx"):
        for name, n in summary["counts"][task].items():
            assert len(_syn_test_read_tagging(os.path.join(root, task, name + ".tsv"))) == n
            assert n == SYN_SIZES[name.split("-")[0]]
    for name, n in summary["counts"]["pawsx"].items():
        assert len(_syn_test_read_pairs(os.path.join(root, "pawsx", name + ".tsv"))[0]) == n
        assert n == SYN_SIZES[name.split("-")[0]]
    assert summary["counts"]["squad"] == {"train-v1.1": 2000, "dev-v1.1": 200}
    assert summary["counts"]["xquad"] == {f"xquad.{lang}": 300 for lang in SYN_LANGS}


def test_synth_deterministic_for_a_seed(_syn_test_world, tmp_path):
    root, _ = _syn_test_world
    make_synthetic(str(tmp_path / "again"), seed=0)
    make_synthetic(str(tmp_path / "other"), seed=1)
    a = _syn_test_all_files(root)
    assert _syn_test_all_files(tmp_path / "again") == a  # byte-identical
    b = _syn_test_all_files(tmp_path / "other")
    assert set(b) == set(a) and all(b[k] != a[k] for k in a)


def test_synth_languages_scripts_and_corpus_sizes(_syn_test_world):
    root, summary = _syn_test_world
    assert len(SYN_LANGS) >= 6 and SYN_LANGS[0] == "en"
    scripts, sizes = set(), []
    for lang in SYN_LANGS:
        with open(os.path.join(root, "mlm", f"{lang}.txt"), "rb") as f:
            data = f.read()
        sizes.append(len(data))
        assert summary["info"][lang]["mlm_bytes"] == len(data)
        text = data.decode("utf-8")
        assert text.endswith("\n") and "" not in text[:-1].split("\n")
        letters = [ch for ch in text[:20000] if ch.isalpha()]
        own = {_syn_test_script(ch) for ch in letters if not ch.isascii()}  # names are Latin everywhere
        declared = summary["info"][lang]["script"].upper()
        assert own <= {declared}, (lang, own)
        if declared != "LATIN":
            assert sum(not ch.isascii() for ch in letters) > len(letters) / 2, lang
        scripts |= {_syn_test_script(ch) for ch in letters}
    assert len(scripts) >= 3 and {"LATIN", "CYRILLIC", "GREEK"} <= scripts
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)  # high- to low-resource
    assert sizes[0] > 1_000_000 and sizes[-1] < 200_000 and sum(sizes) < 5_200_000


def test_synth_udpos_files(_syn_test_world):
    root, _ = _syn_test_world
    train = _syn_test_read_tagging(os.path.join(root, "udpos", "train-en.tsv"))
    tags = {t for s in train for _, t in s}
    assert tags <= _SYN_TEST_UPOS and len(tags) >= 12
    for split in ("dev", "test"):
        per_lang = {lang: _syn_test_read_tagging(os.path.join(root, "udpos", f"{split}-{lang}.tsv"))
                    for lang in SYN_LANGS}
        for lang, sents in per_lang.items():
            assert {t for s in sents for _, t in s} <= _SYN_TEST_UPOS, lang
        # parallel meanings: numbers and names are the same anchors in every language
        for i in range(SYN_SIZES[split]):
            anchors = {lang: sorted(w for w, t in per_lang[lang][i] if t in ("NUM", "PROPN")) for lang in SYN_LANGS}
            assert all(a == anchors["en"] for a in anchors.values()), anchors


def test_synth_panx_files(_syn_test_world):
    root, _ = _syn_test_world
    train = _syn_test_read_tagging(os.path.join(root, "panx", "train-en.tsv"))
    assert {t for s in train for _, t in s} == _SYN_TEST_NER
    assert all(_syn_test_entities(s) for s in train)  # every sentence names an entity
    multiword = [c for s in train for c in _syn_test_entities(s) if " " in c[1]]
    assert {c[0] for c in multiword} == {"PER", "ORG", "LOC"}
    for split in ("dev", "test"):
        per_lang = {lang: _syn_test_read_tagging(os.path.join(root, "panx", f"{split}-{lang}.tsv"))
                    for lang in SYN_LANGS}
        for i in range(SYN_SIZES[split]):
            ents = {lang: sorted(_syn_test_entities(per_lang[lang][i])) for lang in SYN_LANGS}
            assert ents["en"] and all(e == ents["en"] for e in ents.values()), ents
            assert all(text.isascii() for _, text in ents["en"])  # Latin-script names everywhere


def test_synth_pawsx_files(_syn_test_world):
    root, _ = _syn_test_world
    rows, decoded = _syn_test_read_pairs(os.path.join(root, "pawsx", "train-en.tsv"))
    assert {r[2] for r in rows} == {"0", "1"}
    assert 0.4 < sum(r[2] == "1" for r in rows) / len(rows) < 0.6
    quoted = [r for r in rows if r[0].startswith('"') or r[1].startswith('"')]
    assert quoted and all('""' in (r[0] + r[1]) for r in quoted)  # csv quoting, kept by QUOTE_NONE
    for r, d in zip(rows, decoded):  # PAWS-style: both sentences share most of their words
        a, b = d[0].lower().split(), d[1].lower().split()
        assert d[0] != d[1] and len(set(a) & set(b)) >= 0.4 * min(len(set(a)), len(set(b))), d
    for split in ("dev", "test"):
        labels = None
        for lang in SYN_LANGS:
            rows, _ = _syn_test_read_pairs(os.path.join(root, "pawsx", f"{split}-{lang}.tsv"))
            assert {r[2] for r in rows} == {"0", "1"}, lang
            assert labels is None or [r[2] for r in rows] == labels  # parallel across languages
            labels = [r[2] for r in rows]


def test_synth_squad_and_xquad_files(_syn_test_world):
    root, _ = _syn_test_world
    ids = {}
    paths = [("squad/train-v1.1.json", "en", 2000), ("squad/dev-v1.1.json", "en", 200)] + \
        [(f"xquad/xquad.{lang}.json", lang, 300) for lang in SYN_LANGS]
    for name, lang, n in paths:
        with open(os.path.join(root, name), encoding="utf-8") as f:
            d = json.load(f)
        assert d["version"] == "1.1" and isinstance(d["data"], list)
        qids = []
        for art in d["data"]:
            assert isinstance(art["title"], str)
            for p in art["paragraphs"]:
                ctx = p["context"]
                assert len(ctx.encode("utf-8")) <= 320 and ctx.count(" . ") + ctx.count(" । ") >= 1
                for qa in p["qas"]:
                    qids.append(qa["id"])
                    assert qa["question"].endswith(("?", ";", "؟")), qa
                    (ans,) = qa["answers"]
                    s, text = ans["answer_start"], ans["text"]
                    assert text and text == text.strip() and ctx[s:s + len(text)] == text, (ctx, ans)
                    assert (s == 0 or ctx[s - 1] == " ") and (s + len(text) == len(ctx) or ctx[s + len(text)] == " ")
        assert len(qids) == n and len(set(qids)) == n, name
        ids[name] = qids
    xq = [ids[f"xquad/xquad.{lang}.json"] for lang in SYN_LANGS]
    assert all(q == xq[0] for q in xq)  # XQuAD: the same question ids in every language
    assert not set(xq[0]) & set(ids["squad/train-v1.1.json"])
