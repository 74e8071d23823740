"""
Tests of the synthetic world (synthetic.py): python -m pytest -q test_synthetic.py

The world is written once (seed 0) and read back with parsers written here, never with the generator's
own code: the file layout and counts, determinism for a seed (the command line must write the same
bytes), scripts and corpus sizes, code-switching in the pre-training text only, the structure of the
pre-training lines, length limits, each task's files (udpos, panx, pawsx, squad, xquad) in XTREME's
formats, parallel across languages, and each task's declaration of its own test languages. Takes about
half a minute (three worlds are written).
"""

import csv
import io
import json
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from synthetic import DECLARED, LANGS, SIZES, make_synthetic

SCRIPT = Path(__file__).resolve().parent / "synthetic.py"
UPOS = {"ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN", "PUNCT",
        "SCONJ", "SYM", "VERB", "X"}
NER = {"O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"}
TEST_FILES = {"udpos": r"test-(\w+)\.tsv", "panx": r"test-(\w+)\.tsv", "pawsx": r"test-(\w+)\.tsv",
              "xquad": r"xquad\.(\w+)\.json"}  # the test files of each task folder, with their language


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return str(out), make_synthetic(str(out), seed=0)


def all_files(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def read_tagging(path):
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


def read_pairs(path):
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


def entities(sent):
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


def script_of(ch):
    return unicodedata.name(ch).split()[0]


def run_cli(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_layout_and_counts(world):
    root, summary = world
    expected = {os.path.join("mlm", f"{lang}.txt") for lang in LANGS}
    for task in ("udpos", "panx", "pawsx"):
        expected.add(os.path.join(task, "train-en.tsv"))
        expected |= {os.path.join(task, f"{s}-{lang}.tsv") for s in ("dev", "test") for lang in LANGS}
    expected |= {os.path.join("squad", "train-v1.1.json"), os.path.join("squad", "dev-v1.1.json")}
    expected |= {os.path.join("xquad", f"xquad.{lang}.json") for lang in LANGS}
    expected |= {os.path.join(task, DECLARED) for task in TEST_FILES}
    assert set(all_files(root)) == expected
    # the summary's languages are those written: one pre-training file each, English first
    written = {name.removesuffix(".txt") for name in os.listdir(os.path.join(root, "mlm"))}
    assert set(summary["languages"]) == written and len(summary["languages"]) == len(written)
    assert summary["languages"][0] == summary["train_language"] == "en"
    for task in ("udpos", "panx"):
        for name, n in summary["counts"][task].items():
            assert len(read_tagging(os.path.join(root, task, name + ".tsv"))) == n
            assert n == SIZES[name.split("-")[0]]
    for name, n in summary["counts"]["pawsx"].items():
        assert len(read_pairs(os.path.join(root, "pawsx", name + ".tsv"))[0]) == n
        assert n == SIZES[name.split("-")[0]]
    assert summary["counts"]["squad"] == {"train-v1.1": 2000, "dev-v1.1": 200}
    assert summary["counts"]["xquad"] == {f"xquad.{lang}": 300 for lang in LANGS}


def test_cli_writes_the_same_bytes_and_another_seed_changes_every_file(world, tmp_path):
    """The command line with the default seed rewrites the fixture's world byte for byte (so the generator
    is deterministic for a seed); seed 1 changes every file but keeps the layout."""
    root, _ = world
    result = run_cli("--out", tmp_path / "again")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert len(result.stdout.splitlines()) == 1 and str(tmp_path / "again") in result.stdout
    a = all_files(root)
    assert all_files(tmp_path / "again") == a  # byte-identical
    make_synthetic(str(tmp_path / "other"), seed=1)
    b = all_files(tmp_path / "other")
    # the declarations of the languages depend on no seed
    assert set(b) == set(a) and all(b[k] != a[k] for k in a if os.path.basename(k) != DECLARED)


def test_cli_bad_out_gives_one_error_line_and_exit_2(tmp_path):
    taken = tmp_path / "a-file"
    taken.write_text("not a folder\n")
    result = run_cli("--out", taken, "--seed", 3)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: ")
    assert str(taken) in result.stderr and "Traceback" not in result.stderr
    assert taken.read_text() == "not a folder\n"
    result = run_cli()  # --out is required: argparse's usage error, also exit 2
    assert result.returncode == 2 and "--out" in result.stderr and "Traceback" not in result.stderr


def test_languages_scripts_and_corpus_sizes(world):
    root, summary = world
    assert len(LANGS) >= 6 and LANGS[0] == "en"
    scripts, sizes = set(), []
    for lang in LANGS:
        with open(os.path.join(root, "mlm", f"{lang}.txt"), "rb") as f:
            data = f.read()
        sizes.append(len(data))
        assert summary["info"][lang]["mlm_bytes"] == len(data)
        text = data.decode("utf-8")
        assert text.endswith("\n") and "" not in text[:-1].split("\n")
        letters = [ch for ch in text[:20000] if ch.isalpha()]
        own = {script_of(ch) for ch in letters if not ch.isascii()}  # names are Latin everywhere
        declared = summary["info"][lang]["script"].upper()
        assert own <= {declared}, (lang, own)
        if declared != "LATIN":
            assert sum(not ch.isascii() for ch in letters) > len(letters) / 2, lang
        scripts |= {script_of(ch) for ch in letters}
    assert len(scripts) >= 3 and {"LATIN", "CYRILLIC", "GREEK"} <= scripts
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)  # high- to low-resource
    assert sizes[0] > 1_000_000 and sizes[-1] < 200_000 and sum(sizes) < 5_200_000


def test_code_switching_only_in_the_pretraining_text(world):
    """English content words appear in the distant languages' MLM lines (about 0.3 of the lines), never
    in their labelled files, where the only ASCII words are names, numbers and punctuation."""
    root, _ = world
    english = set()
    for sent in read_tagging(os.path.join(root, "udpos", "train-en.tsv")):
        english |= {w for w, t in sent if t in ("NOUN", "VERB", "ADJ") and w.islower() and len(w) > 3}
    for lang in ("ru", "el", "ar", "hi"):
        with open(os.path.join(root, "mlm", f"{lang}.txt"), encoding="utf-8") as f:
            lines = f.read().splitlines()[:2000]
        share = sum(any(w in english for w in line.split()) for line in lines) / len(lines)
        assert 0.1 < share < 0.4, (lang, share)
        for sent in read_tagging(os.path.join(root, "udpos", f"test-{lang}.tsv")):
            assert all(t in ("PROPN", "NUM", "PUNCT") for w, t in sent if w.isascii() and w.isalpha()), sent


def test_pretraining_lines_have_structure(world):
    """Lines of one to three sentences, later ones often referring back with a pronoun, a few questions;
    a clause's time agrees with its tense (en: tomorrow, soon or a year after 2025 only with "will")."""
    root, _ = world
    with open(os.path.join(root, "mlm", "en.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    sentences = [s for line in lines for s in re.split(r"(?<= [.?]) ", line)]
    assert all(s.endswith((" .", " ?")) for s in sentences)
    assert 0.25 < sum(" . " in line for line in lines) / len(lines) < 0.6  # two or three sentences
    assert 0.02 < sum(line.endswith(" ?") for line in lines) / len(lines) < 0.15
    first = [re.split(r"(?<= [.?]) ", line)[0] for line in lines]
    later = [s for line in lines for s in re.split(r"(?<= \.) ", line)[1:]]
    pronoun_first, pronoun_later = (sum(bool(re.match(r"(He|She|It|They) ", s)) for s in group) / len(group)
                                    for group in (first, later))
    assert pronoun_later > 3 * pronoun_first, (pronoun_later, pronoun_first)  # back-reference
    future = [s for s in sentences if re.search(r"\b(tomorrow|soon|20[3-5]\d|202[6-9]|2060)\b", s)]
    assert len(future) > 100 and all(" will " in s for s in future)


def test_length_limits_and_max_bytes(world):
    """English tagging sentences have at most 100 bytes, English PAWS-X sentences at most 60; the summary's
    max_bytes are the longest items actually written."""
    root, summary = world
    longest = {}
    for task in ("udpos", "panx"):
        for name in summary["counts"][task]:
            sents = read_tagging(os.path.join(root, task, name + ".tsv"))
            sizes = [len(" ".join(w for w, _ in s).encode()) for s in sents]
            assert not name.endswith("-en") or max(sizes) <= 100, name
            longest["sentence"] = max(longest.get("sentence", 0), *sizes)
    for name in summary["counts"]["pawsx"]:
        _, decoded = read_pairs(os.path.join(root, "pawsx", name + ".tsv"))
        assert not name.endswith("-en") or all(len(a.encode()) <= 60 and len(b.encode()) <= 60 for a, b, _ in decoded)
        longest["pair"] = max(longest.get("pair", 0), *(len(a.encode()) + len(b.encode()) for a, b, _ in decoded))
    assert {k: summary["max_bytes"][k] for k in longest} == longest


def test_udpos_files(world):
    root, _ = world
    train = read_tagging(os.path.join(root, "udpos", "train-en.tsv"))
    tags = {t for s in train for _, t in s}
    assert tags <= UPOS and len(tags) >= 12
    for split in ("dev", "test"):
        per_lang = {lang: read_tagging(os.path.join(root, "udpos", f"{split}-{lang}.tsv")) for lang in LANGS}
        for lang, sents in per_lang.items():
            assert {t for s in sents for _, t in s} <= UPOS, lang
        # parallel meanings: numbers and names are the same anchors in every language
        for i in range(SIZES[split]):
            anchors = {lang: sorted(w for w, t in per_lang[lang][i] if t in ("NUM", "PROPN")) for lang in LANGS}
            assert all(a == anchors["en"] for a in anchors.values()), anchors


def test_panx_files(world):
    root, _ = world
    train = read_tagging(os.path.join(root, "panx", "train-en.tsv"))
    assert {t for s in train for _, t in s} == NER
    assert all(entities(s) for s in train)  # every sentence names an entity
    multiword = [c for s in train for c in entities(s) if " " in c[1]]
    assert {c[0] for c in multiword} == {"PER", "ORG", "LOC"}
    for split in ("dev", "test"):
        per_lang = {lang: read_tagging(os.path.join(root, "panx", f"{split}-{lang}.tsv")) for lang in LANGS}
        for i in range(SIZES[split]):
            ents = {lang: sorted(entities(per_lang[lang][i])) for lang in LANGS}
            assert ents["en"] and all(e == ents["en"] for e in ents.values()), ents
            assert all(text.isascii() for _, text in ents["en"])  # Latin-script names everywhere


def test_pawsx_files(world):
    root, _ = world
    rows, decoded = read_pairs(os.path.join(root, "pawsx", "train-en.tsv"))
    assert {r[2] for r in rows} == {"0", "1"}
    assert 0.4 < sum(r[2] == "1" for r in rows) / len(rows) < 0.6
    quoted = [r for r in rows if r[0].startswith('"') or r[1].startswith('"')]
    assert quoted and all('""' in (r[0] + r[1]) for r in quoted)  # csv quoting, kept by QUOTE_NONE
    for r, d in zip(rows, decoded):  # PAWS-style: both sentences share most of their words
        a, b = d[0].lower().split(), d[1].lower().split()
        assert d[0] != d[1] and len(set(a) & set(b)) >= 0.4 * min(len(set(a)), len(set(b))), d
    for split in ("dev", "test"):
        labels = None
        for lang in LANGS:
            rows, _ = read_pairs(os.path.join(root, "pawsx", f"{split}-{lang}.tsv"))
            assert {r[2] for r in rows} == {"0", "1"}, lang
            assert labels is None or [r[2] for r in rows] == labels  # parallel across languages
            labels = [r[2] for r in rows]


def test_squad_and_xquad_files(world):
    root, _ = world
    ids = {}
    paths = [("squad/train-v1.1.json", "en", 2000), ("squad/dev-v1.1.json", "en", 200)] + \
        [(f"xquad/xquad.{lang}.json", lang, 300) for lang in LANGS]
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
    xq = [ids[f"xquad/xquad.{lang}.json"] for lang in LANGS]
    assert all(q == xq[0] for q in xq)  # XQuAD: the same question ids in every language
    assert not set(xq[0]) & set(ids["squad/train-v1.1.json"])


def test_each_task_declares_the_languages_of_its_test_files(world):
    """<task>/languages.json lists exactly the languages that have a test file in that folder, so that
    eval_xtreme.py averages this world over its own languages, not XTREME's."""
    root, _ = world
    for task, pattern in TEST_FILES.items():
        with open(os.path.join(root, task, DECLARED), encoding="utf-8") as f:
            declared = json.load(f)["languages"]
        found = {m[1] for name in os.listdir(os.path.join(root, task)) if (m := re.fullmatch(pattern, name))}
        assert len(declared) == len(set(declared)) and set(declared) == found, (task, declared, found)
