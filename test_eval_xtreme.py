"""
eval_xtreme.py: the metrics against hand-worked examples, the loaders on files written here in
XTREME's exact formats, the official label and prediction files, and the command line.

    python -m pytest -q test_eval_xtreme.py
"""

import json
import re
import shutil

import pytest

import synthetic
from conftest import assert_clean_error, run
from eval_xtreme import (DECLARED, DataError, TASKS, accuracy, build_table, expected_languages, get_entities,
                         languages, load_split, mlqa_normalize, mlqa_scores, read_label, read_squad, read_tag,
                         seqeval_scores, squad_normalize, squad_scores, summarize, write_labels, write_predictions)


def write_bytes(path, text, encoding="utf-8"):
    """Write text byte for byte (no newline translation), creating the folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def write_json(path, obj):
    return write_bytes(path, json.dumps(obj, ensure_ascii=False))


def squad(qas, version="1.1", context="The bridge was opened in 1932 by the mayor."):
    """SQuAD v1.1 JSON with one paragraph holding (id, [answer texts]) questions."""
    return {"version": version, "data": [{"title": "T", "paragraphs": [{"context": context, "qas": [
        {"id": qid, "question": "Q?", "answers": [{"answer_start": 0, "text": t} for t in texts]}
        for qid, texts in qas]}]}]}


# ------------------------------------------------------------------------------------------------
# Tasks


def test_task_labels_in_xtreme_order():
    assert TASKS["udpos"]["labels"] == ["O", "ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM",
                                        "PART", "PRON", "PROPN", "PUNCT", "SCONJ", "SYM", "VERB", "X"]
    assert TASKS["panx"]["labels"] == ["B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER", "O"]
    assert TASKS["xnli"]["labels"] == ["contradiction", "entailment", "neutral"]
    assert TASKS["pawsx"]["labels"] == ["0", "1"]
    counts = {t: len(s["langs"]) for t, s in TASKS.items()}
    assert counts == {"udpos": 33, "panx": 40, "xquad": 11, "mlqa": 7, "tydiqa": 9, "xnli": 15, "pawsx": 7}


# ------------------------------------------------------------------------------------------------
# Metrics against hand-worked examples


def test_accuracy_by_hand():
    # 3 of 4 equal -> 75
    gold = ["entailment", "neutral", "contradiction", "neutral"]
    pred = ["entailment", "contradiction", "contradiction", "neutral"]
    assert accuracy(gold, pred) == {"accuracy": pytest.approx(75.0)}


def test_seqeval_ner_lenient_iob2():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "I-LOC"], ["O", "I-ORG", "B-PER"]]
    # flat with an O after each sentence: gold entities (PER,0,1) (LOC,3,3) (ORG,5,6)
    # pred: I-LOC after O starts (LOC,3,3); I-ORG after O starts (ORG,6,6), ended by B-PER -> (PER,7,7)
    assert get_entities(pred) == [("PER", 0, 1), ("LOC", 3, 3), ("ORG", 6, 6), ("PER", 7, 7)]
    # correct 2 (PER 0-1, LOC 3-3): P = 2/4, R = 2/3, F1 = 2PR/(P+R) = 4/7
    scores = seqeval_scores(gold, pred)
    assert scores["precision"] == pytest.approx(50.0)
    assert scores["recall"] == pytest.approx(200 / 3)
    assert scores["f1"] == pytest.approx(400 / 7)


def test_seqeval_sentence_boundary_is_o():
    # B-LOC | I-LOC across a sentence boundary: two entities, not one (LOC,0,1)
    assert get_entities([["B-LOC"], ["I-LOC"]]) == [("LOC", 0, 0), ("LOC", 2, 2)]
    # seqeval's start rule (S, I): an I after a single-token S chunk starts a chunk even of the same type
    assert get_entities([["S-PER", "I-PER"]]) == [("PER", 0, 0), ("PER", 1, 1)]


def test_seqeval_pos_chunks():
    gold = [["DET", "NOUN", "NOUN", "VERB", "SCONJ", "SCONJ", "PRON", "NOUN"], ["NOUN", "SYM", "NUM"]]
    pred = [["DET", "NOUN", "NOUN", "VERB", "SCONJ", "ADP", "PRON", "NOUN"], ["NOUN", "NOUN", "NUM"]]
    # the first character is the tag: NOUN NOUN is one chunk, each SCONJ / SYM ("S") is its own chunk,
    # and NOUN at 7 and NOUN at 9 are split by the boundary O at 8
    assert get_entities(gold) == [("DET", 0, 0), ("NOUN", 1, 2), ("VERB", 3, 3), ("SCONJ", 4, 4), ("SCONJ", 5, 5),
                                  ("PRON", 6, 6), ("NOUN", 7, 7), ("NOUN", 9, 9), ("SYM", 10, 10), ("NUM", 11, 11)]
    # pred: DET, NOUN 1-2, VERB, SCONJ 4, ADP 5, PRON, NOUN 7, NOUN 9-10, NUM -> 9 chunks, 7 of them in gold
    # P = 7/9, R = 7/10, F1 = 2*7/(9+10) = 14/19 (token accuracy would be 9/11)
    scores = seqeval_scores(gold, pred)
    assert scores["precision"] == pytest.approx(700 / 9)
    assert scores["recall"] == pytest.approx(70.0)
    assert scores["f1"] == pytest.approx(1400 / 19)


def test_seqeval_no_chunks_is_zero():
    assert seqeval_scores([["O", "O"]], [["O", "O"]]) == {"f1": 0.0, "precision": 0.0, "recall": 0.0}


def test_squad_normalize():
    # lower, drop ASCII punctuation ("-" and "!"), drop "the", collapse spaces
    assert squad_normalize("The  Eiffel-Tower!") == "eiffeltower"
    # ASCII-only punctuation: the fullwidth comma stays; a standalone Spanish "a" goes (English articles)
    assert squad_normalize("北京，中国") == "北京，中国"
    assert squad_normalize("a Madrid") == "madrid"


def squad_case():
    questions = [
        {"id": "q1", "answers": [{"text": "the Eiffel Tower"}, {"text": "Eiffel Tower in Paris"}]},
        {"id": "q2", "answers": [{"text": "Paris, France"}]},
        {"id": "q3", "answers": [{"text": "1932"}, {"text": "in June 1932"}]},
        {"id": "q4", "answers": [{"text": "The"}]},
        {"id": "q5", "answers": [{"text": "anything"}]},
    ]
    predictions = {"q1": "Eiffel tower.", "q2": "in Paris", "q3": "June 1932", "q4": ""}
    return questions, predictions


def test_squad_scores_by_hand(capsys):
    questions, predictions = squad_case()
    # q1: "eiffel tower" = first gold normalized                        EM 1  F1 1
    # q2: [in paris] vs [paris france]: 1 common, P = R = 1/2            EM 0  F1 0.5
    # q3: vs "1932": P 1/2 R 1 -> 2/3; vs "in june 1932": P 1 R 2/3 -> 0.8; max  EM 0  F1 0.8
    # q4: "" vs "The" -> "" = "": EM 1, but no common token              EM 1  F1 0
    # q5: no prediction                                                  EM 0  F1 0
    # EM = 2/5 = 40; F1 = (1 + 0.5 + 0.8)/5 = 46
    scores = squad_scores(questions, predictions)
    assert scores["exact_match"] == pytest.approx(40.0)
    assert scores["f1"] == pytest.approx(46.0)
    assert "q5" in capsys.readouterr().err


def test_squad_max_over_golds_separately():
    # EM from gold "a" (normalizes to ""), F1 from neither: EM 1, F1 0
    q = [{"id": "x", "answers": [{"text": "a"}, {"text": "b c"}]}]
    assert squad_scores(q, {"x": ""}) == {"exact_match": pytest.approx(100.0), "f1": pytest.approx(0.0)}


def test_mlqa_normalize_by_language():
    # zh: Unicode punctuation dropped, each CJK character a token, the runs between split on spaces
    assert mlqa_normalize("北京大学。", "zh") == "北 京 大 学"
    assert mlqa_normalize("GPT-4模型 v2", "zh") == "gpt4 模 型 v2"
    # ar: every "ال" goes, even inside a word
    assert mlqa_normalize("فالكتاب", "ar") == "ف كتاب"
    assert mlqa_normalize("الكتاب", "ar") == "كتاب"
    # es articles; the preposition "a" stays (unlike SQuAD's English rule); « » are Unicode punctuation
    assert mlqa_normalize("La casa de los Reyes", "es") == "casa de reyes"
    assert mlqa_normalize("«a Madrid»", "es") == "a madrid"
    assert mlqa_normalize("Der Hund", "de") == "hund"
    assert mlqa_normalize("The  Dog", "hi") == "the dog"
    with pytest.raises(ValueError, match="Unknown Language"):
        mlqa_normalize("le chat", "fr")


def test_mlqa_scores_by_hand():
    questions = [{"id": "a", "answers": [{"text": "北京大学。"}]}, {"id": "b", "answers": [{"text": "清华大学"}]}]
    predictions = {"a": "北京大学", "b": "北京大学"}
    # a: equal after dropping "。": EM 1 F1 1; b: chars [北京大学] vs [清华大学]: 2 common, P = R = 1/2: F1 0.5
    scores = mlqa_scores(questions, predictions, "zh")
    assert scores == {"exact_match": pytest.approx(50.0), "f1": pytest.approx(75.0)}
    # SQuAD's normalization keeps the fullwidth "。" (not ASCII) and sees one token per answer: all 0
    assert squad_scores(questions, predictions) == {"exact_match": 0.0, "f1": 0.0}


def test_summarize_avg_metric():
    qa = summarize("mlqa", {"en": {"exact_match": 40.0, "f1": 60.0}, "de": {"exact_match": 20.0, "f1": 50.0}})
    # avg EM 30, avg F1 55, avg_metric (30 + 55)/2
    assert (qa["avg_exact_match"], qa["avg_f1"], qa["avg_metric"]) == (30.0, 55.0, 42.5)
    assert qa["de"] == {"exact_match": 20.0, "f1": 50.0}
    tag = summarize("panx", {"en": {"f1": 80.0, "precision": 70.0, "recall": 90.0},
                             "de": {"f1": 60.0, "precision": 50.0, "recall": 70.0}})
    assert (tag["avg_f1"], tag["avg_precision"], tag["avg_recall"], tag["avg_metric"]) == (70.0, 60.0, 80.0, 70.0)
    assert summarize("xnli", {"en": {"accuracy": 80.0}, "fr": {"accuracy": 70.0}})["avg_metric"] == 75.0


# ------------------------------------------------------------------------------------------------
# Loaders on files in the exact formats of XTREME's download script


def test_load_tagging_bom_crlf_docstart(tmp_path):
    # BOM, CRLF, a -DOCSTART- line, a middle column (the tag is the last field), no final newline
    write_bytes(tmp_path / "udpos/train-en.tsv",
              "\ufeff-DOCSTART-\r\n\r\nBirds\tNOUN\r\nsing\tx\tVERB\r\n.\tPUNCT\r\n\r\nLoud\tADJ\r\nmusic\tNOUN")
    assert load_split(tmp_path, "udpos", "train", "en") == [
        {"words": ["Birds", "sing", "."], "labels": ["NOUN", "VERB", "PUNCT"]},
        {"words": ["Loud", "music"], "labels": ["ADJ", "NOUN"]}]


def test_load_tagging_test_without_labels(tmp_path):
    write_bytes(tmp_path / "panx/test-de.tsv", "Maria\nbesuchte\nBerlin\n\nUNESCO\n")
    write_bytes(tmp_path / "panx/dev-de.tsv", "Maria\tB-PER\nBerlin\tB-LOC\n")
    assert load_split(tmp_path, "panx", "test", "de") == [
        {"words": ["Maria", "besuchte", "Berlin"], "labels": None}, {"words": ["UNESCO"], "labels": None}]
    assert load_split(tmp_path, "panx", "dev", "de")[0]["labels"] == ["B-PER", "B-LOC"]


def test_load_tagging_bad_lines(tmp_path):
    path = write_bytes(tmp_path / "panx/train-en.tsv", "Maria\tB-PER\nvisited\nParis\tB-LOC\n")
    with pytest.raises(DataError, match=f"{path}:2:"):  # labelled file, line 2 without a tag
        load_split(tmp_path, "panx", "train", "en")
    path = write_bytes(tmp_path / "panx/dev-en.tsv", "Maria\tB-PER\n\nParis\tB-MISC\n")
    with pytest.raises(DataError, match=f"{path}:3: 'B-MISC'"):
        load_split(tmp_path, "panx", "dev", "en")


def test_load_pairs_quotes_kept_crlf(tmp_path):
    # csv.writer output: CRLF and a quoted field with doubled quotes, read back with quoting off
    write_bytes(tmp_path / "xnli/dev-en.tsv", 'The cat sat.\tA cat is sitting.\tentailment\r\n'
                                            '"She said ""no"" twice."\tShe agreed.\tcontradiction\r\n')
    write_bytes(tmp_path / "xnli/test-de.tsv", "\ufeffDer Zug kam an.\tDer Zug hatte Verspätung.\r\n")
    assert load_split(tmp_path, "xnli", "dev", "en") == [
        {"text_a": "The cat sat.", "text_b": "A cat is sitting.", "label": "entailment"},
        {"text_a": '"She said ""no"" twice."', "text_b": "She agreed.", "label": "contradiction"}]
    assert load_split(tmp_path, "xnli", "test", "de") == [
        {"text_a": "Der Zug kam an.", "text_b": "Der Zug hatte Verspätung.", "label": None}]


def test_load_pairs_bad_lines(tmp_path):
    path = write_bytes(tmp_path / "pawsx/train-en.tsv", "a b\ta c\t1\r\nx\ty\tz\t0\r\n")
    with pytest.raises(DataError, match=f"{path}:2: 4 TAB-separated fields"):
        load_split(tmp_path, "pawsx", "train", "en")
    path = write_bytes(tmp_path / "pawsx/dev-en.tsv", "a\tb\t1\r\nc\td\t2\r\n")
    with pytest.raises(DataError, match=f"{path}:2: '2'"):
        load_split(tmp_path, "pawsx", "dev", "en")
    path = write_bytes(tmp_path / "xnli/dev-fr.tsv", "a\tb\tneutral\r\nc\td\r\n")
    with pytest.raises(DataError, match=f"{path}:2: no label column"):
        load_split(tmp_path, "xnli", "dev", "fr")


def test_load_squad_and_stripped_xquad(tmp_path):
    write_json(tmp_path / "squad/train-v1.1.json", squad([("s1", ["1932"])]))
    stripped = {"data": [{"paragraphs": [{"context": "Die Brücke.", "qas": [
        {"answers": [{"answer_start": 0, "text": ""}], "question": "Wann?", "id": "q-0001"}]}]}], "version": "1.1"}
    write_json(tmp_path / "xquad/xquad.de.json", stripped)
    assert load_split(tmp_path, "xquad", "train", "en") == [
        {"id": "s1", "question": "Q?", "context": "The bridge was opened in 1932 by the mayor.",
         "answers": [{"text": "1932", "answer_start": 0}]}]
    assert load_split(tmp_path, "mlqa", "train", "en")[0]["id"] == "s1"  # MLQA trains on SQuAD too
    assert load_split(tmp_path, "xquad", "test", "de") == [
        {"id": "q-0001", "question": "Wann?", "context": "Die Brücke.", "answers": None}]
    with pytest.raises(DataError, match="only in English"):
        load_split(tmp_path, "xquad", "train", "de")


def test_load_mlqa_numeric_version(tmp_path):
    root = tmp_path / "mlqa/MLQA_V1"
    write_json(root / "test/test-context-de-question-de.json", squad([("h" * 40, ["1932"])], version=1.0))
    write_json(root / "test/test-context-de-question-en.json", squad([("c", ["x"])], version=1.0))
    write_json(root / "dev/dev-context-es-question-es.json", squad([("d", ["y"])], version=1.0))
    write_json(tmp_path / "squad/dev-v1.1.json", squad([("e", ["z"])]))
    assert load_split(tmp_path, "mlqa", "test", "de")[0]["answers"] == [{"text": "1932", "answer_start": 0}]
    assert languages(tmp_path, "mlqa", "test") == ["de"]  # context language = question language only
    assert languages(tmp_path, "mlqa", "dev") == ["en", "es"]  # en from SQuAD dev
    assert load_split(tmp_path, "mlqa", "dev", "en")[0]["id"] == "e"


def test_load_tydiqa_both_spellings(tmp_path):
    write_json(tmp_path / "tydiqa/tydiqa-goldp-v1.1-train/tydiqa.goldp.en.train.json", squad([("1", ["a b"])]))
    write_json(tmp_path / "tydiqa/tydiqa-goldp-v1.1-train/tydiqa-goldp-v1.1-train.json", squad([("2", ["c"])]))
    write_json(tmp_path / "tydiqa/tydiqa-goldp-v1.1-dev/tydiqa.sw.dev.json",
             squad([("swahili--123-0", ["Nairobi", "mji wa Nairobi"])]))
    write_json(tmp_path / "tydiqa/tydiqa-goldp-v1.1-dev/tydiqa.goldp.ar.dev.json", squad([("arabic-1-0", ["x"])]))
    assert languages(tmp_path, "tydiqa", "train") == ["en"]
    assert languages(tmp_path, "tydiqa", "test") == ["ar", "sw"]
    assert [a["text"] for a in load_split(tmp_path, "tydiqa", "test", "sw")[0]["answers"]] == ["Nairobi",
                                                                                                "mji wa Nairobi"]
    assert load_split(tmp_path, "tydiqa", "train", "en")[0]["id"] == "1"
    with pytest.raises(DataError, match="no 'dev' split"):
        load_split(tmp_path, "tydiqa", "dev", "en")


def test_missing_folder_and_language(tmp_path):
    with pytest.raises(DataError) as e:
        load_split(tmp_path / "download", "udpos", "test", "de")
    assert str(tmp_path / "download/udpos/test-de.tsv") in str(e.value) and str(tmp_path) in str(e.value)
    write_bytes(tmp_path / "udpos/test-en.tsv", "Birds\n")
    write_bytes(tmp_path / "udpos/test-fr.tsv", "Oiseaux\n")
    with pytest.raises(DataError, match="found test files for: en, fr") as e:
        load_split(tmp_path, "udpos", "test", "de")
    assert str(tmp_path / "udpos/test-de.tsv") in str(e.value)
    with pytest.raises(DataError, match="unknown task 'pos'"):
        load_split(tmp_path, "pos", "test", "de")


def test_malformed_json(tmp_path):
    path = write_bytes(tmp_path / "xquad/xquad.en.json", '{"data": [\n  {"paragraphs": }\n]}')
    with pytest.raises(DataError, match=f"{path}:2:"):
        load_split(tmp_path, "xquad", "test", "en")
    path = write_json(tmp_path / "xquad/xquad.es.json", {"data": [{"title": "no paragraphs"}]})
    with pytest.raises(DataError, match="not SQuAD v1.1 JSON"):
        load_split(tmp_path, "xquad", "test", "es")


# ------------------------------------------------------------------------------------------------
# Official label and prediction files


def test_write_and_read_official_files(tmp_path):
    path = write_predictions(tmp_path, "udpos", "en", [["NOUN", "VERB"], ["ADJ"]])
    assert path == tmp_path / "udpos/test-en.tsv" and path.read_text() == "NOUN\nVERB\n\nADJ\n\n"
    path = write_predictions(tmp_path, "xnli", "de", ["neutral", "entailment"])
    assert path.read_text() == "neutral\nentailment\n"
    path = write_predictions(tmp_path, "xquad", "zh", {"q1": "北京"})
    assert path.name == "test-zh.json" and json.loads(path.read_text(encoding="utf-8")) == {"q1": "北京"}
    # XT read_tag: no trailing blank line, the last sentence still counts
    assert read_tag(write_bytes(tmp_path / "t.tsv", "B-PER\nO\n\nB-LOC")) == [["B-PER", "O"], ["B-LOC"]]
    assert read_label(write_bytes(tmp_path / "l.tsv", "1\r\n0\r\n")) == ["1", "0"]


def test_write_labels_round_trip(tmp_path):
    questions = [{"id": "q1", "question": "Wann?", "context": "1932 ...",
                  "answers": [{"text": "1932", "answer_start": 0}]}]
    path = write_labels(tmp_path, "tydiqa", "fi", questions)
    assert json.loads(path.read_text())["data"][0]["paragraphs"][0]["qas"][0]["id"] == "q1"
    assert read_squad(path) == questions
    with pytest.raises(DataError, match="no labels"):
        write_labels(tmp_path, "xnli", "en", [{"text_a": "a", "text_b": "b", "label": None}])


# ------------------------------------------------------------------------------------------------
# The command line, end to end


def declare(folder, task, langs):
    """folder/<task>/languages.json, as synthetic.py writes it: the task's own list of test languages."""
    return write_json(folder / task / DECLARED, {"languages": langs})


