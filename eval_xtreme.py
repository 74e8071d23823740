"""
XTREME for X-MoE: the seven downstream tasks as XTREME's download script leaves them on disk, the
official metrics, a scorer for predictions in XTREME's official format, and the paper's Table 1.

    python eval_xtreme.py make-synthetic data/xtreme               # a small labelled world in XTREME's layout
    python eval_xtreme.py score --predictions runs/xmoe/predictions --labels gold/
    python eval_xtreme.py score --predictions P --labels L --json  # exactly one JSON object on stdout
    python eval_xtreme.py table runs/dense runs/smoe runs/xmoe     # rows = models, columns = tasks
    python eval_xtreme.py table runs/* --markdown                  # the same table for the README

    from eval_xtreme import TASKS, languages, load_split, score_task, summarize, write_predictions
    train = load_split("download", "panx", "train", "en")   # [{"words": [...], "labels": [...]}, ...]

The data folder DIR is the `download/` folder written by google-research/xtreme's
scripts/download_data.sh (or by make-synthetic). Its test files carry no labels: XTREME strips them
on purpose (XTREME.md section 2), so they load with labels None and serve for prediction only; gold
labels for `score` come from the original archives, or from a labelled split through write_labels.
Every layout and metric detail follows XTREME.md, which cites the official scripts; `XT` below is
google-research/xtreme, and `XT evaluate.py` its scorer.

Reading order: the tasks -> finding a split's file -> loaders -> metrics -> official label and
prediction files -> scoring folders -> the results table -> the command line.
"""

import argparse
import csv
import json
import os
import random
import re
import string
import sys
import unicodedata
from bisect import bisect
from collections import Counter
from contextlib import contextmanager
from functools import lru_cache, partial
from pathlib import Path

# ------------------------------------------------------------------------------------------------
# The tasks: kind, labels in XTREME's order, metric, test languages, files in the download layout

SPLITS = ("train", "dev", "test")
UPOS = sorted("ADJ ADP ADV AUX CCONJ DET INTJ NOUN NUM PART PRON PROPN PUNCT SCONJ SYM VERB X".split())
# the per-language numbers of each kind of task, with XT evaluate.py's names
METRICS = {"tag": ("f1", "precision", "recall"), "pair": ("accuracy",), "qa": ("exact_match", "f1")}
SQUAD_TRAIN, SQUAD_DEV = "squad/train-v1.1.json", "squad/dev-v1.1.json"
TYDI_TRAIN, TYDI_DEV = "tydiqa/tydiqa-goldp-v1.1-train/", "tydiqa/tydiqa-goldp-v1.1-dev/"


def _tsv_files(task):
    return {split: [f"{task}/{split}-{{lang}}.tsv"] for split in SPLITS}


# files: per split, the file patterns under DIR, tried in order; a pattern without {lang} is English-only
# data. langs: XT evaluate.py XTREME_TASK2LANGS, the official test languages (English included).
TASKS = {
    "udpos": dict(kind="tag", title="POS", metric="seqeval",
                  # XT utils_tag.py get_labels prepends "O" to the sorted labels.txt: 18 outputs,
                  # and "O" never occurs in the data
                  labels=["O"] + UPOS, files=_tsv_files("udpos"),
                  langs="af ar bg de el en es et eu fa fi fr he hi hu id it ja kk ko mr nl pt ru ta te th tl tr "
                        "ur vi yo zh".split()),
    "panx": dict(kind="tag", title="NER", metric="seqeval",
                 labels=["B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER", "O"],  # sorted labels.txt
                 files=_tsv_files("panx"),
                 langs="ar he vi id jv ms tl eu ml ta te af nl en de el bn hi mr ur fa fr it pt es bg ru ja ka "
                       "ko th sw yo my zh kk tr et fi hu".split()),
    "xquad": dict(kind="qa", title="XQuAD", metric="squad", labels=None,
                  # XQuAD has no training data: XT trains one SQuAD v1.1 model and validates on SQuAD dev
                  # (scripts/train_qa.sh); that same model answers XQuAD and MLQA
                  files={"train": [SQUAD_TRAIN], "dev": [SQUAD_DEV], "test": ["xquad/xquad.{lang}.json"]},
                  langs="en es de el ru tr ar vi th zh hi".split()),
    "mlqa": dict(kind="qa", title="MLQA", metric="mlqa", labels=None,
                 # English train and dev are SQuAD v1.1 as for XQuAD; MLQA's own dev sets serve the other
                 # languages. Only context language = question language counts (XT predict_qa.sh).
                 files={"train": [SQUAD_TRAIN],
                        "dev": [SQUAD_DEV, "mlqa/MLQA_V1/dev/dev-context-{lang}-question-{lang}.json"],
                        "test": ["mlqa/MLQA_V1/test/test-context-{lang}-question-{lang}.json"]},
                 langs="en es de ar hi vi zh".split()),
    "tydiqa": dict(kind="qa", title="TyDiQA", metric="squad", labels=None,
                   # the test set is TyDiQA-GoldP dev; there is no dev split: XT trains 3 epochs and keeps
                   # the final model (scripts/train_qa.sh). File names lost "goldp." before Aug 2021.
                   files={"train": [TYDI_TRAIN + "tydiqa.goldp.{lang}.train.json",
                                    TYDI_TRAIN + "tydiqa.{lang}.train.json"],
                          "test": [TYDI_DEV + "tydiqa.goldp.{lang}.dev.json", TYDI_DEV + "tydiqa.{lang}.dev.json"]},
                   langs="en ar bn fi id ko ru sw te".split()),
    "xnli": dict(kind="pair", title="XNLI", metric="accuracy",
                 labels=["contradiction", "entailment", "neutral"],  # XT processors/xnli.py get_labels
                 files=_tsv_files("xnli"), langs="ar bg de el en es fr hi ru sw th tr ur vi zh".split()),
    "pawsx": dict(kind="pair", title="PAWS-X", metric="accuracy",
                  labels=["0", "1"],  # 1 = paraphrase (XT processors/pawsx.py)
                  files=_tsv_files("pawsx"), langs="de en es fr ja ko zh".split()),
}


class DataError(ValueError):
    """Missing or malformed data; the message names the file (and line) and says what to do."""


def _spec(task):
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; the XTREME tasks here are {', '.join(TASKS)}")
    return TASKS[task]


# ------------------------------------------------------------------------------------------------
# Finding the files of a split


def _patterns(task, split):
    files = _spec(task)["files"]
    if split not in files:
        raise DataError(f"{task} has no {split!r} split; it has {', '.join(files)}")
    return files[split]


def _lang_regex(name):
    """'test-context-{lang}-question-{lang}.json' -> a regex with the language in group 'lang'; a second
    {lang} must repeat the first (MLQA: context language = question language)."""
    parts = re.escape(name).split(re.escape("{lang}"))
    return parts[0] + r"(?P<lang>[^./\-]+)" + "(?P=lang)".join(parts[1:])


def languages(data_dir, task, split):
    """The sorted languages that have a file for this task and split under data_dir."""
    found = set()
    for pattern in _patterns(task, split):
        path = Path(data_dir, pattern)
        if "{lang}" not in pattern:
            found |= {"en"} if path.is_file() else set()
        elif path.parent.is_dir():
            name = re.compile(_lang_regex(path.name))
            found |= {m["lang"] for p in path.parent.iterdir() if (m := name.fullmatch(p.name)) and p.is_file()}
    return sorted(found)


def _found_instead(path):
    """A hint for a missing file or folder: what the nearest existing folder above it holds."""
    path = folder = Path(path)
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    gone = "" if folder == path else f"{path} does not exist; "
    return f"{gone}{folder} holds: {', '.join(names[:12]) + (', ...' if len(names) > 12 else '') or 'nothing'}"


def find_split(data_dir, task, split, lang):
    """The file of one split and language, trying XTREME's spellings newest first; DataError if none."""
    patterns = _patterns(task, split)
    candidates = [Path(data_dir, p.format(lang=lang)) for p in patterns if "{lang}" in p or lang == "en"]
    for path in candidates:
        if path.is_file():
            return path
    if not candidates:
        raise DataError(f"{task} {split} data exists only in English ({Path(data_dir, patterns[0])}); "
                        f"there is none for {lang!r}")
    found = languages(data_dir, task, split)
    seen = f"found {split} files for: {', '.join(found)}" if found else _found_instead(candidates[0].parent)
    raise DataError(f"no {task} {split} file for language {lang!r}: expected "
                    f"{' or '.join(map(str, candidates))}; {seen}. Point DIR at XTREME's download/ folder "
                    f"(scripts/download_data.sh) or run: python eval_xtreme.py make-synthetic DIR")


# ------------------------------------------------------------------------------------------------
# Loaders: tagging TSV, sentence-pair TSV, SQuAD v1.1 JSON


@contextmanager
def _reading(path):
    """Name the file (and line) in any decoding, CSV or JSON error raised while reading it."""
    try:
        yield
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}); fix or re-create it") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: {e}; the file must be UTF-8 text in XTREME's format") from None


def _check_label(path, lineno, value, labels):
    if labels is not None and value not in labels:
        raise DataError(f"{path}:{lineno}: {value!r} is not a label of this task (expected one of: "
                        f"{', '.join(labels)})")


def load_split(data_dir, task, split, lang):
    """The examples of one split and language:
    tag  -> [{"words": [...], "labels": [...] or None}]              (one per sentence)
    pair -> [{"text_a", "text_b", "label" or None}]
    qa   -> [{"id", "question", "context", "answers": [{"text", "answer_start"}] or None}]
    None = the file carries no labels (a test file after XTREME's download): for prediction only.
    QA splits as XT uses them: xquad and mlqa train on SQuAD v1.1 train and select on SQuAD dev (the
    English "dev"); tydiqa trains on English TyDiQA-GoldP train, tests on GoldP dev, and has no dev."""
    path, spec = find_split(data_dir, task, split, lang), _spec(task)
    if spec["kind"] == "tag":
        return _read_tagging(path, spec["labels"])
    if spec["kind"] == "pair":
        return _read_pairs(path, spec["labels"])
    return _squad_questions(path, _read_json(path))


def _read_tagging(path, labels):
    """XT utils_tag.py read_examples_from_file: one word a line, its tag in the last TAB field, and a
    blank line or a -DOCSTART- line ends a sentence. Test files have words only (no TAB)."""
    sentences, current = [], []
    with open(path, encoding="utf-8-sig") as f, _reading(path):  # BOM dropped; \r\n read as \n
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if line == "" or line.startswith("-DOCSTART-"):
                sentences += [current] if current else []
                current = []
                continue
            fields = line.split("\t")
            tag = fields[-1] if len(fields) > 1 else None  # no TAB: no label
            if tag is not None:
                _check_label(path, lineno, tag, labels)
            current.append((lineno, fields[0], tag))
    sentences += [current] if current else []
    return _tag_examples(path, sentences)


def _tag_examples(path, sentences):
    """A file is labelled (word<TAB>tag) or not (word only), never both."""
    tokens = [token for sentence in sentences for token in sentence]
    labelled = bool(tokens) and tokens[0][2] is not None
    for lineno, _, tag in tokens:
        if (tag is not None) != labelled:
            raise DataError(f"{path}:{lineno}: {'no' if labelled else 'a'} tag here, unlike line {tokens[0][0]}; "
                            "a file holds either word<TAB>tag lines (train, dev) or words only (test)")
    return [{"words": [word for _, word, _ in s], "labels": [tag for *_, tag in s] if labelled else None}
            for s in sentences]


def _read_pairs(path, labels):
    """XNLI / PAWS-X: no header, text_a<TAB>text_b<TAB>label, or no label column in test files. The
    files were written by csv.writer (CRLF, quoted fields holding '"'); XT reads them back with
    quotechar=None (transformers _read_tsv), so the quotes stay in the text: csv.QUOTE_NONE here."""
    with open(path, encoding="utf-8-sig", newline="") as f, _reading(path):
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        examples = [_pair_example(path, lineno, row, labels) for lineno, row in enumerate(rows, 1)]
    for lineno, ex in enumerate(examples, 1):
        if (ex["label"] is None) != (examples[0]["label"] is None):
            raise DataError(f"{path}:{lineno}: {'no' if ex['label'] is None else 'a'} label column here, unlike "
                            "line 1; a file holds either 3 columns (train, dev) or 2 (test)")
    return examples


def _pair_example(path, lineno, row, labels):
    if len(row) not in (2, 3):
        raise DataError(f"{path}:{lineno}: {len(row)} TAB-separated fields; expected text_a<TAB>text_b<TAB>label "
                        "(train, dev) or text_a<TAB>text_b (test)")
    label = row[2].strip() if len(row) == 3 else None  # XT processors: str(line[2].strip())
    if label is not None:
        _check_label(path, lineno, label, labels)
    return {"text_a": row[0], "text_b": row[1], "label": label}


def _read_json(path):
    with open(path, encoding="utf-8-sig") as f, _reading(path):
        return json.load(f)


