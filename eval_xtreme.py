"""
XTREME for X-MoE: the seven downstream tasks as XTREME's download script leaves them on disk, the
official metrics, a scorer for predictions in XTREME's official format, and the paper's Table 1.

    python eval_xtreme.py score --predictions runs/xmoe/predictions --labels gold/
    python eval_xtreme.py score --predictions P --labels L --json  # exactly one JSON object on stdout
    python eval_xtreme.py score --predictions P --labels L --data data/synthetic  # the world's own languages
    python eval_xtreme.py table runs/dense runs/smoe runs/xmoe     # rows = models, columns = tasks
    python eval_xtreme.py table runs/* --markdown                  # the same table for the README
    python eval_xtreme.py chance --data data/synthetic --task udpos  # random predictions, per language

    from eval_xtreme import TASKS, languages, load_split, score_task, summarize, write_predictions
    train = load_split("download", "panx", "train", "en")   # [{"words": [...], "labels": [...]}, ...]

The data folder DIR is the `download/` folder written by google-research/xtreme's
scripts/download_data.sh (or by synthetic.py). Its test files carry no labels: XTREME strips them
on purpose (XTREME.md section 2), so they load with labels None and serve for prediction only; gold
labels for `score` come from the original archives, or from a labelled split through write_labels.
Every layout and metric detail follows XTREME.md, which cites the official scripts; `XT` below is
google-research/xtreme, and `XT evaluate.py` its scorer.

A task's average is over a fixed list of languages, not over the files found: XTREME's official test
languages, or those a world declares in <task>/languages.json (the synthetic world, whose languages are
not XTREME's). Where a language of the list has no scores, the listing and the table show it missing,
name the file it needs, and mark the average partial instead of printing it as XTREME's.
"""

import argparse
import csv
import json
import random
import re
import string
import sys
import unicodedata
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


def _candidates(data_dir, task, split, lang):
    """The paths a split's file of one language may have, XTREME's newest spelling first."""
    return [Path(data_dir, p.format(lang=lang)) for p in _patterns(task, split) if "{lang}" in p or lang == "en"]


def split_path(data_dir, task, split, lang):
    """Where a language's file of a split should be (the newest spelling), for messages."""
    candidates = _candidates(data_dir, task, split, lang)
    return str(candidates[0]) if candidates else f"none ({task} {split} data exists only in English)"


def find_split(data_dir, task, split, lang):
    """The file of one split and language, trying XTREME's spellings newest first; DataError if none."""
    patterns, candidates = _patterns(task, split), _candidates(data_dir, task, split, lang)
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
                    f"(scripts/download_data.sh) or write the synthetic world: python synthetic.py --out DIR")


# A world's own test languages: <task>/languages.json holds {"languages": [...]}. XTREME's download has
# no such file, and its tasks are averaged over TASKS[task]["langs"]; the synthetic world writes one per
# task (synthetic.py DECLARED, the same name), as its languages are not XTREME's. The same <task>/
# folder exists in a data folder and in a folder of official label files, so either can declare.
DECLARED = "languages.json"
OFFICIAL = "XTREME's official test languages"


def declared_languages(folder, task):
    """The languages folder/<task>/languages.json declares, or None where there is no such file."""
    _spec(task)  # an unknown task is an error, not a task without a declaration
    path = Path(folder, task, DECLARED)
    if not path.is_file():
        return None
    data = _read_json(path)
    langs = data.get("languages") if isinstance(data, dict) else None
    if not (isinstance(langs, list) and langs and all(isinstance(lang, str) and lang for lang in langs)):
        raise DataError(f"{path}: expected {{\"languages\": [\"en\", ...]}}, the task's test languages as "
                        "synthetic.py writes them; fix it, or delete it to average over XTREME's official list")
    return langs