def score_folders(tmp_path):
    """Labels of a few languages each, which the label folder declares as the tasks' lists (so that the
    averages are the hand-worked means over these languages; the official lists: further down)."""
    gold, pred = tmp_path / "labels", tmp_path / "predictions"
    pos_gold = [["DET", "NOUN", "NOUN", "VERB", "SCONJ", "SCONJ", "PRON", "NOUN"], ["NOUN", "SYM", "NUM"]]
    pos_pred = [["DET", "NOUN", "NOUN", "VERB", "SCONJ", "ADP", "PRON", "NOUN"], ["NOUN", "NOUN", "NUM"]]
    write_bytes(gold / "udpos/test-en.tsv", "\n\n".join("\n".join(s) for s in pos_gold))  # no trailing blank
    write_predictions(pred, "udpos", "en", pos_pred)
    write_predictions(gold, "udpos", "de", [["NOUN", "VERB"]])
    write_predictions(pred, "udpos", "de", [["NOUN", "VERB"]])
    write_predictions(gold, "xnli", "en", ["entailment", "neutral", "contradiction", "neutral"])
    write_predictions(pred, "xnli", "en", ["entailment", "contradiction", "contradiction", "neutral"])
    write_predictions(gold, "xnli", "de", ["neutral", "neutral"])
    write_predictions(pred, "xnli", "de", ["neutral", "entailment"])
    questions, predictions = squad_case()
    write_json(gold / "xquad/test-en.json", squad([(q["id"], [a["text"] for a in q["answers"]]) for q in questions]))
    write_predictions(pred, "xquad", "en", predictions)
    write_json(gold / "mlqa/test-zh.json", squad([("a", ["北京大学。"]), ("b", ["清华大学"])], version=1.0))
    write_predictions(pred, "mlqa", "zh", {"a": "北京大学", "b": "北京大学"})
    for task, langs in {"udpos": ["en", "de"], "xnli": ["en", "de"], "xquad": ["en"], "mlqa": ["zh"]}.items():
        declare(gold, task, langs)
    return gold, pred