def _squad_questions(path, data):
    """SQuAD v1.1 JSON -> its questions, flat. `version` is not checked: a string in SQuAD, XQuAD and
    TyDiQA, the number 1.0 in MLQA (XTREME.md section 7)."""
    try:
        return [_qa_example(paragraph, qa)
                for article in data["data"] for paragraph in article["paragraphs"] for qa in paragraph["qas"]]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: not SQuAD v1.1 JSON ({type(e).__name__}: {e}); expected {{\"data\": [{{"
                        "\"paragraphs\": [{\"context\", \"qas\": [{\"id\", \"question\", \"answers\"}]}]}]}") from None


def _qa_example(paragraph, qa):
    answers = [{"text": a["text"], "answer_start": int(a["answer_start"])} for a in qa.get("answers", [])]
    # remove_qa_test_annotations (XT utils_preprocess.py) leaves [{"answer_start": 0, "text": ""}]: no gold
    labelled = any(a["text"] for a in answers)
    return {"id": qa["id"], "question": qa["question"], "context": paragraph["context"],
            "answers": answers if labelled else None}


# ------------------------------------------------------------------------------------------------
# Metrics, exactly as XT evaluate.py and the scripts it calls; every score is x100


def accuracy(labels, predictions):
    """XT evaluate.py accuracy: the share of predictions equal to the label."""
    correct = sum(p == l for p, l in zip(predictions, labels))
    return {"accuracy": 100.0 * correct / len(predictions)}


def _chunk_ends(prev_tag, tag, prev_type, type_):
    return (prev_tag in {"E", "S"}
            or (prev_tag in {"B", "I"} and tag in {"B", "S", "O"})
            or (prev_tag not in {"O", "."} and prev_type != type_))


def _chunk_starts(prev_tag, tag, prev_type, type_):
    return (tag in {"B", "S"}
            or (prev_tag, tag) in {("E", "E"), ("E", "I"), ("S", "E"), ("S", "I"), ("O", "E"), ("O", "I")}
            or (tag not in {"O", "."} and prev_type != type_))


def get_entities(sentences):
    """seqeval 0.0.12 get_entities: chunks (type, start, end) over the sentences laid end to end, an "O"
    after each sentence (so no chunk crosses a boundary) and one more at the end. The first character
    of a label is its tag, the part after the last "-" its type: on UPOS labels a run of equal tags
    is one chunk, and SCONJ and SYM ("S") are single-token chunks (XTREME.md section 4.1)."""
    seq = [label for sentence in sentences for label in [*sentence, "O"]] + ["O"]
    chunks, begin, prev_tag, prev_type = [], 0, "O", ""
    for i, label in enumerate(seq):
        tag, type_ = label[0], label.split("-")[-1]
        if _chunk_ends(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _chunk_starts(prev_tag, tag, prev_type, type_):
            begin = i  # an I-X after O or after another type starts a chunk: lenient, like conlleval
        prev_tag, prev_type = tag, type_
    return chunks


def seqeval_scores(labels, predictions):
    """seqeval's default micro chunk F1, precision and recall (udpos and panx). Like XT, the token
    counts of a sentence are not compared; a shorter prediction shifts the chunks after it."""
    gold, pred = set(get_entities(labels)), set(get_entities(predictions))
    correct = len(gold & pred)
    p = correct / len(pred) if pred else 0.0
    r = correct / len(gold) if gold else 0.0
    f1 = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return {"f1": 100 * f1, "precision": 100 * p, "recall": 100 * r}


def squad_normalize(text):
    """SQuAD v1.1 normalize_answer (XT evaluate_squad.py), used in every XQuAD and TyDiQA language: lower
    case, drop ASCII punctuation only, drop English articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


# MLQA's articles per language (mlqa_evaluation_v1.py). For ar the regex removes every "ال", even
# inside a word ("فالكتاب" -> "ف كتاب"); hi and zh have none; any other language is an error.
MLQA_ARTICLES = {
    "en": r"\b(a|an|the)\b",
    "es": r"\b(un|una|unos|unas|el|la|los|las)\b",
    "de": r"\b(ein|eine|einen|einem|eines|einer|der|die|das|den|dem|des)\b",
    "vi": r"\b(của|là|cái|chiếc|những)\b",
    "ar": r"\sال^|ال",
    "hi": None,
    "zh": None,
}


@lru_cache(maxsize=None)
def _mlqa_punct():
    """Every Unicode P* character plus string.punctuation (built once: it scans all code points)."""
    return frozenset(chr(i) for i in range(sys.maxunicode) if unicodedata.category(chr(i)).startswith("P")
                     ) | set(string.punctuation)


def _mixed_segmentation(text):
    """MLQA for zh: each CJK character (U+4E00-U+9FA5) or punctuation mark is a token of its own; the
    runs between them are split on whitespace."""
    tokens, run = [], ""
    for ch in text:
        if "\u4e00" <= ch <= "\u9fa5" or ch in _mlqa_punct():
            tokens += run.split() + [ch]
            run = ""
        else:
            run += ch
    return tokens + run.split()


def mlqa_normalize(text, lang):
    """MLQA normalize_answer: lower case, drop Unicode punctuation, drop the language's articles, then
    whitespace tokens (per-character CJK tokens for zh) joined by spaces."""
    if lang not in MLQA_ARTICLES:
        raise DataError(f"Unknown Language {lang!r}: MLQA's evaluation knows {', '.join(MLQA_ARTICLES)}")
    text = "".join(ch for ch in text.lower() if ch not in _mlqa_punct())
    text = re.sub(MLQA_ARTICLES[lang], " ", text) if MLQA_ARTICLES[lang] else text
    tokens = _mixed_segmentation(text) if lang == "zh" else text.split()
    return " ".join(tokens)


def _token_f1(prediction, gold):
    common = sum((Counter(prediction) & Counter(gold)).values())
    if common == 0:
        return 0.0  # also empty vs empty: EM 1 but F1 0 (evaluate_squad.py f1_score)
    p, r = common / len(prediction), common / len(gold)
    return 2 * p * r / (p + r)


def _qa_scores(questions, predictions, normalize):
    """XT evaluate_squad.py evaluate: EM and F1 each take the max over the gold answers, and are summed
    over the questions and divided by their number. A question without a prediction scores 0."""
    em = f1 = 0.0
    for q in questions:
        if q["id"] not in predictions:
            print(f"Unanswered question {q['id']} will receive score 0.", file=sys.stderr)
            continue
        pred = normalize(predictions[q["id"]])
        golds = [normalize(a["text"]) for a in q["answers"]]
        em += max(float(pred == gold) for gold in golds)
        f1 += max(_token_f1(pred.split(), gold.split()) for gold in golds)
    return {"exact_match": 100 * em / len(questions), "f1": 100 * f1 / len(questions)}


def squad_scores(questions, predictions):
    """XQuAD and TyDiQA. questions: load_split's QA examples; predictions: {question id: answer text}."""
    return _qa_scores(questions, predictions, squad_normalize)


def mlqa_scores(questions, predictions, lang):
    """MLQA, with the test language as the answer language (XT evaluate.py)."""
    return _qa_scores(questions, predictions, partial(mlqa_normalize, lang=lang))


def score_task(task, lang, gold, predictions):
    """One language's scores. gold/predictions: tag -> lists of tag lists; pair -> lists of labels;
    qa -> load_split's questions / {question id: answer text}."""
    metric = _spec(task)["metric"]
    if metric == "seqeval":
        return seqeval_scores(gold, predictions)
    if metric == "accuracy":
        return accuracy(gold, predictions)
    if metric == "squad":
        return squad_scores(gold, predictions)
    return mlqa_scores(gold, predictions, lang)


def summarize(task, per_lang):
    """{lang: scores} -> {"avg_<metric>": ..., "avg_metric": ..., lang: scores}: unweighted means over the
    languages, and XT evaluate.py's task score avg_metric: (avg EM + avg F1) / 2 for QA, avg F1 for
    tagging, avg accuracy for classification."""
    kind = _spec(task)["kind"]
    out = {f"avg_{m}": sum(s[m] for s in per_lang.values()) / len(per_lang) for m in METRICS[kind]}
    if kind == "qa":
        out["avg_metric"] = (out["avg_exact_match"] + out["avg_f1"]) / 2
    else:
        out["avg_metric"] = out["avg_f1" if kind == "tag" else "avg_accuracy"]
    return {**out, **dict(sorted(per_lang.items()))}


# ------------------------------------------------------------------------------------------------
# Official label and prediction files: <folder>/<task>/test-<lang>.tsv, or .json for QA


def official_path(folder, task, lang):
    """json for xquad, mlqa and tydiqa, tsv for the others (XT evaluate.py get_suffix)."""
    return Path(folder, task, f"test-{lang}.{'json' if _spec(task)['kind'] == 'qa' else 'tsv'}")


def _write_text(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_predictions(folder, task, lang, predictions):
    """tag: one tag a line, a blank line after each sentence; pair: one label a line; qa: a flat JSON
    {question id: answer text}. Returns the path written."""
    path, kind = official_path(folder, task, lang), _spec(task)["kind"]
    if kind == "qa":
        return _write_text(path, json.dumps(predictions, ensure_ascii=False))
    if kind == "tag":
        return _write_text(path, "".join("".join(tag + "\n" for tag in s) + "\n" for s in predictions))
    return _write_text(path, "".join(label + "\n" for label in predictions))


def write_labels(folder, task, lang, examples):
    """The gold of labelled examples (as load_split returns them) as an official label file; QA gold is
    SQuAD JSON with a `data` key. Returns the path written."""
    kind = _spec(task)["kind"]
    key = {"tag": "labels", "pair": "label", "qa": "answers"}[kind]
    if any(ex[key] is None for ex in examples):
        raise DataError(f"{task} {lang}: these examples carry no labels (XTREME's download strips test labels); "
                        "take the gold from the original archives")
    if kind != "qa":
        return write_predictions(folder, task, lang, [ex[key] for ex in examples])
    qas = [{"id": q["id"], "question": q["question"], "answers": q["answers"]} for q in examples]
    articles = [{"paragraphs": [{"context": q["context"], "qas": [qa]}]} for q, qa in zip(examples, qas)]
    return _write_text(official_path(folder, task, lang), json.dumps({"version": "1.1", "data": articles},
                                                                     ensure_ascii=False))


def read_tag(path, labels=None):
    """XT evaluate.py read_tag: one tag a line (stripped), a blank line ends a sentence, and a last
    sentence without a trailing blank line still counts. With `labels`, every tag must be one of them."""
    sentences, current = [], []
    with open(path, encoding="utf-8-sig") as f, _reading(path):
        for lineno, line in enumerate(f, 1):
            tag = line.strip()
            if not tag:
                sentences.append(current)  # as XT: a second blank line in a row adds an empty sentence
                current = []
                continue
            _check_label(path, lineno, tag, labels)
            current.append(tag)
    return sentences + [current] if current else sentences


def read_label(path, labels=None):
    """XT evaluate.py read_label: one label a line, stripped."""
    with open(path, encoding="utf-8-sig") as f, _reading(path):
        values = [line.strip() for line in f]
    for lineno, value in enumerate(values, 1):
        _check_label(path, lineno, value, labels)
    return values


def read_squad(path):
    """XT evaluate.py read_squad: SQuAD JSON with a `data` key (labels) -> its questions as load_split
    returns them; a flat {question id: answer text} (predictions) -> that dict."""
    data = _read_json(path)
    if isinstance(data, dict) and "data" in data:
        return _squad_questions(path, data)
    if not (isinstance(data, dict) and all(isinstance(v, str) for v in data.values())):
        raise DataError(f"{path}: expected SQuAD JSON with a \"data\" key (labels) or a flat "
                        "{\"question id\": \"answer text\"} object (predictions)")
    return data


# ------------------------------------------------------------------------------------------------
# Scoring a folder of predictions against a folder of labels (XT evaluate.py evaluate)


def official_files(folder):
    """{task: {lang: path}} for every <task>/test-<lang>.<ext> under folder, tasks in TASKS order."""
    found = {}
    for task in TASKS:
        ext = official_path(folder, task, "xx").suffix
        langs = {p.name[len("test-"):-len(ext)]: p for p in sorted(Path(folder, task).glob(f"test-*{ext}"))}
        found.update({task: langs} if langs else {})
    return found


def _read_qa_pair(task, pred_path, label_path):
    gold, pred = read_squad(label_path), read_squad(pred_path)
    if not isinstance(gold, list) or any(q["answers"] is None for q in gold):
        raise DataError(f"{label_path}: no gold answers (SQuAD JSON with non-empty answers expected); XTREME's "
                        f"download strips them from {task} test files, take the original files")
    if not isinstance(pred, dict):
        raise DataError(f"{pred_path}: predictions must be a flat {{\"question id\": \"answer text\"}} object")
    return gold, pred


def score_file(task, lang, pred_path, label_path):
    """One language's scores from its official prediction and label files."""
    spec = _spec(task)
    if spec["kind"] == "qa":
        gold, pred = _read_qa_pair(task, pred_path, label_path)
    else:
        read = read_tag if spec["kind"] == "tag" else read_label
        gold, pred = read(label_path, spec["labels"]), read(pred_path, spec["labels"])
    if not gold:
        raise DataError(f"{label_path} holds no labels; fill it or remove it")
    if spec["kind"] != "qa" and len(gold) != len(pred):  # XT evaluate.py asserts equal counts
        unit = "sentences" if spec["kind"] == "tag" else "lines"
        raise DataError(f"{pred_path} has {len(pred)} {unit} but {label_path} has {len(gold)}; "
                        "predictions must follow the label file one for one")
    return score_task(task, lang, gold, pred)


def score_folders(pred_dir, label_dir):
    """{task: summarize(...)} for every label file under label_dir and the same-named prediction file."""
    labels = official_files(label_dir)
    if not labels:
        raise DataError(f"no label files under {label_dir}: expected <task>/test-<lang>.tsv (.json for xquad, "
                        f"mlqa, tydiqa) with task in {', '.join(TASKS)}; {_found_instead(label_dir)}")
    missing = [str(official_path(pred_dir, t, lang)) for t in labels for lang in labels[t]
               if not official_path(pred_dir, t, lang).is_file()]
    if missing:
        raise DataError(f"no prediction file for {len(missing)} label file(s): {', '.join(missing)} "
                        "(write one per label file, same name)")
    return {task: summarize(task, {lang: score_file(task, lang, official_path(pred_dir, task, lang), path)
                                   for lang, path in langs.items()})
            for task, langs in labels.items()}


def format_scores(scores):
    """A readable per-task, per-language listing of score_folders' result."""
    lines = []
    for task, s in scores.items():
        metrics, langs = METRICS[TASKS[task]["kind"]], [k for k in s if not k.startswith("avg_")]
        averages = "  ".join(f"avg_{m} {s['avg_' + m]:.2f}" for m in metrics)
        lines += [f"{task}: avg_metric {s['avg_metric']:.2f}  {averages}  (mean over {len(langs)} language(s))",
                  "  lang    " + "".join(f"{m:>13}" for m in metrics)]
        lines += [f"  {lang:<8}" + "".join(f"{s[lang][m]:13.2f}" for m in metrics) for lang in langs]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The results table, shaped like the paper's Table 1 (rows = models, mean ± std over seeds)

# the numbers of a cell, in the paper's order ("F1 / EM" for QA)
HEADLINE = {"tag": ("avg_f1",), "pair": ("avg_accuracy",), "qa": ("avg_f1", "avg_exact_match")}
METRIC_TITLES = {"tag": "F1", "pair": "Acc.", "qa": "F1 / EM"}


def _results_task(path, results):
    """The task of one results.json, after checking that it holds what the table needs."""
    task = results.get("task") if isinstance(results, dict) else None
    if task not in TASKS:
        raise DataError(f"{path}: \"task\" must be one of {', '.join(TASKS)}, found {task!r}")
    for part in ("mean", "std"):
        stats = results.get(part) if isinstance(results.get(part), dict) else {}
        missing = [k for k in HEADLINE[TASKS[task]["kind"]] if not isinstance(stats.get(k), (int, float))]
        if missing:
            raise DataError(f"{path}: \"{part}\" lacks {', '.join(missing)}; finetune.py writes {{\"task\", "
                            "\"name\", \"seeds\", \"mean\", \"std\", \"ic\"} with the task's avg_ keys")
    return task


def read_run(run_dir):
    """(row name, {task: results}) from RUN_DIR/<task>/results.json, or RUN_DIR/results.json. The row is
    named by the results' "name", else by the folder."""
    run_dir = Path(run_dir)
    direct = run_dir / "results.json"
    paths = [direct] if direct.is_file() else sorted(run_dir.glob("*/results.json"))
    if not paths:
        raise DataError(f"no results in {run_dir}: expected {run_dir}/<task>/results.json (written by "
                        f"finetune.py) or {direct}; {_found_instead(run_dir)}")
    runs = {}
    for path in paths:
        results = _read_json(path)
        runs[_results_task(path, results)] = results
    name = next((r["name"] for r in runs.values() if r.get("name")), run_dir.resolve().name)
    return name, runs


def build_table(run_dirs):
    """{"avg_over": [tasks], "rows": [{"name", "tasks": {task: {key: {"mean", "std"}}}, "avg"}]}.
    mean and std are taken from results.json as finetune.py computed them over its seeds.
    Avg is the mean of XTREME's task score avg_metric over the tasks that every row has, with QA as
    (F1 + EM) / 2: this reproduces the paper's Table 1 (Dense: 70.0, 61.1, (67.3 + 51.1)/2,
    (58.7 + 41.1)/2, (42.1 + 28.3)/2, 70.1, 84.1 average to 61.4 as printed; F1 alone gives 64.8)."""
    runs = [read_run(d) for d in run_dirs]
    common = [t for t in TASKS if all(t in results for _, results in runs)]
    rows = []
    for name, results in runs:
        cells = {t: {k: {"mean": r["mean"][k], "std": r["std"][k]} for k in HEADLINE[TASKS[t]["kind"]]}
                 for t, r in sorted(results.items(), key=lambda item: list(TASKS).index(item[0]))}
        scores = [sum(v["mean"] for v in cells[t].values()) / len(cells[t]) for t in common]
        rows.append({"name": name, "tasks": cells, "avg": sum(scores) / len(scores) if common else None})
    return {"avg_over": common, "rows": rows}


def _cell(cell):
    return " / ".join(f"{v['mean']:.1f} ± {v['std']:.1f}" for v in cell.values())


def format_table(table, markdown=False):
    """Plain text (aligned columns) or a Markdown table; a task a row lacks shows '-'."""
    header = ["Model"] + [f"{s['title']} {METRIC_TITLES[s['kind']]}" for s in TASKS.values()] + ["Avg"]
    body = [[row["name"]] + [_cell(row["tasks"][t]) if t in row["tasks"] else "-" for t in TASKS]
            + ["-" if row["avg"] is None else f"{row['avg']:.1f}"] for row in table["rows"]]
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *body]]
    else:
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *body]]
    over = ", ".join(TASKS[t]["title"] for t in table["avg_over"]) or "no task common to all rows"
    return "\n".join(lines + ["", f"Avg: mean of XTREME's task score over {over} (QA: (F1 + EM) / 2, as the "
                                  "paper's Table 1); cells: mean ± std over seeds"])