def expected_languages(folder, task):
    """(languages, where the list comes from): the languages a task's average is over. A list declared
    under folder wins over XTREME's official one, so that a world of other languages is complete."""
    declared = declared_languages(folder, task)
    if declared is not None:
        return declared, str(Path(folder, task, DECLARED))
    if Path(folder, "mlm").is_dir():  # pre-training text beside the tasks: a synthetic world, not XTREME's
        return TASKS[task]["langs"], (f"{OFFICIAL}, as {folder} declares none: a synthetic world written before "
                                      f"worlds declared their languages? write it again: python synthetic.py "
                                      f"--out {folder}")
    return TASKS[task]["langs"], OFFICIAL


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
    """value None (a test file's missing label) passes, as does anything when labels is None."""
    if labels is not None and value is not None and value not in labels:
        raise DataError(f"{path}:{lineno}: {value!r} is not a label of this task (expected one of: "
                        f"{', '.join(labels)})")


def load_split(data_dir, task, split, lang):
    """The examples of one split and language:
    tag  -> [{"words": [...], "labels": [...] or None}]              (one per sentence)
    pair -> [{"text_a", "text_b", "label" or None}]
    qa   -> [{"id", "question", "context", "answers": [{"text", "answer_start"}] or None}]
    None = the file carries no labels (a test file after XTREME's download): for prediction only.
    The QA splits are XT's: see the comments in TASKS."""
    path, spec = find_split(data_dir, task, split, lang), _spec(task)
    if spec["kind"] == "tag":
        return _read_tagging(path, spec["labels"])
    if spec["kind"] == "pair":
        return _read_pairs(path, spec["labels"])
    return _squad_questions(path, _read_json(path))


def _read_tagging(path, labels):
    """XT utils_tag.py read_examples_from_file: one word a line, its tag in the last TAB field, and a
    blank line or a -DOCSTART- line ends a sentence. Test files have words only (no TAB); a file is
    labelled (word<TAB>tag) or not (word only), never both."""
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
            _check_label(path, lineno, tag, labels)
            current.append((lineno, fields[0], tag))
    sentences += [current] if current else []
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
    examples = []
    with open(path, encoding="utf-8-sig", newline="") as f, _reading(path):
        for lineno, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
            if len(row) not in (2, 3):
                raise DataError(f"{path}:{lineno}: {len(row)} TAB-separated fields; expected "
                                "text_a<TAB>text_b<TAB>label (train, dev) or text_a<TAB>text_b (test)")
            label = row[2].strip() if len(row) == 3 else None  # XT processors: str(line[2].strip())
            _check_label(path, lineno, label, labels)
            examples.append({"text_a": row[0], "text_b": row[1], "label": label})
    for lineno, ex in enumerate(examples, 1):
        if (ex["label"] is None) != (examples[0]["label"] is None):
            raise DataError(f"{path}:{lineno}: {'no' if ex['label'] is None else 'a'} label column here, unlike "
                            "line 1; a file holds either 3 columns (train, dev) or 2 (test)")
    return examples


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
    if metric == "mlqa":  # the only metric that depends on the language
        return mlqa_scores(gold, predictions, lang)
    return {"seqeval": seqeval_scores, "accuracy": accuracy, "squad": squad_scores}[metric](gold, predictions)


META = ("partial", "not_averaged")  # the keys of summarize's result that are neither a language nor avg_


def scored_languages(summary):
    """The languages that have scores in a summarize result."""
    return [k for k in summary if not k.startswith("avg_") and k not in META]


def _means(kind, per_lang):
    """Unweighted means over the languages, and XT evaluate.py's task score avg_metric: (avg EM + avg F1)
    / 2 for QA, avg F1 for tagging, avg accuracy for classification."""
    out = {f"avg_{m}": sum(s[m] for s in per_lang.values()) / len(per_lang) for m in METRICS[kind]}
    if kind == "qa":
        return {**out, "avg_metric": (out["avg_exact_match"] + out["avg_f1"]) / 2}
    return {**out, "avg_metric": out["avg_f1" if kind == "tag" else "avg_accuracy"]}