def test_cli_score_json(tmp_path):
    gold, pred = score_folders(tmp_path)
    result = run("eval_xtreme.py", "score", "--predictions", pred, "--labels", gold, "--json")
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)  # exactly one JSON object
    assert list(scores) == ["udpos", "xquad", "mlqa", "xnli"]
    # udpos: en F1 14/19, P 7/9, R 7/10 (the POS case above); de all right: 100
    assert scores["udpos"]["en"] == {"f1": pytest.approx(1400 / 19), "precision": pytest.approx(700 / 9),
                                     "recall": pytest.approx(70.0)}
    assert scores["udpos"]["avg_f1"] == pytest.approx((1400 / 19 + 100) / 2)
    assert scores["udpos"]["avg_metric"] == pytest.approx((1400 / 19 + 100) / 2)
    # xnli: en 3/4, de 1/2 -> 62.5
    assert scores["xnli"]["avg_accuracy"] == pytest.approx(62.5) and scores["xnli"]["de"]["accuracy"] == 50.0
    # xquad: EM 40, F1 46 (the SQuAD case above, q5 unanswered) -> avg_metric 43
    assert scores["xquad"]["en"] == {"exact_match": pytest.approx(40.0), "f1": pytest.approx(46.0)}
    assert scores["xquad"]["avg_metric"] == pytest.approx(43.0)
    assert "Unanswered question q5" in result.stderr
    # mlqa zh: EM 50, F1 75 -> avg_metric 62.5
    assert scores["mlqa"]["avg_exact_match"] == pytest.approx(50.0) and scores["mlqa"]["avg_metric"] == 62.5