# ------------------------------------------------------------------------------------------------
# The synthetic world: a seeded multilingual world written in XTREME's layout (DESIGN.md section 7)

SYN_LANGS = ("en", "es", "de", "ru", "el", "ar", "hi")
SYN_TRAIN_LANG = "en"
SYN_SIZES = {"train": 2000, "dev": 200, "test": 300}  # sentences / pairs / questions per file
SYN_MLM_BYTES = {"en": 1_500_000, "es": 1_000_000, "de": 750_000, "ru": 550_000, "el": 380_000,
                 "ar": 240_000, "hi": 120_000}  # target size of mlm/<lang>.txt
# Code-switching in the pre-training text of every language but en: this share of lines borrows the
# English form of each of its content words with this probability (web text does), an anchor for the
# distant scripts besides names and numbers. The labelled task files never code-switch.
SYN_CS_LINES, SYN_CS_WORDS = 0.3, 0.3

SYN_LANG_INFO = {  # order of subject, verb, object; adjective before/after noun; adpositions
    "en": dict(script="Latin", order="SVO", adj="before", adp="prepositions", wh="front",
               relation="the training language, English-like (real English words)"),
    "es": dict(script="Latin", order="SVO", adj="after", adp="prepositions", wh="front+inversion",
               relation="close relative of en (cognates by sound changes)"),
    "de": dict(script="Latin", order="SOV", adj="before", adp="prepositions", wh="front",
               relation="close relative of en (cognates by other sound changes)"),
    "ru": dict(script="Cyrillic", order="SVO", adj="before", adp="prepositions", wh="front",
               relation="distant (own vocabulary, no articles, accusative suffix)"),
    "el": dict(script="Greek", order="SOV", adj="after", adp="postpositions", wh="front",
               relation="distant (own vocabulary, future particle)"),
    "ar": dict(script="Arabic", order="VSO", adj="after", adp="prepositions", wh="front",
               relation="distant (own vocabulary from consonant roots, article repeated on adjectives)"),
    "hi": dict(script="Devanagari", order="SOV", adj="before", adp="postpositions", wh="in situ",
               relation="distant (own vocabulary, ergative and object-marking postpositions)"),
}

# ------------------------------------------------------------------------------------------------
# The concept inventory, with its English forms. Noun classes: p people, a animals, f food,
# v vehicles, t texts, x objects, l places (B = buildings, a subset of l).

_SYN_NOUNS = {  # "word[/plural][@gender]"
    "p": "teacher doctor farmer child/children woman/women@f man/men@m king@m queen@f soldier student "
         "merchant sailor baker singer painter driver judge nurse writer friend neighbour girl@f boy@m "
         "guard pilot",
    "a": "dog cat horse bird cow goat wolf/wolves bear fox/foxes lion mouse/mice rabbit duck",
    "f": "apple cake egg pie pear lemon melon cookie sandwich/sandwiches potato/potatoes",
    "v": "car boat ship bus/buses train bicycle truck wagon",
    "t": "book letter story/stories poem map report newspaper message note song",
    "x": "key box/boxes cup knife/knives basket lamp chair table ring coin bottle hammer rope bag mirror "
         "clock bell flag hat coat",
    "l": "house city/cities river market school garden forest bridge road village park library/libraries "
         "harbour station hospital museum farm mountain island castle shop square hill tower",
}
_SYN_BUILDINGS = "house bridge road school tower castle shop library museum hospital station farm".split()

_SYN_TRANSITIVE = """
see/saw/seen pa pafvtxl      find/found/found pa pafvtx    buy/bought/bought po fvtx
sell/sold/sold po fvtx       build/built/built po Bv       carry/carried/carried pa fxt
open/opened/opened p xt      write/wrote/written p t       read/read/read p t
paint/painted/painted p xvl  bring/brought/brought pa fxt  take/took/taken p fxtv
love/loved/loved pa pafl     visit/visited/visited po plo  help/helped/helped poa pao
call/called/called po pao    follow/followed/followed pa pav  meet/met/met p p
teach/taught/taught p p      eat/ate/eaten pa f            cook/cooked/cooked p f
drive/drove/driven p v       wash/washed/washed p xva      clean/cleaned/cleaned po xvl
break/broke/broken pa xv     fix/fixed/fixed po xv         lose/lost/lost po xt
keep/kept/kept po xtfa       watch/watched/watched pa pav  hear/heard/heard pa pat
steal/stole/stolen pa fxvt   hide/hid/hidden pa fxt
"""  # base/past/participle, agent classes, patient classes (o = organisations)
_SYN_SYMMETRIC = "see find love help call follow meet teach watch hear visit".split()  # p -> p
_SYN_INTRANSITIVE = """sleep/slept pa  sing/sang pa  dance/danced p  work/worked po  wait/waited pa
arrive/arrived pav  laugh/laughed p  cry/cried p  smile/smiled p  rest/rested pa  fall/fell pax
play/played pa  shout/shouted p"""
_SYN_MOTION = """travel/travelled p  walk/walked pa  run/ran pa  swim/swam pa  fly/flew pa  return/returned pv
sail/sailed p"""
_SYN_SPEECH = "say/said think/thought"
_SYN_ADJECTIVES = """old:pavtxl new:vtxl young:pa big:pavxl small:pavxfl red:vxf blue:vx green:vxf
white:vxa black:vxa yellow:vxf happy:pa sad:pa tired:pa brave:pa clever:pa kind:p strong:pa quiet:pal
loud:pa famous:ptl beautiful:pvtxl heavy:vx cheap:fvtx expensive:fvtx fresh:f sweet:f ripe:f long:tv
short:pt dark:xl bright:xl busy:pl empty:xvl dirty:xval broken:xv wooden:xvl golden:x fast:av slow:av
wild:a hungry:pa rich:p poor:p funny:pt strange:pavtxl tall:pl ancient:tl"""
_SYN_ADVERBS = {"manner": "quickly slowly quietly carefully happily loudly".split(),
                "pres": "today now often always rarely".split(), "past": "yesterday recently".split(),
                "fut": "tomorrow soon".split(), "degree": ["very"]}

# Function words: one key per grammatical concept; a language may lack some (no articles, ...).
_SYN_FUNC_KEYS = (
    "det.def.sg det.def.pl det.indef.sg det.indef.pl det.this.sg det.this.pl det.that.sg det.that.pl "
    "det.every.sg det.some.pl I you he she it we they me you.o him her it.o us them "
    "who what where when how_many in near behind under at on from to with by erg acc "
    "fut.sg fut.pl pres.sg pres.pl cop.pres.sg cop.pres.pl cop.past.sg cop.past.pl "
    "pass.pres.sg pass.pres.pl pass.past.sg pass.past.pl "
    "and but or because while after before that not fut.part oh yes").split()
_SYN_FUNC_UPOS = {"and": "CCONJ", "but": "CCONJ", "or": "CCONJ", "because": "SCONJ", "while": "SCONJ",
                  "after": "SCONJ", "before": "SCONJ", "that": "SCONJ"}  # of the clause linkers

_SYN_EN_FUNC = dict(zip(_SYN_FUNC_KEYS, (
    "the the a - this these that those every some I you he she it we they me you him her it us them "
    "who what where when how_many in near behind under at on from to with by - - "
    "- - - - - - - - - - - - and but or because while after before that not - oh yes").split()))
_SYN_ES_FUNC = dict(zip(_SYN_FUNC_KEYS, (
    "el los un unos este estos ese esos cada algunos yo tú él ella ello nosotros ellos mí ti él ella "
    "ello nosotros ellos quién qué dónde cuándo cuántos en cerca tras bajo a sobre de hacia con por - - "
    "- - - - es son era eran es son fue fueron y pero o porque mientras después antes que no - oh sí"
).split()))
_SYN_DE_FUNC = dict(zip(_SYN_FUNC_KEYS, (
    "der die ein - dieser diese jener jene jeder einige ich du er sie es wir sie mich dich ihn sie es "
    "uns sie wer was wo wann how_many in bei hinter unter an auf von nach mit durch - - "
    "wird werden - - ist sind war waren wird werden wurde wurden und aber oder weil während nachdem "
    "bevor dass nicht - oh ja").split()))