def summarize(task, per_lang, expected=None, source=None):
    """{lang: scores} -> {"avg_<metric>": ..., "avg_metric": ..., lang: scores}, the means as _means.
    expected, {lang: the file its scores come from}: the languages the average is over (XTREME's, or a
    world's own: expected_languages), `source` saying where that list comes from; without it, the
    languages given (English dev, for model selection). With it, a language outside the list keeps its
    scores but is named in "not_averaged"; and if a language of the list has none, the mean is not the
    task's score: the avg_ keys are left out, and "partial" holds {"over": the languages averaged,
    "of": the list's length, "mean": their avg_ keys (None if none), "missing": {lang: path},
    "languages_from": source}."""
    kind = _spec(task)["kind"]
    out = dict(sorted(per_lang.items()))
    if expected is None:
        return {**_means(kind, per_lang), **out}
    over = {lang: s for lang, s in per_lang.items() if lang in expected}  # per_lang's order: the same sums
    extra = sorted(set(per_lang) - set(expected))
    out = {"not_averaged": extra, **out} if extra else out
    missing = {lang: str(path) for lang, path in expected.items() if lang not in per_lang}
    if not missing:
        return {**_means(kind, over), **out}
    return {"partial": {"over": sorted(over), "of": len(expected), "mean": _means(kind, over) if over else None,
                        "missing": missing, "languages_from": source}, **out}


# ------------------------------------------------------------------------------------------------
# Official label and prediction files: <folder>/<task>/test-<lang>.tsv, or .json for QA

def official_path(folder, task, lang):
    """json for xquad, mlqa and tydiqa, tsv for the others (XT evaluate.py get_suffix)."""
    return Path(folder, task, f"test-{lang}.{'json' if _spec(task)['kind'] == 'qa' else 'tsv'}")


def write_predictions(folder, task, lang, predictions):
    """tag: one tag a line, a blank line after each sentence; pair: one label a line; qa: a flat JSON
    {question id: answer text}. Returns the path written."""
    path, kind = official_path(folder, task, lang), _spec(task)["kind"]
    if kind == "qa":
        text = json.dumps(predictions, ensure_ascii=False)
    elif kind == "tag":
        text = "".join("".join(tag + "\n" for tag in s) + "\n" for s in predictions)
    else:
        text = "".join(label + "\n" for label in predictions)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


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
    return write_predictions(folder, task, lang, {"version": "1.1", "data": articles})


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


def score_file(task, lang, pred_path, label_path):
    """One language's scores from its official prediction and label files."""
    spec = _spec(task)
    if spec["kind"] == "qa":
        gold, pred = read_squad(label_path), read_squad(pred_path)
        if not isinstance(gold, list) or any(q["answers"] is None for q in gold):
            raise DataError(f"{label_path}: no gold answers (SQuAD JSON with non-empty answers expected); "
                            f"XTREME's download strips them from {task} test files, take the original files")
        if not isinstance(pred, dict):
            raise DataError(f"{pred_path}: predictions must be a flat {{\"question id\": \"answer text\"}} object")
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


def score_folders(pred_dir, label_dir, data_dir=None):
    """{task: summarize(...)} for every label file under label_dir and the same-named prediction file,
    each task averaged over the languages that data_dir (else label_dir) declares, else over XTREME's
    official ones; a language of that list without a label file is missing (the average partial)."""
    labels = official_files(label_dir)
    if not labels:
        raise DataError(f"no label files under {label_dir}: expected <task>/test-<lang>.tsv (.json for xquad, "
                        f"mlqa, tydiqa) with task in {', '.join(TASKS)}; {_found_instead(label_dir)}")
    missing = [str(official_path(pred_dir, t, lang)) for t in labels for lang in labels[t]
               if not official_path(pred_dir, t, lang).is_file()]
    if missing:
        raise DataError(f"no prediction file for {len(missing)} label file(s): {', '.join(missing)} "
                        "(write one per label file, same name)")
    scores = {}
    for task, langs in labels.items():
        expected, source = expected_languages(label_dir if data_dir is None else data_dir, task)
        per_lang = {lang: score_file(task, lang, official_path(pred_dir, task, lang), path)
                    for lang, path in langs.items()}
        scores[task] = summarize(task, per_lang, {lang: official_path(label_dir, task, lang) for lang in expected},
                                 source)
    return scores