def test_cli_score_listing(tmp_path):
    gold, pred = score_folders(tmp_path)
    result = run("eval_xtreme.py", "score", "--predictions", pred, "--labels", gold)
    assert result.returncode == 0, result.stderr
    assert "udpos: avg_metric 86.84" in result.stdout and "xnli: avg_metric 62.50" in result.stdout


def test_cli_score_bad_input(tmp_path):
    gold, pred = score_folders(tmp_path)
    assert_clean_error(run("eval_xtreme.py", "score", "--predictions", pred, "--labels", tmp_path / "nowhere"),
              tmp_path / "nowhere", "<task>/test-<lang>.tsv")
    (pred / "xnli/test-de.tsv").unlink()
    assert_clean_error(run("eval_xtreme.py", "score", "--predictions", pred, "--labels", gold), pred / "xnli/test-de.tsv")
    write_predictions(pred, "xnli", "de", ["neutral"])  # 1 line for 2 labels
    assert_clean_error(run("eval_xtreme.py", "score", "--predictions", pred, "--labels", gold), pred / "xnli/test-de.tsv",
              gold / "xnli/test-de.tsv")
    write_predictions(pred, "xnli", "de", ["neutral", "neutral"])
    write_bytes(pred / "udpos/test-de.tsv", "NOUN\nverb\n")  # a word, not a tag
    assert_clean_error(run("eval_xtreme.py", "score", "--predictions", pred, "--labels", gold), f"{pred / 'udpos/test-de.tsv'}:2:")
    write_predictions(pred, "udpos", "de", [["NOUN", "VERB"]])
    write_bytes(gold / "udpos/test-de.tsv", "")
    assert_clean_error(run("eval_xtreme.py", "score", "--predictions", pred, "--labels", gold), gold / "udpos/test-de.tsv", "no labels")
    write_predictions(gold, "udpos", "de", [["NOUN", "VERB"]])
    write_bytes(pred / "mlqa/test-zh.json", '{"a": "北京",\n "b": }')
    assert_clean_error(run("eval_xtreme.py", "score", "--predictions", pred, "--labels", gold), f"{pred / 'mlqa/test-zh.json'}:2:")
    write_json(gold / "mlqa/test-zh.json", squad([("a", [""])]))  # stripped test file: no gold
    write_predictions(pred, "mlqa", "zh", {"a": "北京"})
    assert_clean_error(run("eval_xtreme.py", "score", "--predictions", pred, "--labels", gold), gold / "mlqa/test-zh.json", "no gold")