# Inflection templates ("~" = stem; digits = the consonants of an Arabic root), written in each
# language's romanisation and converted to its script afterwards (so Greek gets its final sigma).
_SYN_MORPH = {
    "es": dict(n={"sg": "~", "pl": "~s"}, a={"sg": "~", "pl": "~s"},
               v={"pres.sg": "~a", "pres.pl": "~an", "past.sg": "~ó", "past.pl": "~aron",
                  "fut.sg": "~ará", "fut.pl": "~arán", "part": "~ado"}),
    "de": dict(n={"sg": "~", "pl": "~en"}, a={"sg": "~e", "pl": "~en"},
               v={"pres.sg": "~t", "pres.pl": "~en", "past.sg": "~te", "past.pl": "~ten", "inf": "~en",
                  "part": "ge~t"}),
    "ru": dict(n={"sg": "~", "pl": "~y", "sg.acc": "~u", "pl.acc": "~ov"}, a={"sg": "~yj", "pl": "~ye"},
               v={"pres.sg": "~et", "pres.pl": "~ut", "past.sg": "~al", "past.pl": "~ali", "inf": "~atʲ",
                  "part": "~an"}),
    "el": dict(n={"sg": "~os", "pl": "~oi"}, a={"sg": "~os", "pl": "~oi"},
               v={"pres.sg": "~ei", "pres.pl": "~Un", "past.sg": "e~e", "past.pl": "e~an",
                  "part": "~menos"}),
    "ar": dict(n={"sg": "~", "pl": "~At"}, a={"sg": "~", "pl": "~Un"},
               v={"pres.sg": "ya12u3", "pres.pl": "ya12u3Un", "past.sg": "1a2a3a", "past.pl": "1a2a3U",
                  "fut.sg": "saya12u3", "fut.pl": "saya12u3Un", "part": "ma12U3"}),
    "hi": dict(n={"sg": "~", "pl": "~eM"}, a={"sg": "~A", "pl": "~e"},
               v={"pres.sg": "~tA", "pres.pl": "~te", "past.sg": "~A", "past.pl": "~e", "fut.sg": "~egA",
                  "fut.pl": "~eMge", "part": "~A"}),
}
_SYN_FUT = {"es": "suffix", "de": "aux", "ru": "aux", "el": "part", "ar": "suffix", "hi": "suffix"}
_SYN_PUNCT = {"hi": {".": "।"}, "ar": {",": "،", "?": "؟"}, "el": {"?": ";"}}
_SYN_NO_FUNC = {"ru": ("det.def", "det.indef", "cop.pres"), "hi": ("det.def", "det.indef"),
                "el": ("det.indef.pl",), "ar": ("det.indef",)}

# Romanisations of the distant languages: one character per sound, then a script table.
_SYN_PHON = {  # onsets, vowels, codas
    "ru": ("b v g d ž z k l m n p r s t f x c č š b v d k l m n p r s t st pr kr", "a o u e i y a o",
           "n l r s t k v m j"),
    "el": ("p t k b d g m n l r s z f θ x ξ ψ p t k m n l r s pr tr st", "a e i o u h w a o", "s n r"),
    "hi": ("k K g G c C j J T D N t θ d ð n p P b B m y r l v š s h", "a A i I u U e E o O a a", "k t n r l m s"),
    "ar": ("b t θ j H x d ð r z s š S D T Z c ɣ f q k l m n h w y", "a i u", ""),
}
_SYN_AR_NOUN_PATTERNS = ("1i2A3", "1a23", "1u2U3", "ma12a3", "1A2i3", "1a2A3")
_SYN_SCRIPT_MAP = {
    "Cyrillic": dict(zip("abvgdežzijklmnoprstufxcčšyʲ", "абвгдежзийклмнопрстуфхцчшыь")),
    "Greek": {**dict(zip("abgdezhθiklmnξoprstufxψw", "αβγδεζηθικλμνξοπρστυφχψω")), "U": "ου"},
    "Arabic": dict(zip("btθjHxdðrzsšSDTZcɣfqklmnhwyAIU", "بتثجحخدذرزسشصضطظعغفقكلمنهويايو")),
}
_SYN_DEVA_CONS = dict(zip("kKgGcCjJTDNtθdðnpPbBmyrlvšsh", "कखगघचछजझटडणतथदधनपफबभमयरलवशसह"))
_SYN_DEVA_VOWEL = {"a": ("अ", ""), "A": ("आ", "ा"), "i": ("इ", "ि"), "I": ("ई", "ी"), "u": ("उ", "ु"),
                   "U": ("ऊ", "ू"), "e": ("ए", "े"), "E": ("ऐ", "ै"), "o": ("ओ", "ो"), "O": ("औ", "ौ")}


def _syn_translit(script, s):
    """A romanised word -> its spelling in the language's script."""
    if script == "Latin":
        return s
    if script == "Greek":
        out = "".join(_SYN_SCRIPT_MAP["Greek"][ch] for ch in s)
        return out[:-1] + "ς" if out.endswith("σ") else out
    if script == "Cyrillic":
        return "".join(_SYN_SCRIPT_MAP["Cyrillic"][ch] for ch in s)
    if script == "Arabic":  # short vowels are not written, except a word-initial alif
        table = _SYN_SCRIPT_MAP["Arabic"]
        return "".join(("ا" if i == 0 else "") if ch in "aiu" else table[ch] for i, ch in enumerate(s))
    out = []  # Devanagari: an abugida; consonant + vowel sign, virama between consonants
    for i, ch in enumerate(s):
        if ch == "M":
            out.append("ं")
        elif ch in _SYN_DEVA_CONS:
            out.append(_SYN_DEVA_CONS[ch])
            if i + 1 < len(s) and s[i + 1] in _SYN_DEVA_CONS:
                out.append("्")
        else:
            after_cons = i > 0 and s[i - 1] in _SYN_DEVA_CONS
            out.append(_SYN_DEVA_VOWEL[ch][1 if after_cons else 0])
    return "".join(out)


def _syn_apply(template, stem):
    if "~" in template:
        return template.replace("~", stem)
    return "".join(stem[int(ch) - 1] if ch.isdigit() else ch for ch in template)  # Arabic root


# --- cognates of the close relatives: systematic spelling changes from the English word

_SYN_ES_CHANGES = (("tch", "ch"), ("th", "t"), ("sh", "ch"), ("ck", "c"), ("ph", "f"), ("wr", "r"),
                   ("kn", "n"), ("gh", ""), ("wh", "u"), ("qu", "cu"), ("k", "c"), ("ee", "i"), ("oo", "u"),
                   ("ea", "e"), ("ou", "o"), ("ai", "ei"), ("y", "i"), ("x", "j"), ("z", "s"))
_SYN_DE_CHANGES = (("tch", "tsch"), ("th", "d"), ("sh", "sch"), ("ph", "f"), ("wh", "w"), ("gh", "ch"),
                   ("qu", "kw"), ("ee", "ie"), ("oo", "u"), ("ea", "e"), ("ou", "au"), ("ow", "au"),
                   ("v", "w"), ("y", "i"))


def _syn_cognate(lang, word, pos, gender=None):
    """English word -> its es/de cognate (pos: n noun, a adjective, v verb stem, r adverb)."""
    ly = pos == "r" and word.endswith("ly")
    s = word[:-2] if ly else word
    if lang == "es":
        s = re.sub(r"^w", "gu", s)
        for a, b in _SYN_ES_CHANGES:
            s = s.replace(a, b)
        s = s.replace("w", "u")
        s = re.sub(r"([bcdfglmnprstv])\1", r"\1", s)
        if s.endswith("e") and len(s) > 3:
            s = s[:-1]
        if pos in "na" and s[-1] not in "aeiou":
            s += "a" if gender == "f" else "o"
        return s + "amente" if ly else s
    for a, b in _SYN_DE_CHANGES:
        s = s.replace(a, b)
    s = re.sub(r"c(?![hk])", "k", s)
    s = re.sub(r"^p(?=[aeiou])", "pf", s)
    s = re.sub(r"^t(?=[aeiou])", "z", s)
    s = re.sub(r"d$", "t", s)
    if s.endswith("e") and len(s) > 3:
        s = s[:-1]
    if ly:
        return s + "lich"
    return s.capitalize() if pos == "n" else s


# ------------------------------------------------------------------------------------------------
# Building the world: concepts, entities, and one lexicon per language


def _syn_parse_concepts():
    nouns, ncls, ngen, nplural = [], {}, {}, {}
    for cls, words in _SYN_NOUNS.items():
        for item in words.split():
            item, _, g = item.partition("@")
            w, _, pl = item.partition("/")
            nouns.append(w)
            ncls[w], ngen[w] = cls, g or None
            nplural[w] = pl or w + "s"
    verbs = {}  # id -> dict(kind, past, part, ag, pa)
    for item in _SYN_TRANSITIVE.split("\n"):
        toks = item.split()
        for i in range(0, len(toks), 3):
            b, p, pp = toks[i].split("/")
            verbs[b] = dict(kind="tr", past=p, part=pp, ag=toks[i + 1], pa=toks[i + 2])
    toks = _SYN_INTRANSITIVE.split()
    for i in range(0, len(toks), 2):
        b, p = toks[i].split("/")
        verbs[b] = dict(kind="in", past=p, part=p, ag=toks[i + 1], pa="")
    toks = _SYN_MOTION.split()
    for i in range(0, len(toks), 2):
        b, p = toks[i].split("/")
        verbs[b] = dict(kind="mot", past=p, part=p, ag=toks[i + 1], pa="")
    for item in _SYN_SPEECH.split():
        b, p = item.split("/")
        verbs[b] = dict(kind="say", past=p, part=p, ag="p", pa="")
    adjs = dict(item.split(":") for item in _SYN_ADJECTIVES.split())
    advs = [a for group in _SYN_ADVERBS.values() for a in group]
    return nouns, ncls, ngen, nplural, verbs, adjs, advs


def _syn_en_s3(v):
    if re.search(r"[^aeiou]y$", v):
        return v[:-1] + "ies"
    return v + "es" if re.search(r"(s|x|z|ch|sh|o)$", v) else v + "s"


def _syn_latin_name(rng, nsyl):
    on = "b c d f g h j k l m n p r s t v z br dr gr kr st tr th l m n r s".split()
    nu = "a e i o u a e ai ei ia o".split()
    co = [""] * 5 + "n r l s m x".split()
    return "".join(rng.choice(on) + rng.choice(nu) for _ in range(nsyl)).capitalize() + rng.choice(co)


def _syn_entities(rng, taken):
    """Shared named entities (Latin script, identical in every language)."""
    def fresh(nsyl):
        while True:
            name = _syn_latin_name(rng, nsyl)
            if name.lower() not in taken and len(name) > 2:
                taken.add(name.lower())
                return name
    first = [(fresh(rng.choice((2, 2, 3))), rng.choice("mf")) for _ in range(200)]
    last = [fresh(rng.choice((2, 3))) for _ in range(200)]
    orgs, locs = [], []
    org_heads = ("Bank Group Motors Labs Press Union Works Foods Systems Airlines Institute Partners Studios "
                 "Trust").split()
    while len(orgs) < 150:
        r = rng.random()
        if r < 0.7:
            o = (fresh(2), rng.choice(org_heads))
        elif r < 0.85:
            o = (fresh(2), fresh(2), rng.choice(org_heads))
        else:
            o = ("".join(rng.choice("ABCDEFGHKLMNPRSTVZ") for _ in range(rng.choice((3, 4)))),)
        if o not in orgs:
            orgs.append(o)
    while len(locs) < 150:
        r = rng.random()
        if r < 0.4:
            loc = (fresh(rng.choice((2, 3))),)
        elif r < 0.7:
            loc = (rng.choice("Port Lake Mount New Saint Fort".split()), fresh(2))
        else:
            loc = (fresh(2), rng.choice("Harbour Valley Bay Falls Hills City Island Springs".split()))
        if loc not in locs:
            locs.append(loc)
    return first, last, orgs, locs


def _syn_random_word(rng, lang, nsyl, coda):
    on, nu, co = (x.split() for x in _SYN_PHON[lang])
    if lang == "ar":  # a root of three consonants; the caller applies a pattern
        return "".join(rng.sample(on, 3))
    s = "".join(rng.choice(on) + rng.choice(nu) for _ in range(nsyl))
    return s + rng.choice(co) if coda else s