def _averages(means, metrics):
    return f"avg_metric {means['avg_metric']:.2f}  " + "  ".join(f"avg_{m} {means['avg_' + m]:.2f}" for m in metrics)


def _headline(task, s, metrics):
    """A task's first line: its averages, or the partial mean, which is not the task's score."""
    if "partial" not in s:
        n = len(scored_languages(s)) - len(s.get("not_averaged", []))
        return f"{task}: {_averages(s, metrics)}  (mean over {n} language(s))"
    p = s["partial"]
    means = _averages(p["mean"], metrics) if p["mean"] else "no language scored"
    return (f"{task}: partial, mean over {len(p['over'])} of {p['of']} languages: {means}  (not the task's "
            "score: languages are missing)")


def format_scores(scores):
    """A readable per-task, per-language listing of summarize's results (score_folders, chance): a
    language of the task's list without scores shows as missing, and one line names their files."""
    lines = []
    for task, s in scores.items():
        metrics, partial = METRICS[TASKS[task]["kind"]], s.get("partial")
        rows = {lang: "".join(f"{s[lang][m]:13.2f}" for m in metrics)
                + ("  (not in the average: not in the task's list)" if lang in s.get("not_averaged", ()) else "")
                for lang in scored_languages(s)}
        rows.update({lang: f"{'missing':>13}" for lang in (partial["missing"] if partial else ())})
        lines += [_headline(task, s, metrics), "  lang    " + "".join(f"{m:>13}" for m in metrics)]
        lines += [f"  {lang:<8}{rows[lang]}" for lang in sorted(rows)]
        lines += [f"  {_missing_line(partial)}"] if partial else []
    return "\n".join(lines)


def _missing_line(p):
    """One line: which languages of the list have no scores, and where their files should be."""
    return (f"missing {', '.join(p['missing'])} (of {p['languages_from']}): their files should be "
            + ", ".join(map(str, p["missing"].values())))


# ------------------------------------------------------------------------------------------------
# The results table, shaped like the paper's Table 1 (rows = models, mean ± std over seeds)

# the numbers of a cell, in the paper's order ("F1 / EM" for QA)
HEADLINE = {"tag": ("avg_f1",), "pair": ("avg_accuracy",), "qa": ("avg_f1", "avg_exact_match")}
METRIC_TITLES = {"tag": "F1", "pair": "Acc.", "qa": "F1 / EM"}


def _read_results(path):
    """(task, results) of one results.json, after checking that it holds what the table needs."""
    results = _read_json(path)
    task = results.get("task") if isinstance(results, dict) else None
    if task not in TASKS:
        raise DataError(f"{path}: \"task\" must be one of {', '.join(TASKS)}, found {task!r}")
    for part in ("mean", "std"):
        stats = results.get(part) if isinstance(results.get(part), dict) else {}
        missing = [k for k in HEADLINE[TASKS[task]["kind"]] if not isinstance(stats.get(k), (int, float))]
        if missing:
            raise DataError(f"{path}: \"{part}\" lacks {', '.join(missing)}; finetune.py writes {{\"task\", "
                            "\"name\", \"seeds\", \"mean\", \"std\", \"ic\"} with the task's avg_ keys")
    return task, results


def read_run(run_dir):
    """(row name, {task: results}) from RUN_DIR/<task>/results.json, or RUN_DIR/results.json. The row is
    named by the results' "name", else by the folder."""
    run_dir = Path(run_dir)
    direct = run_dir / "results.json"
    paths = [direct] if direct.is_file() else sorted(run_dir.glob("*/results.json"))
    if not paths:
        raise DataError(f"no results in {run_dir}: expected {run_dir}/<task>/results.json (written by "
                        f"finetune.py) or {direct}; {_found_instead(run_dir)}")
    runs = dict(_read_results(path) for path in paths)
    name = next((r["name"] for r in runs.values() if r.get("name")), run_dir.resolve().name)
    return name, runs