# PAWS-X's official test languages, and how many of 4 predictions each gets right: accuracies 100, 75,
# 50, 25, 0, 100, 50, whose mean over the 7 is 400/7; "ru" (not a PAWS-X language) gets none right
PAWSX_RIGHT = {"de": 4, "en": 3, "es": 2, "fr": 1, "ja": 0, "ko": 4, "zh": 2, "ru": 0}


def pawsx_folders(tmp_path):
    gold, pred = tmp_path / "labels", tmp_path / "predictions"
    labels = ["1", "0", "1", "0"]
    for lang, right in PAWSX_RIGHT.items():
        write_predictions(gold, "pawsx", lang, labels)
        write_predictions(pred, "pawsx", lang, labels[:right] + [{"0": "1", "1": "0"}[y] for y in labels[right:]])
    return gold, pred


def test_score_averages_over_the_official_languages(tmp_path):
    assert TASKS["pawsx"]["langs"] == ["de", "en", "es", "fr", "ja", "ko", "zh"]
    gold, pred = pawsx_folders(tmp_path)
    result = run("eval_xtreme.py", "score", "--predictions", pred, "--labels", gold, "--json")
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)["pawsx"]
    # the mean over the official 7, by hand: (100 + 75 + 50 + 25 + 0 + 100 + 50) / 7; ru is shown, not averaged
    assert scores["avg_metric"] == pytest.approx(400 / 7) and scores["avg_accuracy"] == pytest.approx(400 / 7)
    assert scores["ru"] == {"accuracy": 0.0} and scores["not_averaged"] == ["ru"] and "partial" not in scores