def _syn_lexicon(lang, rng, C):
    """One language's forms: L["N"][(noun, num, case)], L["A"][(adj, num)], L["V"][(verb, key)],
    L["R"][adverb], L["F"][function key]; every value a finished word in the language's script."""
    nouns, ncls, ngen, nplural, verbs, adjs, advs = C
    info = SYN_LANG_INFO[lang]
    script = info["script"]
    L = dict(code=lang, script=script, order=info["order"], adj_pre=info["adj"] == "before",
             adp_pre=info["adp"] == "prepositions", wh=info["wh"], N={}, A={}, V={}, R={}, F={},
             caps=script in ("Latin", "Cyrillic", "Greek"), art_adj=lang == "ar",
             acc_suffix=lang == "ru", case_adp=lang == "hi",
             punct={".": ".", ",": ",", "?": "?", **_SYN_PUNCT.get(lang, {})})
    used = set()

    def unique(make):
        for _ in range(200):
            roman = make()
            form = _syn_translit(script, roman)
            if form.lower() not in used:
                used.add(form.lower())
                return roman
        raise RuntimeError(f"could not find a fresh word for {lang}")

    if lang == "en":
        L["F"] = {k: v for k, v in _SYN_EN_FUNC.items() if v != "-"}
        L["F"]["how_many"] = "how many"
        for n in nouns:
            for case in ("nom", "acc"):
                L["N"][n, "sg", case], L["N"][n, "pl", case] = n, nplural[n]
        for a in adjs:
            L["A"][a, "sg"] = L["A"][a, "pl"] = a
        for v, d in verbs.items():
            L["V"].update({(v, "base"): v, (v, "s3"): _syn_en_s3(v), (v, "past"): d["past"],
                           (v, "part"): d["part"]})
        L["R"] = {a: a for a in advs}
        return L
    m = _SYN_MORPH[lang]
    if lang in ("es", "de"):  # close relatives: hand-written function words, cognate content words
        L["F"] = {k: v for k, v in (_SYN_ES_FUNC if lang == "es" else _SYN_DE_FUNC).items() if v != "-"}
        L["F"]["how_many"] = "cuántos" if lang == "es" else "wie viele"
        used.update(w.lower() for w in L["F"].values())

        def stem(word, pos, gender=None):
            base = _syn_cognate(lang, word, pos, gender)
            extra = ("h", "e", "n", "i", "a", "u", "el") if lang == "de" else ("e", "i", "a", "o", "u", "ie")
            tries = iter([base] + [base + x for x in extra])
            return unique(lambda: next(tries))
    else:
        skip = _SYN_NO_FUNC.get(lang, ())
        for k in _SYN_FUNC_KEYS:
            if k in ("erg", "acc") and lang != "hi" or k.startswith(skip):
                continue
            if k == "fut.part" and lang != "el" or k.startswith("fut.") and _SYN_FUT[lang] != "aux" \
                    and k != "fut.part" or k.startswith("pres.") and lang != "hi":
                continue
            if lang == "ar" and k.startswith("det.def"):
                L["F"][k] = _syn_translit(script, "al")
                continue
            if lang == "ar":
                make = lambda: rng.choice(("1A", "1I", "1a2", "1U", "1a2I3")).replace(
                    "1", rng.choice(_SYN_PHON["ar"][0].split())).replace(
                    "2", rng.choice(_SYN_PHON["ar"][0].split())).replace("3", rng.choice("nrlm"))
            else:
                make = lambda: _syn_random_word(rng, lang, rng.choice((1, 1, 1, 2)), rng.random() < 0.25)
            L["F"][k] = _syn_translit(script, unique(make))

        def stem(word, pos, gender=None):
            if lang == "ar":
                if pos == "v":
                    return unique(lambda: _syn_random_word(rng, lang, 0, False))
                pat = "1a2I3" if pos == "a" else rng.choice(_SYN_AR_NOUN_PATTERNS)
                return unique(lambda: _syn_apply(pat, _syn_random_word(rng, lang, 0, False)))
            nsyl = rng.choice((1, 1, 1, 2, 2, 2, 2)) if pos in "nv" else rng.choice((1, 1, 2))
            coda = pos in "va" and lang != "el" or lang in ("ru", "hi") and pos == "n" or rng.random() < 0.3
            return unique(lambda: _syn_random_word(rng, lang, nsyl, coda))
    tr = lambda s: _syn_translit(script, s)
    for n in nouns:
        s = stem(n, "n", ngen[n])
        for num in ("sg", "pl"):
            for case in ("nom", "acc"):
                key = f"{num}.acc" if case == "acc" and f"{num}.acc" in m["n"] else num
                form = _syn_apply(m["n"][key], s)
                if lang == "de" and num == "pl" and s.endswith("e"):
                    form = s + "n"
                L["N"][n, num, case] = tr(form)
    for a in adjs:
        s = stem(a, "a")
        for num in ("sg", "pl"):
            L["A"][a, num] = tr(_syn_apply(m["a"][num], s))
    for v in verbs:
        s = stem(v, "v")
        for key, tpl in m["v"].items():
            L["V"][v, key] = tr(_syn_apply(tpl, s))
    for a in advs:
        L["R"][a] = tr(stem(a, "r"))
    return L


def _syn_world(seed):
    rng = random.Random(f"xmoe-synthetic:{seed}:world")
    C = _syn_parse_concepts()
    nouns, ncls, ngen, nplural, verbs, adjs, advs = C
    taken = set(nouns) | set(adjs) | set(verbs) | set(advs) | set(_SYN_EN_FUNC.values())
    first, last, orgs, locs = _syn_entities(rng, taken)
    W = dict(ncls=ncls, ngen=ngen, verbs=verbs, adjs=adjs, first=first, last=last, orgs=orgs, locs=locs)
    W["by_cls"] = {c: [n for n in nouns if ncls[n] == c] for c in "pafvtxl"}
    W["by_cls"]["B"] = list(_SYN_BUILDINGS)
    W["cum"] = {c: _syn_zipf(len(v)) for c, v in W["by_cls"].items()}
    W["class_cum"] = {}  # filled on use: class letters -> cumulative class weights
    W["adj_for"] = {c: [a for a in adjs if c in adjs[a].replace("B", "l")] for c in "pafvtxlB"}
    W["adj_for"]["B"] = W["adj_for"]["l"]
    W["tverbs"] = [v for v in verbs if verbs[v]["kind"] == "tr"]
    W["iverbs"] = [v for v in verbs if verbs[v]["kind"] == "in"]
    W["mverbs"] = [v for v in verbs if verbs[v]["kind"] == "mot"]
    W["L"] = {lang: _syn_lexicon(lang, random.Random(f"xmoe-synthetic:{seed}:lexicon:{lang}"), C)
              for lang in SYN_LANGS}
    return W


def _syn_cumsum(weights):
    cum, t = [], 0.0
    for w in weights:
        t += w
        cum.append(t)
    return cum


def _syn_zipf(n):
    return _syn_cumsum(1.0 / (r + 1) ** 0.8 for r in range(n))


# ------------------------------------------------------------------------------------------------
# Meanings: noun phrases and clauses as small dicts (language-independent)


def _syn_entity(rng, W, etype):
    if etype == "PER":
        name, g = rng.choice(W["first"])
        words = (name, rng.choice(W["last"])) if rng.random() < 0.55 else (name,)
        return dict(k="e", t="PER", w=words, g=g)
    return dict(k="e", t=etype, w=rng.choice(W["orgs"] if etype == "ORG" else W["locs"]), g="n")


def _syn_noun_np(rng, W, cls, det=None, num=None, adj_p=0.45):
    nid = W["by_cls"][cls][bisect(W["cum"][cls], rng.random() * W["cum"][cls][-1])]
    num = num or ("pl" if rng.random() < 0.3 else "sg")
    cnt = None
    if det is None:
        r = rng.random()
        if num == "pl" and r < 0.3:
            det, cnt = None, rng.choice((2, 2, 3, 3, 4, 5, 6, 7, 8, 9, 10, 12, 20, 50, 100))
        else:
            det = ("def", "def", "def", "indef", "indef", "this", "that", "every" if num == "sg" else "some",
                   None)[int(r * 9)]
            if det == "indef" and num == "pl":
                det = None
            elif det is None and num == "sg":  # no bare singular count nouns
                det = "def"
    adjs = []
    if rng.random() < adj_p:
        adjs.append(rng.choice(W["adj_for"][cls]))
        if rng.random() < 0.12:
            a2 = rng.choice(W["adj_for"][cls])
            if a2 != adjs[0]:
                adjs.append(a2)
    g = W["ngen"][nid] or (rng.choice("mf") if cls == "p" else "n")
    return dict(k="n", n=nid, cls=cls, num=num, det=det, cnt=cnt, adjs=adjs,
                very=bool(adjs) and rng.random() < 0.1, g=g)


def _syn_np(rng, W, classes, pron=True, ent=0.45, adj_p=0.45):
    """A noun phrase whose referent belongs to one of the classes (letters, see _SYN_NOUNS)."""
    cum = W["class_cum"].get(classes)
    if cum is None:  # class weights, favouring people and places
        cum = W["class_cum"][classes] = _syn_cumsum({"p": 4, "a": 1.2, "o": 2, "l": 2}.get(c, 1)
                                                     for c in classes)
    cls = classes[bisect(cum, rng.random() * cum[-1])]
    r = rng.random()
    if cls == "o":
        return _syn_entity(rng, W, "ORG")
    if cls == "p" and r < ent:
        return _syn_entity(rng, W, "PER")
    if cls == "p" and pron and r < ent + 0.1:
        return dict(k="p", p=rng.choice(("I", "you", "he", "she", "we", "they")))
    if cls == "l" and r < 0.5:
        return _syn_entity(rng, W, "LOC")
    return _syn_noun_np(rng, W, cls, adj_p=adj_p)


def _syn_class_of(np):
    if np["k"] == "e":
        return {"PER": "p", "ORG": "o", "LOC": "l"}[np["t"]]
    return np.get("cls", "p")


def _syn_pronoun_for(np):
    if np["k"] == "p":
        return np["p"]
    if np["k"] == "and" or np.get("num") == "pl":
        return "they"
    return {"m": "he", "f": "she"}.get(np.get("g"), "it")


def _syn_time(rng, tense, year_p=0.6):
    if tense != "pres" and rng.random() < year_p:
        return ("year", rng.randint(1800, 2023) if tense == "past" else rng.randint(2026, 2060))
    return ("adv", rng.choice(_SYN_ADVERBS[tense]))


def _syn_with_tense(rng, c, tense):
    """The clause in another tense (a linked clause agrees with its main clause)."""
    if c["kind"] == "cop" and tense == "fut" or c["tense"] == tense:
        return c
    c = dict(c, tense=tense, passive=c["passive"] and tense != "fut")
    if c["time"] is not None:
        c["time"] = _syn_time(rng, tense)
    return c


def _syn_clause(rng, W, depth=0, kind=None, simple=False):
    """Sample a meaning: a dict with kind, agent, verb, patient, tense and optional slots.
    simple: fewer optional parts (for the sentence pairs, which must fit a short model input)."""
    adj_p = 0.25 if simple else 0.45
    if kind is None:
        r = rng.random()
        kind = "tr" if r < 0.52 else "in" if r < 0.65 else "mot" if r < 0.75 else "cop" if r < 0.88 \
            else "say" if depth == 0 else "tr"
    r = rng.random()
    tense = "past" if r < 0.45 else "pres" if r < 0.8 else "fut"
    c = dict(kind=kind, tense=tense, neg=rng.random() < 0.1, passive=False, front=None, sub=None,
             subfirst=False, quote=False, loc=None, src=None, dst=None, time=None, man=None, with_=None,
             pat=None, pred=None, comp=None, intj=None)
    if kind == "tr":
        c["verb"] = v = rng.choice(W["tverbs"])
        d = W["verbs"][v]
        c["agent"] = _syn_np(rng, W, d["ag"], adj_p=adj_p)
        c["pat"] = _syn_np(rng, W, d["pa"], adj_p=adj_p)
        if c["pat"] == c["agent"]:
            c["pat"] = _syn_np(rng, W, d["pa"], ent=0, adj_p=adj_p)
        c["passive"] = tense != "fut" and rng.random() < 0.12
        if not simple and rng.random() < 0.07:
            c["with_"] = _syn_np(rng, W, "po", pron=False)
    elif kind in ("in", "mot"):
        c["verb"] = v = rng.choice(W["iverbs" if kind == "in" else "mverbs"])
        c["agent"] = _syn_np(rng, W, W["verbs"][v]["ag"], adj_p=adj_p)
        if kind == "mot":
            c["src"] = _syn_np(rng, W, "l", adj_p=adj_p) if rng.random() < 0.7 else None
            c["dst"] = _syn_np(rng, W, "l", adj_p=adj_p) if rng.random() < 0.8 or c["src"] is None else None
    elif kind == "cop":
        c["tense"] = "past" if tense == "fut" else tense
        c["agent"] = _syn_np(rng, W, "pavtxl", pron=True, adj_p=adj_p)
        cls = _syn_class_of(c["agent"])
        if rng.random() < 0.6 and W["adj_for"].get(cls):
            c["pred"] = rng.choice(W["adj_for"][cls])
        else:
            c["loc"] = (rng.choice(("in", "near", "behind", "at")), _syn_np(rng, W, "l", adj_p=adj_p))
    else:  # reported speech
        c["verb"] = rng.choice(("say", "say", "think"))
        c["agent"] = _syn_np(rng, W, "p", adj_p=adj_p)
        c["comp"] = _syn_clause(rng, W, depth + 1, simple=simple)
        c["quote"] = c["verb"] == "say" and rng.random() < 0.35
        c["intj"] = rng.choice(("oh", "yes")) if rng.random() < 0.25 else None  # in direct speech
    if kind in ("tr", "in") and rng.random() < (0.35 if kind == "tr" else 0.45):
        place = _syn_entity(rng, W, "ORG") if rng.random() < 0.15 else _syn_np(rng, W, "l", adj_p=adj_p)
        adps = ("at",) if place.get("t") == "ORG" else ("in", "near", "at") if place["k"] == "e" else \
            ("in", "in", "near", "behind", "under", "at", "on")
        c["loc"] = (rng.choice(adps), place)
    if kind != "say" and rng.random() < 0.35:
        c["time"] = _syn_time(rng, c["tense"])
    if kind in ("tr", "in", "mot") and not simple and rng.random() < 0.12:
        c["man"] = rng.choice(_SYN_ADVERBS["manner"])
    if depth == 0 and kind != "say" and not simple and rng.random() < 0.15:
        key = rng.choice(("because", "while", "after", "before", "because", "and", "but", "or"))
        sc = _syn_clause(rng, W, depth + 1, kind=rng.choice(("tr", "in", "mot", "cop")), simple=simple)
        c["sub"] = (key, _syn_with_tense(rng, sc, c["tense"]))
        c["subfirst"] = _SYN_FUNC_UPOS[key] == "SCONJ" and rng.random() < 0.35
    opts = [s for s in ("time", "loc") if c[s] is not None and kind != "cop"]
    if opts and depth == 0 and rng.random() < 0.15:
        c["front"] = rng.choice(opts)
    return c