def _coverage(task, results):
    """None if results.json has scores for every language of its task's list, else what is missing:
    {"over", "of", "missing": {lang: path}, "languages_from"} as in summarize's "partial". The list is
    the one of the data folder it was fine-tuned on (args.data, as finetune.py records it: the synthetic
    world declares its own), else XTREME's official one."""
    data = results["args"].get("data") if isinstance(results.get("args"), dict) else None
    seeds = results["seeds"] if isinstance(results.get("seeds"), dict) else {}
    split = results.get("split") if results.get("split") in SPLITS else "test"  # dev: the test files had no labels
    langs, source = expected_languages(data, task) if data else (TASKS[task]["langs"], OFFICIAL)
    scored = {lang for s in seeds.values() if isinstance(s, dict) for lang in scored_languages(s)}
    missing = {lang: split_path(data or "<data>", task, split, lang) for lang in langs if lang not in scored}
    return {"over": sorted(scored & set(langs)), "of": len(langs), "missing": missing,
            "languages_from": source} if missing else None


def build_table(run_dirs):
    """{"avg_over": [tasks], "rows": [{"name", "tasks": {task: {key: {"mean", "std"}}}, "avg", "partial"}]}.
    mean and std are taken from results.json as finetune.py computed them over its seeds.
    Avg is the mean of XTREME's task score avg_metric over the tasks that every row has, with QA as
    (F1 + EM) / 2: this reproduces the paper's Table 1 (Dense: 70.0, 61.1, (67.3 + 51.1)/2,
    (58.7 + 41.1)/2, (42.1 + 28.3)/2, 70.1, 84.1 average to 61.4 as printed; F1 alone gives 64.8).
    partial: {task: _coverage} for the tasks a row has scores of only some languages of; their cells
    are not XTREME's task score, so a row with one among the common tasks has Avg None."""
    runs = [read_run(d) for d in run_dirs]
    common = [t for t in TASKS if all(t in results for _, results in runs)]
    rows = []
    for name, results in runs:
        cells = {t: {k: {"mean": r["mean"][k], "std": r["std"][k]} for k in HEADLINE[TASKS[t]["kind"]]}
                 for t, r in sorted(results.items(), key=lambda item: list(TASKS).index(item[0]))}
        partial = {t: p for t in cells if (p := _coverage(t, results[t]))}
        scores = [sum(v["mean"] for v in cells[t].values()) / len(cells[t]) for t in common]
        avg = sum(scores) / len(scores) if common and not set(partial) & set(common) else None
        rows.append({"name": name, "tasks": cells, "avg": avg, "partial": partial})
    return {"avg_over": common, "rows": rows}


def _cell(cell, p):
    """mean ± std (F1 / EM for QA), then '(partial k/n)' for a task scored on k of its n languages."""
    text = " / ".join(f"{v['mean']:.1f} ± {v['std']:.1f}" for v in cell.values())
    return text + (f" (partial {len(p['over'])}/{p['of']})" if p else "")


def _row_cells(row, avg_over):
    """A row's cells: '-' for a task it lacks, and Avg 'partial' where a partial task leaves it out."""
    partial = row.get("partial", {})
    cells = ["-" if t not in row["tasks"] else _cell(row["tasks"][t], partial.get(t)) for t in TASKS]
    if row["avg"] is not None:
        return [row["name"], *cells, f"{row['avg']:.1f}"]
    return [row["name"], *cells, "partial" if set(partial) & set(avg_over) else "-"]


def _partial_notes(table):
    """One line per partial cell: the languages missing and where their files should be."""
    return [f"{row['name']} {TASKS[t]['title']}: partial, {len(p['over'])} of {p['of']} languages; "
            + _missing_line(p) for row in table["rows"] for t, p in row.get("partial", {}).items()]


def format_table(table, markdown=False):
    """Plain text (aligned columns) or a Markdown table; a task a row lacks shows '-', one scored on only
    some of its languages is marked partial and followed by a line naming what is missing."""
    header = ["Model"] + [f"{s['title']} {METRIC_TITLES[s['kind']]}" for s in TASKS.values()] + ["Avg"]
    body = [_row_cells(row, table["avg_over"]) for row in table["rows"]]
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *body]]
    else:
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *body]]
    over = ", ".join(TASKS[t]["title"] for t in table["avg_over"]) or "no task common to all rows"
    notes = _partial_notes(table)
    avg = (f"Avg: mean of XTREME's task score over {over} (QA: (F1 + EM) / 2, as the paper's Table 1); cells: "
           "mean ± std over seeds" + ("; a partial cell is not the task's score and leaves Avg out" if notes else ""))
    return "\n".join(lines + ["", avg, *notes])