def test_score_partial_set_shows_missing_and_no_average(tmp_path):
    gold, pred = pawsx_folders(tmp_path)
    (gold / "pawsx/test-ja.tsv").unlink()  # a partial download: no Japanese labels
    result = run("eval_xtreme.py", "score", "--predictions", pred, "--labels", gold, "--json")
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)["pawsx"]
    assert not any(k.startswith("avg_") for k in scores)  # no number that reads as XTREME's average
    partial = scores["partial"]
    assert partial["missing"] == {"ja": str(gold / "pawsx/test-ja.tsv")} and partial["of"] == 7
    assert partial["over"] == ["de", "en", "es", "fr", "ko", "zh"]
    assert partial["mean"]["avg_accuracy"] == pytest.approx(400 / 6)
    listing = run("eval_xtreme.py", "score", "--predictions", pred, "--labels", gold)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].startswith("pawsx: partial, mean over 6 of 7 languages: avg_metric 66.67")
    assert any(re.fullmatch(r"  ja +missing", line) for line in lines), lines
    (note,) = [line for line in lines if line.strip().startswith("missing ")]
    assert note.strip().startswith("missing ja (of XTREME's official test languages)")
    assert str(gold / "pawsx/test-ja.tsv") in note


def test_table_marks_a_partial_task_and_leaves_avg_out(tmp_path):
    full, part, data = tmp_path / "full", tmp_path / "part", tmp_path / "download"
    mean, std = {"avg_accuracy": 80.0, "avg_metric": 80.0}, {"avg_accuracy": 0.5, "avg_metric": 0.5}
    write_json(full / "pawsx/results.json", results("pawsx", "Dense", mean, std, data=data))
    langs = [lang for lang in TASKS["pawsx"]["langs"] if lang != "ko"]
    write_json(part / "pawsx/results.json", results("pawsx", "X-MoE", mean, std, langs=langs, data=data))
    table = build_table([full, part])
    assert table["rows"][0]["avg"] == pytest.approx(80.0) and table["rows"][0]["partial"] == {}
    assert table["rows"][1]["avg"] is None
    assert table["rows"][1]["partial"]["pawsx"]["missing"] == {"ko": str(data / "pawsx/test-ko.tsv")}
    result = run("eval_xtreme.py", "table", full, part)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    cells = [re.split(r"  +", line) for line in lines[1:3]]  # aligned columns: two spaces or more apart
    assert cells[0][0] == "Dense" and cells[0][-2:] == ["80.0 ± 0.5", "80.0"]
    assert cells[1][0] == "X-MoE" and cells[1][-2:] == ["80.0 ± 0.5 (partial 6/7)", "partial"]
    (note,) = [line for line in lines if line.startswith("X-MoE PAWS-X: partial")]
    assert "6 of 7 languages; missing ko" in note and str(data / "pawsx/test-ko.tsv") in note


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The synthetic world, written by its own writers with a few items per file (a fraction of a second)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(synthetic, "SIZES", {"train": 20, "dev": 4, "test": 6})
        mp.setattr(synthetic, "MLM_BYTES", dict.fromkeys(synthetic.LANGS, 2000))
        out = tmp_path_factory.mktemp("world")
        synthetic.make_synthetic(out, seed=0)
    return out