# ------------------------------------------------------------------------------------------------
# Realisation: a meaning -> tokens (form, UPOS, IOB2 tag, role) in one language


def _syn_np_tokens(L, np, case, role):
    """Tokens of a noun phrase; case: nom, acc, erg or obl; role labels the tokens for QA spans."""
    k, F = np["k"], L["F"]
    if k == "e":
        toks = [(w, "PROPN", ("B-" if i == 0 else "I-") + np["t"], role) for i, w in enumerate(np["w"])]
    elif k == "p":
        key = np["p"]
        if case in ("acc", "obl"):
            key = {"I": "me", "you": "you.o", "he": "him", "she": "her", "it": "it.o", "we": "us",
                   "they": "them"}[key]
        toks = [(F[key], "PRON", "O", role)]
    elif k == "w":  # who / what
        toks = [(F[np["key"]], "PRON", "O", role)]
    elif k == "and":
        sub = "acc" if case == "acc" else "nom"
        toks = _syn_np_core(L, np["a"], sub, role) + [(F["and"], "CCONJ", "O", role)] + \
            _syn_np_core(L, np["b"], sub, role)
    elif k == "hm":  # how many + plural noun
        hm = [(F["how_many"], "ADV", "O", role)] if L["code"] not in ("en", "de", "es") else \
            [(F["how_many"], "DET", "O", role)] if L["code"] == "es" else \
            [(F["how_many"].split()[0], "ADV", "O", role), (F["how_many"].split()[1], "ADJ", "O", role)]
        toks = hm + [(L["N"][np["n"], "pl", "acc" if case == "acc" else "nom"], "NOUN", "O", role)]
    else:
        toks = _syn_np_core(L, np, case, role)
    if L["case_adp"] and (case == "erg" or case == "acc" and (k in ("e", "p", "w") or np.get("cls") in ("p", "a")
                                                              or np.get("det") == "def")):
        toks.append((F[case], "ADP", "O", None))
    return toks


def _syn_np_core(L, np, case, role):
    if np["k"] != "n":
        return _syn_np_tokens(L, np, "obl" if case == "acc" and L["case_adp"] else case, role)
    F, num = L["F"], np["num"]
    noun = (L["N"][np["n"], num, "acc" if case == "acc" and L["acc_suffix"] else "nom"], "NOUN", "O", role)
    adjs = []
    for i, a in enumerate(np["adjs"]):
        if L["art_adj"] and np["det"] == "def":
            adjs.append((F["det.def." + num], "DET", "O", role))
        if np["very"] and i == 0:
            adjs.append((L["R"]["very"], "ADV", "O", role))
        adjs.append((L["A"][a, num], "ADJ", "O", role))
    toks = []
    det = F.get(f"det.{np['det']}.{num}") if np["det"] else None
    if det:
        if L["code"] == "en" and det == "a":
            nxt = adjs[0][0] if adjs else noun[0]
            det = "an" if nxt[0] in "aeiou" else "a"
        toks.append((det, "DET", "O", role))
    if np["cnt"]:
        toks.append((str(np["cnt"]), "NUM", "O", role + ".count" if role else None))
    return toks + adjs + [noun] if L["adj_pre"] else toks + [noun] + adjs


def _syn_person(np):
    if np["k"] == "p":
        return {"I": "1sg", "you": "2sg", "we": "pl", "they": "pl"}.get(np["p"], "3sg")
    return "pl" if np["k"] == "and" or np.get("num") == "pl" else "3sg"


def _syn_en_verb(L, c, person, question=False):
    """English verb complex; returns (auxiliary tokens, the rest). Do-support in questions and
    negation, irregular forms, agreement (3rd person singular -s, am/is/are, was/were)."""
    v, t, neg = c.get("verb"), c["tense"], c["neg"]
    sg3 = person in ("3sg", "1sg")
    no = [("not", "PART", "O", None)] if neg else []

    def aux(w):
        return [(w, "AUX", "O", None)]

    def verb(key):
        return [(L["V"][v, key], "VERB", "O", None)]
    if c["kind"] == "cop" or c["passive"]:
        be = ("am" if person == "1sg" else "is" if person == "3sg" else "are") if t == "pres" else \
            ("was" if sg3 else "were")
        return aux(be), no + (verb("part") if c["passive"] else [])
    if t == "fut":
        return aux("will"), no + verb("base")
    if neg or question:
        do = "did" if t == "past" else "does" if person == "3sg" else "do"
        return aux(do), no + verb("base")
    return [], verb("past" if t == "past" else "s3" if person == "3sg" else "base")


def _syn_verb_tokens(L, c, num):
    """The verb complex of any other language, from its morphology table and auxiliaries."""
    F, v, t = L["F"], c.get("verb"), c["tense"]
    code, sov = L["code"], L["order"] == "SOV"
    out = [(F["not"], "PART", "O", None)] if c["neg"] else []
    if c["kind"] == "cop":
        a = F.get(f"cop.{t}.{num}")
        return out + ([(a, "AUX", "O", None)] if a else [])
    if c["passive"]:
        vt = [(L["V"][v, "part"], "VERB", "O", None)]
        at = [(F[f"pass.{t}.{num}"], "AUX", "O", None)]
        return out + (vt + at if sov else at + vt)
    if t == "fut" and _SYN_FUT[code] == "aux":
        vt = [(L["V"][v, "inf"], "VERB", "O", None)]
        at = [(F[f"fut.{num}"], "AUX", "O", None)]
        return out + (vt + at if sov else at + vt)
    if t == "fut" and _SYN_FUT[code] == "part":
        return out + [(F["fut.part"], "PART", "O", None), (L["V"][v, "pres." + num], "VERB", "O", None)]
    out.append((L["V"][v, f"{t}.{num}"], "VERB", "O", None))
    if code == "hi" and t == "pres":
        out.append((F["pres." + num], "AUX", "O", None))
    return out


def _syn_pp(L, adp, np, role, time_num=None):
    a = (L["F"][adp], "ADP", "O", None)
    inner = [(str(time_num), "NUM", "O", role)] if time_num is not None else _syn_np_tokens(L, np, "obl", role)
    return [a] + inner if L["adp_pre"] else inner + [a]


_SYN_ORDER_RANK = {order: {slot: i for i, slot in enumerate(key)}
                   for order, key in (("SVO", "SVOMX"), ("SOV", "SXMOV"), ("VSO", "VSOMX"))}


def _syn_realize(L, c, wh=None):
    """Tokens of one clause (no final punctuation). wh: the slot asked about (agent, pat, count,
    loc, time) to build a question instead."""
    en = L["code"] == "en"
    passive = c["passive"]
    subj_np = c["pat"] if passive else c["agent"]
    if wh == "agent":
        subj_np = dict(k="w", key="who" if c["agent"]["k"] in ("e", "p") or c["agent"].get("cls") in ("p", "a")
                       else "what", num="sg")
    num = "pl" if _syn_person(subj_np) == "pl" else "sg"
    erg = L["case_adp"] and c["kind"] == "tr" and not passive and c["tense"] == "past"
    parts = [["S", _syn_np_tokens(L, subj_np, "erg" if erg else "nom", "pat" if passive else "agent")]]
    if en:
        aux, rest = _syn_en_verb(L, c, _syn_person(subj_np), question=wh not in (None, "agent"))
        vt = aux + rest
    else:
        vt = _syn_verb_tokens(L, c, num)
    parts.append(["V", vt])
    if c["kind"] == "tr" and not passive:
        pat = c["pat"]
        if wh == "pat":
            pat = dict(k="w", key="who" if pat["k"] in ("e", "p") or pat.get("cls") in ("p", "a") else "what")
        elif wh == "count":
            pat = dict(k="hm", n=pat["n"])
        parts.append(["O", _syn_np_tokens(L, pat, "acc", "pat")])
    elif c["kind"] == "cop" and c["pred"]:
        parts.append(["O", [(L["A"][c["pred"], num], "ADJ", "O", None)]])
    if c["man"]:
        parts.append(["M", [(L["R"][c["man"]], "ADV", "O", None)]])
    if passive:
        parts.append(["X", _syn_pp(L, "by", c["agent"], "agent")])
    if c["with_"]:
        parts.append(["X", _syn_pp(L, "with", c["with_"], "with")])
    if c["loc"]:
        pp = [(L["F"]["where"], "ADV", "O", None)] if wh == "loc" else _syn_pp(L, c["loc"][0], c["loc"][1], "loc")
        parts.append(["O" if c["kind"] == "cop" else "Xloc", pp])
    if c["src"]:
        parts.append(["X", _syn_pp(L, "from", c["src"], "src")])
    if c["dst"]:
        parts.append(["X", _syn_pp(L, "to", c["dst"], "dst")])
    if c["time"]:
        if wh == "time":
            pp = [(L["F"]["when"], "ADV", "O", None)]
        elif c["time"][0] == "year":
            pp = _syn_pp(L, "in", None, "time", time_num=c["time"][1])
        else:
            pp = [(L["R"][c["time"][1]], "ADV", "O", "time")]
        parts.append(["Xtime", pp])
    rank = _SYN_ORDER_RANK[L["order"]]
    ordered = sorted(parts, key=lambda p: rank[p[0][0]])  # stable: obliques keep their order
    front = None
    if c["front"] and wh is None:
        front = next((p for p in ordered if p[0] == "X" + c["front"]), None)
    if wh is not None and L["wh"] != "in situ":  # the wh-phrase moves to the front
        label = {"agent": "S", "pat": "O", "count": "O", "loc": "Xloc", "time": "Xtime"}[wh]
        front = next(p for p in ordered if p[0] == label)
    if front is not None:
        ordered.remove(front)
        if wh is None:
            ordered.insert(0, ["P", [(L["punct"][","], "PUNCT", "O", None)]])
        if wh not in (None, "agent") and en:  # do-support / inversion: What did Maria buy ?
            ordered = [p for p in ordered if p[0] != "V"]
            ordered.insert(1, ["V", rest])
            ordered.insert(0, ["A", aux])
        elif wh is not None and L["wh"] == "front+inversion":
            v = next(p for p in ordered if p[0] == "V")
            ordered.remove(v)
            ordered.insert(0, v)
        ordered.insert(0, front)
    toks = [t for p in ordered for t in p[1]]
    if c["kind"] == "say":
        comp = _syn_realize(L, c["comp"])
        if c["quote"]:
            oh = [(L["F"][c["intj"]], "INTJ", "O", None), (L["punct"][","], "PUNCT", "O", None)] if c["intj"] else []
            toks += [(":", "PUNCT", "O", None), ('"', "PUNCT", "O", None)] + oh + comp + [('"', "PUNCT", "O", None)]
        else:
            toks += [(L["F"]["that"], "SCONJ", "O", None)] + comp
    if c["sub"] and wh is None:
        key, sc = c["sub"]
        st = [(L["F"][key], _SYN_FUNC_UPOS[key], "O", None)] + _syn_realize(L, sc)
        toks = st + [(L["punct"][","], "PUNCT", "O", None)] + toks if c["subfirst"] else toks + st
    return toks


def _syn_sentence(L, c, wh=None):
    """A full sentence: clause + final punctuation, capitalised where the script has case."""
    toks = _syn_realize(L, c, wh)
    if wh is not None:
        toks = toks + [(L["punct"]["?"], "PUNCT", "O", None)]
        if L["code"] == "es":
            toks = [("¿", "PUNCT", "O", None)] + toks
    else:
        toks = toks + [(L["punct"]["."], "PUNCT", "O", None)]
    if L["caps"]:
        i = 1 if toks[0][0] == "¿" else 0
        w = toks[i]
        if w[0][0].islower():
            toks[i] = (w[0][0].upper() + w[0][1:],) + w[1:]
    return toks


def _syn_text(toks):
    return " ".join(t[0] for t in toks)


# ------------------------------------------------------------------------------------------------
# Pre-training text: lines of one to three sentences, with pronouns referring back