# ------------------------------------------------------------------------------------------------
# Chance: what a model that ignores its input scores on each test language, the floor that zero-shot
# scores are read against (on the synthetic world, whose test files keep their labels)

def chance_scores(data_dir, task, draws=5, seed=0):
    """{lang: scores} of the labelled test languages: tags drawn from the English training tags'
    distribution (tagging), the majority English training label (pairs), a random span of one to
    three words of the context (QA); draws of random predictions are averaged."""
    kind, rng = _spec(task)["kind"], random.Random(seed)
    train = load_split(data_dir, task, "train", "en")
    tags = [t for ex in train for t in ex["labels"]] if kind == "tag" else None
    majority = Counter(ex["label"] for ex in train).most_common(1)[0][0] if kind == "pair" else None
    out = {}
    for lang in languages(data_dir, task, "test"):
        test = load_split(data_dir, task, "test", lang)
        gold = [ex["labels"] if kind == "tag" else ex["label"] if kind == "pair" else ex["answers"] for ex in test]
        if not test or None in gold:
            continue
        runs = []
        for _ in range(1 if kind == "pair" else draws):
            if kind == "tag":
                predictions = [[rng.choice(tags) for _ in ex["words"]] for ex in test]
            elif kind == "pair":
                predictions = [majority] * len(test)
            else:
                predictions = {ex["id"]: _random_span(ex["context"].split(), rng) for ex in test}
            runs.append(score_task(task, lang, test if kind == "qa" else gold, predictions))
        out[lang] = {m: sum(r[m] for r in runs) / len(runs) for m in runs[0]}
    return out


def _random_span(words, rng):
    n = rng.randint(1, 3)
    start = rng.randrange(max(1, len(words) - n + 1))
    return " ".join(words[start:start + n])


# ------------------------------------------------------------------------------------------------
# The command line

def _cmd_score(args):
    scores = score_folders(args.predictions, args.labels, args.data)
    print(json.dumps(scores, indent=2) if args.json else format_scores(scores))


def _cmd_table(args):
    table = build_table(args.run_dirs)
    print(json.dumps(table, indent=2) if args.json else format_table(table, args.markdown))


def _cmd_chance(args):
    langs, source = expected_languages(args.data, args.task)
    expected = {lang: split_path(args.data, args.task, "test", lang) for lang in langs}
    scores = {args.task: summarize(args.task, chance_scores(args.data, args.task), expected, source)}
    print(json.dumps(scores, indent=2) if args.json else format_scores(scores))


def _parser():
    parser = argparse.ArgumentParser(prog="eval_xtreme.py", description=__doc__.split("\n\n")[0].strip())
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("score", help="score predictions in XTREME's official format against labels")
    p.add_argument("--predictions", required=True, help="folder of <task>/test-<lang>.tsv|json predictions")
    p.add_argument("--labels", required=True, help="folder of <task>/test-<lang>.tsv|json gold labels")
    p.add_argument("--data", help="the data folder whose <task>/languages.json lists the languages to average "
                   "over (the synthetic world's); default: the label folder's own, else XTREME's official ones")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a listing")
    p.set_defaults(run=_cmd_score)
    p = sub.add_parser("table", help="a table shaped like the paper's Table 1 from finetune.py results")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="holds <task>/results.json files, or one results.json")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="machine-readable output")
    form.add_argument("--markdown", action="store_true", help="a Markdown table (for the README)")
    p.set_defaults(run=_cmd_table)
    p = sub.add_parser("chance", help="what random predictions score on each labelled test language")
    p.add_argument("--data", required=True, help="the download/ folder (or the synthetic world's)")
    p.add_argument("--task", required=True, choices=list(TASKS), help="the XTREME task")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a listing")
    p.set_defaults(run=_cmd_chance)
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