def test_synthetic_world_is_averaged_over_its_own_languages(world, tmp_path):
    own = sorted(synthetic.LANGS)
    for task in ("udpos", "panx", "pawsx", "xquad"):
        assert expected_languages(world, task) == (list(synthetic.LANGS), str(world / task / DECLARED))
    # chance: complete over the world's 7 languages, though only 3 of them are PAWS-X's
    chance = json.loads(run("eval_xtreme.py", "chance", "--data", world, "--task", "pawsx", "--json").stdout)
    assert "partial" not in chance["pawsx"] and "avg_metric" in chance["pawsx"]
    assert sorted(k for k in chance["pawsx"] if not k.startswith("avg_")) == own
    # score: gold as predictions, the world's languages with --data
    gold = tmp_path / "labels"
    for lang in synthetic.LANGS:
        examples = load_split(world, "udpos", "test", lang)
        write_labels(gold, "udpos", lang, examples)
    scored = run("eval_xtreme.py", "score", "--predictions", gold, "--labels", gold, "--data", world, "--json")
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["udpos"]["avg_metric"] == pytest.approx(100.0)
    # table: results fine-tuned on the world, with scores for its languages, are complete
    write_json(tmp_path / "run/udpos/results.json", results("udpos", "X-MoE", {"avg_f1": 50.0}, {"avg_f1": 1.0},
                                                            langs=own, data=world))
    row = build_table([tmp_path / "run"])["rows"][0]
    assert row["avg"] == pytest.approx(50.0) and row["partial"] == {}


def test_synthetic_world_without_its_declaration_is_partial(world, tmp_path):
    """The declared list is what makes the world complete: without it, XTREME's list applies, and the
    note says how to write the declaration."""
    old = shutil.copytree(world, tmp_path / "world")
    (old / "pawsx" / DECLARED).unlink()
    chance = json.loads(run("eval_xtreme.py", "chance", "--data", old, "--task", "pawsx", "--json").stdout)["pawsx"]
    assert sorted(chance["partial"]["missing"]) == ["fr", "ja", "ko", "zh"]
    assert chance["not_averaged"] == ["ar", "el", "hi", "ru"]
    assert f"python synthetic.py --out {old}" in chance["partial"]["languages_from"]
    listing = run("eval_xtreme.py", "chance", "--data", old, "--task", "pawsx")
    assert str(old / "pawsx/test-fr.tsv") in listing.stdout
    write_json(old / "pawsx" / DECLARED, {"languages": "en es"})
    assert_clean_error(run("eval_xtreme.py", "chance", "--data", old, "--task", "pawsx"), old / "pawsx" / DECLARED)


def results(task, name, mean, std, langs=None, data=None):
    """A results.json as finetune.py writes it; its seeds have scores for `langs` (default: every
    official test language of the task), and `data` is the folder it was fine-tuned on."""
    per_lang = {lang: {} for lang in (TASKS[task]["langs"] if langs is None else langs)}
    seed = {**mean, **per_lang}
    out = {"task": task, "seeds": {"1": seed, "2": dict(seed)}, "mean": mean, "std": std, "ic": None}
    out = {**out, "args": {"data": str(data)}} if data else out
    return {**out, "name": name} if name else out