def _syn_doc(rng, W):
    """Meanings for one line; returns a list of (clause, wh) pairs."""
    first = _syn_clause(rng, W)
    out = [(first, None)]
    r = rng.random()
    if r < 0.08:  # a question about one of the slots
        if first["kind"] in ("tr", "in", "mot") and not first["passive"]:
            first["neg"], first["sub"], first["front"] = False, None, None
            slots = ["agent"] + [s for s in ("pat", "loc", "time") if first[s] is not None]
            if first["kind"] == "tr" and first["pat"]["k"] == "n" and first["pat"]["cnt"]:
                slots.append("count")
            out = [(first, rng.choice(slots))]
        return out
    if r < 0.6:
        return out
    for _ in range(rng.choice((1, 1, 2))):
        c = _syn_clause(rng, W)
        ag = first.get("agent")
        if ag is not None and ag["k"] != "p" and rng.random() < 0.5 and c["kind"] != "cop" \
                and _syn_class_of(ag) in W["verbs"][c["verb"]]["ag"]:
            c["agent"] = dict(k="p", p=_syn_pronoun_for(ag))
            if c["kind"] == "tr" and c["pat"] == c["agent"]:
                c["pat"] = _syn_np(rng, W, W["verbs"][c["verb"]]["pa"], pron=False)
        out.append((c, None))
    return out


# English verb forms that stand in for another language's (a borrowed verb is not inflected natively)
_SYN_EN_VERB_KEY = {"pres.sg": "s3", "pres.pl": "base", "past.sg": "past", "past.pl": "past", "fut.sg": "base",
                    "fut.pl": "base", "inf": "base", "part": "part"}


def _syn_code_switched(rng, W, L):
    """A copy of lexicon L in which each content concept takes its English form with probability
    SYN_CS_WORDS: nouns keep their number, verbs map their tense to the nearest English form."""
    en, cs = W["L"]["en"], dict(L, N=dict(L["N"]), A=dict(L["A"]), V=dict(L["V"]), R=dict(L["R"]))
    pick = {}

    def borrowed(concept):
        if concept not in pick:
            pick[concept] = rng.random() < SYN_CS_WORDS
        return pick[concept]
    for (n, num, case) in L["N"]:
        if borrowed(("n", n)):
            cs["N"][n, num, case] = en["N"][n, num, "nom"]
    for (a, num) in L["A"]:
        if borrowed(("a", a)):
            cs["A"][a, num] = en["A"][a, num]
    for (v, key) in L["V"]:
        if borrowed(("v", v)):
            cs["V"][v, key] = en["V"][v, _SYN_EN_VERB_KEY[key]]
    for r in L["R"]:
        if borrowed(("r", r)):
            cs["R"][r] = en["R"][r]
    return cs


def _syn_mlm_lines(W, lang, seed, target):
    rng = random.Random(f"xmoe-synthetic:{seed}:mlm:{lang}")
    L, lines, size = W["L"][lang], [], 0
    while size < target:
        Lx = _syn_code_switched(rng, W, L) if lang != "en" and rng.random() < SYN_CS_LINES else L
        line = " ".join(_syn_text(_syn_sentence(Lx, c, wh)) for c, wh in _syn_doc(rng, W))
        lines.append(line)
        size += len(line.encode("utf-8")) + 1
    return lines


# ------------------------------------------------------------------------------------------------
# Tasks: meanings sampled once per split, realised in every language (parallel dev/test sets)


def _syn_tag_meanings(rng, W, n, need_entity):
    out = []
    while len(out) < n:
        c = _syn_clause(rng, W)
        toks = _syn_sentence(W["L"]["en"], c)
        if need_entity and all(t[2] == "O" for t in toks) or len(_syn_text(toks)) > _SYN_TAG_MAX_EN_BYTES:
            continue
        out.append(c)
    return out


def _syn_copy(c, **kw):
    d = dict(c)
    d.update(kw)
    return d


_SYN_PAIR_MAX_EN_BYTES = 60  # so that an English pair fits the small preset's 128 byte tokens
_SYN_TAG_MAX_EN_BYTES = 100  # tagging sentences: cut the long tail


def _syn_paws_meaning(rng, W, label):
    """(meaning 1, meaning 2) with the same words: 1 = same meaning, 0 = roles scrambled."""
    while True:
        t = rng.choice(("front", "front", "front", "subswap", "subswap", "quote", "passive", "coord") if label
                       else ("roleswap", "roleswap", "roleswap", "srcdst", "adjswap", "subjswap"))
        if t in ("front", "passive", "roleswap", "adjswap"):
            c = _syn_clause(rng, W, simple=True, kind="tr")
            c.update(neg=False, passive=False, front=None, sub=None, tense=rng.choice(("past", "pres")))
            if c["time"] is not None or rng.random() < 0.6:
                c["time"] = _syn_time(rng, c["tense"])
        if t == "front":
            if c["loc"] is None and (c["time"] is None or rng.random() < 0.5):
                c["loc"] = ("in", _syn_entity(rng, W, "LOC"))
            c2 = _syn_copy(c, front=rng.choice([s for s in ("time", "loc") if c[s]]))
        elif t == "passive":
            c2 = _syn_copy(c, passive=True)
        elif t == "roleswap" or t == "adjswap":
            c["verb"] = rng.choice(_SYN_SYMMETRIC)
            if t == "roleswap":
                c["agent"] = _syn_np(rng, W, "p", pron=rng.random() < 0.3, ent=0.6, adj_p=0.25)
                c["pat"] = _syn_np(rng, W, "p", pron=rng.random() < 0.3, ent=0.6, adj_p=0.25)
                c2 = _syn_copy(c, agent=c["pat"], pat=c["agent"])
            else:
                c["agent"], c["pat"] = _syn_noun_np(rng, W, "p"), _syn_noun_np(rng, W, rng.choice("pa"))
                both = [a for a in W["adj_for"]["p"] if a in W["adj_for"][c["pat"]["cls"]]]
                a1, a2 = rng.sample(both, 2)
                c["agent"]["adjs"], c["pat"]["adjs"] = [a1], [a2]
                c2 = _syn_copy(c, agent=dict(c["agent"], adjs=[a2]), pat=dict(c["pat"], adjs=[a1]))
        elif t == "srcdst":
            c = _syn_clause(rng, W, simple=True, kind="mot")
            c.update(neg=False, sub=None, front=None, src=_syn_np(rng, W, "l", adj_p=0.25),
                     dst=_syn_np(rng, W, "l", adj_p=0.25))
            c2 = _syn_copy(c, src=c["dst"], dst=c["src"])
        elif t in ("subswap", "subjswap"):
            c = _syn_clause(rng, W, simple=True, kind=rng.choice(("tr", "in")))
            sc = _syn_clause(rng, W, depth=1, simple=True, kind=rng.choice(("tr", "in")))
            sc = _syn_with_tense(rng, dict(sc, passive=False), c["tense"])
            c.update(front=None, passive=False, sub=(rng.choice(("because", "while", "after", "before")), sc),
                     subfirst=rng.random() < 0.5)
            if t == "subswap":
                c2 = _syn_copy(c, subfirst=not c["subfirst"])
            else:
                c["verb"], sc["verb"] = rng.choice(_SYN_SYMMETRIC), rng.choice(W["iverbs"][:5])
                c["kind"], sc["kind"], sc["pat"], sc["with_"] = "tr", "in", None, None
                c["pat"] = _syn_np(rng, W, "p", pron=False, adj_p=0.25)
                c["agent"], sc["agent"] = _syn_entity(rng, W, "PER"), _syn_entity(rng, W, "PER")
                c2 = _syn_copy(c, agent=sc["agent"], sub=(c["sub"][0], _syn_copy(sc, agent=c["agent"])))
        elif t == "coord":
            c = _syn_clause(rng, W, simple=True, kind=rng.choice(("tr", "in", "mot")))
            c.update(passive=False, front=None)
            c["agent"] = dict(k="and", a=_syn_entity(rng, W, "PER"), b=_syn_np(rng, W, "p", pron=False, adj_p=0.25))
            c2 = _syn_copy(c, agent=dict(k="and", a=c["agent"]["b"], b=c["agent"]["a"]))
        else:  # direct vs indirect speech
            c = _syn_clause(rng, W, simple=True, kind="say")
            c["verb"], c["quote"] = "say", rng.random() < 0.5
            c2 = _syn_copy(c, quote=not c["quote"])
        if label == 0 and rng.random() < 0.3 and not c2["passive"]:
            opts = [s for s in ("time", "loc") if c2[s] is not None]
            if opts:
                c2 = _syn_copy(c2, front=rng.choice(opts))
        en = W["L"]["en"]
        s1, s2 = _syn_text(_syn_sentence(en, c)), _syn_text(_syn_sentence(en, c2))
        if s1 != s2 and max(len(s1), len(s2)) <= _SYN_PAIR_MAX_EN_BYTES:
            return (c, c2) if rng.random() < 0.5 else (c2, c)


def _syn_qa_paragraph(rng, W):
    """Two or three sentences and the questions one can ask about them: a list of meanings and a
    list of (question meaning, wh slot, index of the sentence holding the answer)."""
    per1 = _syn_entity(rng, W, "PER")
    verbs = [v for v in W["tverbs"] if "p" in W["verbs"][v]["ag"]]
    v1 = rng.choice(verbs)
    c1 = _syn_clause(rng, W, kind="tr")
    tense = rng.choice(("past", "past", "fut"))
    pat = _syn_np(rng, W, W["verbs"][v1]["pa"], pron=False)
    while pat == per1:
        pat = _syn_np(rng, W, W["verbs"][v1]["pa"], pron=False)
    c1.update(verb=v1, agent=per1, pat=pat, tense=tense, neg=False, passive=False, front=None, sub=None,
              man=None, with_=None, loc=(rng.choice(("in", "near")), _syn_entity(rng, W, "LOC")),
              time=_syn_time(rng, tense, year_p=1.0))
    v2 = rng.choice([v for v in verbs if v != v1 and set(W["verbs"][v]["pa"]) & set("fvtxa")])
    cls = rng.choice([k for k in W["verbs"][v2]["pa"] if k in "fvtxa"])
    c2 = _syn_clause(rng, W, kind="tr")
    org = "o" in W["verbs"][v2]["ag"] and rng.random() < 0.35
    c2.update(verb=v2, agent=_syn_entity(rng, W, "ORG") if org else dict(k="p", p=_syn_pronoun_for(per1)),
              pat=_syn_noun_np(rng, W, cls, num="pl", det="-"), tense=tense, neg=False, passive=False,
              front=None, sub=None, with_=None, man=None,
              loc=("at", _syn_noun_np(rng, W, "l", det="def", adj_p=0)) if rng.random() < 0.4 else None,
              time=None)
    c2["pat"].update(det=None, cnt=rng.randint(2, 12), adjs=c2["pat"]["adjs"][:1], very=False)
    sents = [c1, c2]
    qs = [(_syn_copy(c1, time=None), "agent", 0), (_syn_copy(c1, loc=None, time=None), "pat", 0),
          (_syn_copy(c1, time=None), "loc", 0), (_syn_copy(c1, loc=None), "time", 0),
          (_syn_copy(c2, agent=c2["agent"] if org else per1, loc=None), "count", 1)]
    if org:
        qs.append((_syn_copy(c2, loc=None), "agent", 1))
    if rng.random() < 0.5:
        per2 = _syn_entity(rng, W, "PER")
        while per2["w"] == per1["w"]:
            per2 = _syn_entity(rng, W, "PER")
        c3 = _syn_clause(rng, W, kind="mot")
        c3.update(agent=per2, tense="past", neg=False, front=None, sub=None, man=None, time=None,
                  src=_syn_entity(rng, W, "LOC"), dst=_syn_entity(rng, W, "LOC"))
        if c3["src"] != c3["dst"] and c3["src"] != c1["loc"][1] and c3["dst"] != c1["loc"][1]:
            sents.append(c3)
            qs.append((c3, "agent", 2))
    return sents, rng.sample(qs, rng.choice((1, 2, 2, 3)))


def _syn_qa_items(rng, W, n):
    """Paragraph meanings with exactly n questions in total."""
    items, total = [], 0
    while total < n:
        sents, qs = _syn_qa_paragraph(rng, W)
        qs = qs[:n - total]
        items.append((sents, qs))
        total += len(qs)
    return items


def _syn_span(toks, slot):
    """Token indices [i, j) of the tokens whose role is slot ("count": the NUM of the patient)."""
    idx = [i for i, t in enumerate(toks) if t[3] and (t[3] == "pat.count" if slot == "count"
                                                       else t[3].split(".")[0] == slot)]
    assert idx and idx == list(range(idx[0], idx[-1] + 1)), (slot, toks)
    return idx[0], idx[-1] + 1


def _syn_squad(W, lang, items, id_prefix):
    L, data = W["L"][lang], []
    for k, (sents, qs) in enumerate(items):
        toks = [_syn_sentence(L, c) for c in sents]
        texts = [_syn_text(t) for t in toks]
        context = " ".join(texts)
        starts = [sum(len(s) + 1 for s in texts[:i]) for i in range(len(texts))]
        qas = []
        for j, (qc, slot, si) in enumerate(qs):
            i0, i1 = _syn_span(toks[si], slot)
            before = _syn_text(toks[si][:i0])
            a0 = starts[si] + len(before) + (1 if i0 > 0 else 0)
            answer = _syn_text(toks[si][i0:i1])
            assert context[a0:a0 + len(answer)] == answer
            qas.append({"id": f"{id_prefix}-{k:05d}-{j}", "question": _syn_text(_syn_sentence(L, qc, wh=slot)),
                        "answers": [{"answer_start": a0, "text": answer}]})
        data.append({"title": f"{id_prefix}-{k:05d}", "paragraphs": [{"context": context, "qas": qas}]})
    return {"version": "1.1", "data": data}


# ------------------------------------------------------------------------------------------------
# Writers in XTREME's layouts