def test_cli_table(tmp_path):
    a, b, c = tmp_path / "xmoe-run", tmp_path / "smoe-run", tmp_path / "pawsx-only"
    write_json(a / "udpos/results.json", results("udpos", "X-MoE", {"avg_f1": 70.8, "avg_metric": 70.8},
                                                   {"avg_f1": 0.3, "avg_metric": 0.3}))
    write_json(a / "xquad/results.json", results("xquad", "X-MoE", {"avg_f1": 72.4, "avg_exact_match": 56.2},
                                                   {"avg_f1": 0.5, "avg_exact_match": 0.4}))
    write_json(b / "udpos/results.json", results("udpos", None, {"avg_f1": 70.1}, {"avg_f1": 0.2}))
    write_json(b / "xquad/results.json", results("xquad", None, {"avg_f1": 71.3, "avg_exact_match": 55.2},
                                                   {"avg_f1": 0.1, "avg_exact_match": 0.6}))
    write_json(c / "results.json", results("pawsx", None, {"avg_accuracy": 85.2}, {"avg_accuracy": 0.1}))
    # Avg = mean of the task scores, QA as (F1 + EM)/2: X-MoE (70.8 + 64.3)/2 = 67.55, SMoE (70.1 + 63.25)/2
    table = build_table([a, b])
    assert [r["name"] for r in table["rows"]] == ["X-MoE", "smoe-run"] and table["avg_over"] == ["udpos", "xquad"]
    assert table["rows"][0]["avg"] == pytest.approx(67.55) and table["rows"][1]["avg"] == pytest.approx(66.675)
    result = run("eval_xtreme.py", "table", a, b)
    assert result.returncode == 0, result.stderr
    header, row_a, row_b = result.stdout.splitlines()[:3]
    assert header.split()[:4] == ["Model", "POS", "F1", "NER"] and "XQuAD F1 / EM" in header
    assert row_a.startswith("X-MoE") and "70.8 ± 0.3" in row_a and "72.4 ± 0.5 / 56.2 ± 0.4" in row_a
    assert row_b.startswith("smoe-run") and " - " in row_b  # no NER results: "-"
    result = run("eval_xtreme.py", "table", a, c, "--markdown")
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and all(line.startswith("| ") for line in lines[:4])
    assert lines[3].startswith("| pawsx-only |") and "85.2 ± 0.1" in lines[3] and lines[3].endswith("| - |")
    assert json.loads(run("eval_xtreme.py", "table", c, "--json").stdout)["rows"][0]["tasks"]["pawsx"] == {
        "avg_accuracy": {"mean": 85.2, "std": 0.1}}


def test_cli_table_bad_input(tmp_path):
    assert_clean_error(run("eval_xtreme.py", "table", tmp_path / "missing-run"), tmp_path / "missing-run" / "<task>" / "results.json")
    write_json(tmp_path / "run/xnli/results.json", {"task": "xnli", "mean": {"avg_f1": 1.0}, "std": {}})
    assert_clean_error(run("eval_xtreme.py", "table", tmp_path / "run"), tmp_path / "run/xnli/results.json", "avg_accuracy")
    write_bytes(tmp_path / "run/xnli/results.json", '{"task": "xnli",\n')
    assert_clean_error(run("eval_xtreme.py", "table", tmp_path / "run"), f"{tmp_path / 'run/xnli/results.json'}:2:")


# ------------------------------------------------------------------------------------------------
# Chance: what random predictions score


def test_chance_scores_by_hand(tmp_path):
    from eval_xtreme import chance_scores
    # tagging: every English training tag is NOUN, so every random tag is NOUN; against two one-word
    # sentences NOUN and VERB: chunks (NOUN 0), (NOUN 2) against (NOUN 0), (VERB 2), so P = R = F1 = 1/2
    write_bytes(tmp_path / "udpos/train-en.tsv", "a\tNOUN\nb\tNOUN\n")
    write_bytes(tmp_path / "udpos/test-de.tsv", "x\tNOUN\n\ny\tVERB\n")
    assert chance_scores(tmp_path, "udpos")["de"]["f1"] == pytest.approx(50.0)
    # pairs: the English majority label "0" against 0 1 1 1
    write_bytes(tmp_path / "pawsx/train-en.tsv", "a\tb\t0\nc\td\t0\ne\tf\t1\n")
    write_bytes(tmp_path / "pawsx/test-es.tsv", "a\tb\t0\na\tb\t1\na\tb\t1\na\tb\t1\n")
    assert chance_scores(tmp_path, "pawsx")["es"]["accuracy"] == pytest.approx(25.0)
    # QA: a one-word context leaves one span, the answer itself
    write_json(tmp_path / "squad/train-v1.1.json", squad([("t", ["bridge"])]))
    write_json(tmp_path / "xquad/xquad.el.json", squad([("q", ["Paris"])], context="Paris"))
    assert chance_scores(tmp_path, "xquad")["el"]["exact_match"] == pytest.approx(100.0)