def _syn_write_tagging(path, sentences):
    """word<TAB>tag lines, a blank line between sentences, none at the end (XTREME.md 3.3, 3.4)."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("\n\n".join("\n".join(f"{w}\t{t}" for w, t in s) for s in sentences) + "\n")


def _syn_write_pairs(path, rows):
    """As XTREME's utils_preprocess: csv.writer with a TAB delimiter (CRLF, quoting of '"')."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        for row in rows:
            writer.writerow(row)


def _syn_write_json(path, obj):
    with open(path, "w", encoding="utf-8", newline="") as f:
        json.dump(obj, f, ensure_ascii=False)


def _syn_splits():
    return [("train", ["en"])] + [(split, list(SYN_LANGS)) for split in ("dev", "test")]


def _syn_note(summary, task, name, n, key, nbytes):
    summary["counts"].setdefault(task, {})[name] = n
    summary["max_bytes"][key] = max(summary["max_bytes"].get(key, 0), nbytes)


def _syn_bytes(s):
    return len(s.encode("utf-8"))


def _syn_write_mlm(W, out_dir, seed, lang):
    lines = _syn_mlm_lines(W, lang, seed, SYN_MLM_BYTES[lang])
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "mlm", f"{lang}.txt"), "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return dict(mlm_bytes=_syn_bytes(text), mlm_lines=len(lines))


def _syn_write_tagging_task(W, out_dir, seed, task, summary):
    """udpos (column UPOS) or panx (column IOB2 tag): the same meanings realised per language."""
    for split, langs in _syn_splits():
        rng = random.Random(f"xmoe-synthetic:{seed}:{task}:{split}")
        meanings = _syn_tag_meanings(rng, W, SYN_SIZES[split], need_entity=task == "panx")
        col = 1 if task == "udpos" else 2
        for lang in langs:
            sents = [_syn_sentence(W["L"][lang], c) for c in meanings]
            _syn_write_tagging(os.path.join(out_dir, task, f"{split}-{lang}.tsv"),
                               [[(t[0], t[col]) for t in s] for s in sents])
            _syn_note(summary, task, f"{split}-{lang}", len(sents), "sentence",
                      max(_syn_bytes(_syn_text(s)) for s in sents))


def _syn_write_pawsx(W, out_dir, seed, summary):
    for split, langs in _syn_splits():
        rng = random.Random(f"xmoe-synthetic:{seed}:pawsx:{split}")
        labels = [i % 2 for i in range(SYN_SIZES[split])]  # balanced classes, shuffled
        rng.shuffle(labels)
        pairs = [(_syn_paws_meaning(rng, W, y), y) for y in labels]
        for lang in langs:
            L = W["L"][lang]
            rows = [[_syn_text(_syn_sentence(L, a)), _syn_text(_syn_sentence(L, b)), str(y)]
                    for (a, b), y in pairs]
            _syn_write_pairs(os.path.join(out_dir, "pawsx", f"{split}-{lang}.tsv"), rows)
            _syn_note(summary, "pawsx", f"{split}-{lang}", len(rows), "pair",
                      max(_syn_bytes(r[0]) + _syn_bytes(r[1]) for r in rows))


def _syn_write_qa(W, out_dir, seed, summary):
    """SQuAD v1.1 train and dev (en) and XQuAD test files (every language, shared question ids)."""
    for split, task, name, prefix in (("train", "squad", "train-v1.1", "sq-train"),
                                      ("dev", "squad", "dev-v1.1", "sq-dev"), ("test", "xquad", "xquad.{}", "xq")):
        items = _syn_qa_items(random.Random(f"xmoe-synthetic:{seed}:qa:{split}"), W, SYN_SIZES[split])
        for lang in (["en"] if task == "squad" else SYN_LANGS):
            obj = _syn_squad(W, lang, items, prefix)
            _syn_write_json(os.path.join(out_dir, task, name.format(lang) + ".json"), obj)
            paragraphs = [p for art in obj["data"] for p in art["paragraphs"]]
            _syn_note(summary, task, name.format(lang), sum(len(p["qas"]) for p in paragraphs), "context",
                      max(_syn_bytes(p["context"]) for p in paragraphs))
            _syn_note(summary, task, name.format(lang), sum(len(p["qas"]) for p in paragraphs), "question",
                      max(_syn_bytes(q["question"]) for p in paragraphs for q in p["qas"]))


def make_synthetic(out_dir, seed=0):
    """Write the synthetic multilingual world under out_dir: the project's built-in offline corpus and XTREME-layout benchmark.

        python eval_xtreme.py make-synthetic data/synthetic      # a few seconds, about 7 MB
        summary = make_synthetic("data/synthetic", seed=0)

    Why it exists. The paper pre-trains on 100 languages and evaluates zero-shot cross-lingual transfer
    on XTREME; neither fits on a laptop nor is downloadable offline. This generator builds a small world
    with the same *shape*: several languages that express one shared set of meanings in different
    surface forms, a large English-like language and smaller ones, and labelled tasks in the exact file
    layout of XTREME's download script, so that `train_mlm.py`, `finetune.py` and the real loaders and
    metrics run on it unchanged.

    What is shared by every language (the latent world)
      * One concept inventory (about 290 concepts): 110 nouns in 7 semantic classes (people, animals,
        food, vehicles, texts, objects, places), 54 verbs (transitive with selectional restrictions,
        intransitive, motion, speech), 48 adjectives (each allowed only on some noun classes), 16
        adverbs of manner, time and frequency, and about 60 function words (determiners, pronouns,
        adpositions, auxiliaries, conjunctions, negation, question words, interjections).
      * One grammar of meanings. A sentence is generated as a small semantic frame: an agent, an action,
        a patient, optional location ("in Nova Harbour"), source and destination, companion, time (a
        year or a time adverb, which fixes the tense), manner, negation, passive voice, a subordinate
        or coordinated clause, reported speech (direct, with quotes, or indirect) and wh-questions. The
        frame is then *realised* in a language. Selectional restrictions (people read books, animals
        do not drive cars), tense agreement with time expressions and pronoun coreference inside
        two- or three-sentence lines give a masked-LM real structure to learn.
      * Cross-lingual anchors. Named entities (PER, ORG, LOC; e.g. "Nova Harbour" = B-LOC I-LOC) are
        written identically, in Latin script, in every language, and so are numbers (ASCII digits) and
        most punctuation. These shared strings are what lets a byte-level model line the languages up,
        as shared subwords and names do for XLM-R; without them the distant languages would be
        unrelated code books. The pre-training text also code-switches, as web text does: in 30% of
        the lines of every language but en, each content word (noun, verb, adjective, adverb) takes
        its English form with probability 0.3 (`SYN_CS_LINES`, `SYN_CS_WORDS`), an English word in
        a Cyrillic or Devanagari sentence. The labelled task files never code-switch.

    What differs per language (`SYN_LANG_INFO` lists it; the codes are ISO 639-1 codes used as
    *synthetic stand-ins*: "ru" here is not Russian, only a Cyrillic-script language of this world)
      code script      order adj    adp    notes                                               mlm size
      en   Latin       SVO   before prep.  real English words; irregular verbs, do-support       1.5 MB
      es   Latin       SVO   after  prep.  close relative of en: cognates by sound change        1.0 MB
      de   Latin       SOV   before prep.  close relative of en; nouns capitalised               0.75 MB
      ru   Cyrillic    SVO   before prep.  own vocabulary; no articles; accusative suffix        0.55 MB
      el   Greek       SOV   after  postp. own vocabulary; future particle; final sigma          0.38 MB
      ar   Arabic      VSO   after  prep.  own vocabulary from consonant roots; article "al"     0.24 MB
      hi   Devanagari  SOV   before postp. own vocabulary; ergative and object postpositions     0.12 MB
      Each language has its own inflection (plural, tense, agreement, participles) and its own
      function words. The Latin-script relatives derive their words from the English ones by
      systematic spelling/sound changes (es: th>t, w>gu, -o endings; de: th>d, t>z, p>pf, ou>au), the
      distant languages draw theirs at random from language-specific syllable inventories (seeded).
      Punctuation mostly agrees, with realistic exceptions: hi ends sentences with "।", ar writes "،"
      and "؟", el asks with ";", es opens questions with "¿".

    The files written under out_dir (XTREME.md sections 3.2-3.5; all test files keep their gold labels
    so that zero-shot scores can be computed, the case "the user adds the test gold")
      mlm/<lang>.txt                     pre-training text, UTF-8, one line = one to three sentences
      udpos/train-en.tsv, dev-<l>.tsv, test-<l>.tsv   word<TAB>UPOS, blank line between sentences
      panx/train-en.tsv, dev-<l>.tsv, test-<l>.tsv    token<TAB>IOB2 tag (PER ORG LOC); every sentence
                                         holds at least one entity, as in WikiAnn
      pawsx/train-en.tsv, dev-<l>.tsv, test-<l>.tsv   sentence1<TAB>sentence2<TAB>label written by
                                         csv.writer(delimiter="\\t"): CRLF, no header, fields with a
                                         '"' quoted (read back with quoting off, the quotes stay).
                                         1 = paraphrase (adverbial fronting, clause order, passive,
                                         conjunct order, direct vs indirect speech); 0 = PAWS-style
                                         scramble with the same words (agent and patient swapped,
                                         source and destination swapped, adjectives swapped between
                                         nouns, subjects of two clauses swapped).
      squad/train-v1.1.json, squad/dev-v1.1.json     English extractive QA, SQuAD v1.1 JSON
      xquad/xquad.<lang>.json            the same test paragraphs and questions in every language;
                                         question ids are shared across languages as in XQuAD
    Sizes: train 2000, dev 200, test 300 examples per file (`SYN_SIZES`; sentences, pairs or
    questions). Dev and test meanings are parallel across languages (like XQuAD and PAWS-X), train and
    the MLM text are drawn independently. A QA context is two or three sentences, under ~300 bytes;
    answers are entities, numbers (years, counts) or noun phrases, and the questions are generated
    from the same frame as the sentence they ask about ("When did Maria buy the old car ?").

    Lengths, for a byte-level model. Tokens are separated by single spaces (punctuation too), so words
    are whitespace tokens and QA answers start and end on word boundaries. English tagging sentences
    have at most 100 bytes (about 10 words on average), each English PAWS-X sentence at most 60 bytes
    so that a pair fits 128 byte tokens. The other scripts take 2 (Cyrillic, Greek, Arabic) or 3
    (Devanagari) bytes per letter, so the same sentence is 1.3 to 1.9 times longer in bytes, as with
    real UTF-8 text: fine-tuning with a short max_len must split or truncate those inputs.

    Everything is deterministic for a seed (byte-identical files) and uses only the standard library.

        Returns a summary: languages, per-language info (script, word order, adjective and adposition
        order, relation to en, mlm_bytes, mlm_lines), counts[task][file stem] (sentences, pairs or
        questions) and max_bytes (longest tagging sentence, sentence pair, QA context and question)."""
    W = _syn_world(seed)
    for sub in ("mlm", "udpos", "panx", "pawsx", "squad", "xquad"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    summary = dict(out_dir=str(out_dir), seed=seed, languages=list(SYN_LANGS), train_language=SYN_TRAIN_LANG,
                   info={}, counts={}, max_bytes={})
    for lang in SYN_LANGS:
        summary["info"][lang] = dict(SYN_LANG_INFO[lang], **_syn_write_mlm(W, out_dir, seed, lang))
    for task in ("udpos", "panx"):
        _syn_write_tagging_task(W, out_dir, seed, task, summary)
    _syn_write_pawsx(W, out_dir, seed, summary)
    _syn_write_qa(W, out_dir, seed, summary)
    return summary


# ------------------------------------------------------------------------------------------------
# The command line


def _cmd_score(args):
    scores = score_folders(args.predictions, args.labels)
    print(json.dumps(scores, indent=2) if args.json else format_scores(scores))


def _cmd_table(args):
    table = build_table(args.run_dirs)
    print(json.dumps(table, indent=2) if args.json else format_table(table, args.markdown))


def _cmd_make_synthetic(args):
    make_synthetic(args.out_dir, args.seed)
    print(f"wrote a synthetic world in XTREME's layout to {args.out_dir}")


def _parser():
    parser = argparse.ArgumentParser(prog="eval_xtreme.py", description=__doc__.split("\n\n")[0].strip())
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("score", help="score predictions in XTREME's official format against labels")
    p.add_argument("--predictions", required=True, help="folder of <task>/test-<lang>.tsv|json predictions")
    p.add_argument("--labels", required=True, help="folder of <task>/test-<lang>.tsv|json gold labels")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a listing")
    p.set_defaults(run=_cmd_score)
    p = sub.add_parser("table", help="a table shaped like the paper's Table 1 from finetune.py results")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="holds <task>/results.json files, or one results.json")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="machine-readable output")
    form.add_argument("--markdown", action="store_true", help="a Markdown table (for the README)")
    p.set_defaults(run=_cmd_table)
    p = sub.add_parser("make-synthetic", help="write the synthetic multilingual world in XTREME's layout")
    p.add_argument("out_dir", help="the DIR to create, like XTREME's download/ folder")
    p.add_argument("--seed", type=int, default=0, help="generator seed (same seed, same files)")
    p.set_defaults(run=_cmd_make_synthetic)
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except (DataError, OSError) as e:  # bad input: one clear line, no traceback (exit 2, like argparse)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
