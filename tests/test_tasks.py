"""Task metrics against hand-computed values, sklearn, sacrebleu and rouge-score; edge cases and errors."""

from __future__ import annotations

import json

import pytest

from slmforge.errors import SlmforgeError
from slmforge.evaluate.tasks import (
    binary_metrics,
    classification_metrics,
    evaluate_predictions,
    keyphrase_metrics,
    log_parsing_metrics,
    match_label,
    normalize_answer,
    qa_metrics,
    split_keyphrases,
    stem_phrase,
    summarization_metrics,
    translation_metrics,
)


def test_classification_by_hand_and_against_sklearn():
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    y_true = ["a", "a", "b", "b", "c"]
    y_pred = ["a", "b", "b", "b", "a"]
    m = classification_metrics(y_true, y_pred)
    assert m["labels"] == ["a", "b", "c"] and m["n"] == 5 and m["invalid"] == 0
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["accuracy"] == pytest.approx(60.0)
    assert m["per_class"]["a"] == pytest.approx({"precision": 50.0, "recall": 50.0, "f1": 50.0, "support": 2})
    assert m["per_class"]["b"] == pytest.approx({"precision": 200 / 3, "recall": 100.0, "f1": 80.0,
                                                 "support": 2})
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["macro_f1"] == pytest.approx(130 / 3)
    # the same figures as sklearn
    assert m["accuracy"] == pytest.approx(100 * accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(100 * f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert m["confusion"] == confusion_matrix(y_true, y_pred).tolist()
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, zero_division=0)
    for i, lab in enumerate("abc"):
        assert m["per_class"][lab]["f1"] == pytest.approx(100 * f[i])
        assert m["per_class"][lab]["precision"] == pytest.approx(100 * p[i])


def test_classification_given_labels_counts_invalid_predictions():
    m = classification_metrics(["yes", "no", "maybe", "yes"], ["yes", "I think so", "maybe", "no"],
                               labels=["yes", "no", "maybe"])
    assert m["invalid"] == 1 and m["accuracy"] == 50.0
    assert m["confusion"] == [[1, 1, 0], [0, 0, 0], [0, 0, 1]]  # the invalid one is in no cell
    assert m["per_class"]["no"]["recall"] == 0.0 and m["per_class"]["no"]["support"] == 1
    assert m["macro_f1"] == pytest.approx((200 / 3 + 0 + 100) / 3)
    with pytest.raises(SlmforgeError, match=r"reference labels \['other'\]"):
        classification_metrics(["other"], ["yes"], labels=["yes", "no"])
    with pytest.raises(SlmforgeError, match="2 predictions but 1 references"):
        classification_metrics(["a"], ["a", "b"])
    with pytest.raises(SlmforgeError, match="no examples"):
        classification_metrics([], [])


def test_binary_positive_class():
    t = ["anomalous", "anomalous", "normal", "normal", "anomalous"]
    p = ["anomalous", "normal", "anomalous", "normal", "anomalous"]
    m = binary_metrics(t, p)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 1, 1, 1)
    assert m["precision"] == pytest.approx(200 / 3) and m["recall"] == pytest.approx(200 / 3)
    assert m["f1"] == pytest.approx(200 / 3) and m["accuracy"] == pytest.approx(60.0)
    none = binary_metrics(t, ["normal"] * 5)  # nothing flagged: precision 0 by convention, not a crash
    assert none["precision"] == 0.0 and none["recall"] == 0.0 and none["f1"] == 0.0
    assert binary_metrics([1, 0, 1], [1, 1, 1], positive=1)["precision"] == pytest.approx(200 / 3)


def test_translation_matches_sacrebleu():
    import sacrebleu

    hyps = ["The cat sat on the mat.", "A dog runs in the park", ""]
    refs = ["The cat sat on the mat.", "The dog is running in the park.", "Nothing here."]
    m = translation_metrics(hyps, refs)
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert m["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert m["n"] == 3 and "13a" in m["bleu_signature"] and m["bleu_bp"] <= 1.0
    assert translation_metrics(refs[:2], refs[:2])["bleu"] == pytest.approx(100.0)
    assert translation_metrics(refs[:2], refs[:2])["chrf"] == pytest.approx(100.0)
    # several references per sentence, not the same number for each
    multi = translation_metrics(hyps[:2], [[refs[0]], [refs[1], "A dog runs in the park."]])
    assert multi["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu(hyps[:2], [[refs[0], refs[1]], [None, "A dog runs in the park."]]).score)
    assert multi["bleu"] > m["bleu"]
    with pytest.raises(SlmforgeError, match="no examples"):
        translation_metrics([], [])


def test_summarization_matches_rouge_score():
    from rouge_score import rouge_scorer

    m = summarization_metrics(["the cat sat"], ["the cat ran"])
    assert m["rouge1"] == pytest.approx(200 / 3) and m["rouge2"] == pytest.approx(50.0)
    assert m["rougeL"] == pytest.approx(200 / 3)
    assert summarization_metrics(["cats running"], ["cat run"])["rouge1"] == pytest.approx(100.0)  # stemmed
    preds = ["#Person2# has trouble breathing and sees a doctor.", ""]
    refs = ["#Person2# has trouble breathing. The doctor sends #Person2# to a specialist.", "They talk."]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    want = [scorer.score(r, p) for p, r in zip(preds, refs, strict=True)]
    m = summarization_metrics(preds, refs)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert m[key] == pytest.approx(100 * sum(w[key].fmeasure for w in want) / 2)


def test_qa_squad_normalisation_em_and_f1():
    assert normalize_answer("The  Cat's, hat!") == "cats hat"
    assert normalize_answer("an apple a day") == "apple day"
    m = qa_metrics(["the big cat", "Paris.", "", ""], ["a cat", ["London", "paris"], "something", ""])
    # EM: 0, 1, 0, 1 (an empty answer matches only an empty gold); F1: 2/3, 1, 0, 1
    assert m["exact_match"] == pytest.approx(50.0)
    assert m["f1"] == pytest.approx(100 * (2 / 3 + 1 + 0 + 1) / 4)
    assert qa_metrics(["x"], [[]])["f1"] == 0.0  # no gold answer at all: treated as the empty answer


def test_keyphrase_stemmed_matching_by_hand():
    assert stem_phrase("Neural Networks") == stem_phrase("neural network") == "neural network"
    assert stem_phrase("Image-Coding") == stem_phrase("image coding")
    gold = [["neural networks", "image coding", "wavelet"], [], ["a b"]]
    preds = [["neural network", "Image-Coding", "compression", "neural networks", "wavelets", "x"],
             ["anything"], []]
    m = keyphrase_metrics(preds, gold)
    assert m["n"] == 2 and m["no_gold"] == 1  # the document with no gold keyphrase is left out
    # document 1, deduplicated ranking: neural network, imag code, compress, wavelet, x -> 3 hits
    # @5: P 3/5, R 3/3; @10: P 3/10; @M: P 3/5. Document 3: no predictions -> all 0.
    assert m["macro_p@5"] == pytest.approx(30.0) and m["macro_r@5"] == pytest.approx(50.0)
    assert m["macro_f1@5"] == pytest.approx(37.5)
    assert m["macro_f1@10"] == pytest.approx((2 * 30 * 100 / 130) / 2)
    assert m["micro_p@5"] == pytest.approx(30.0) and m["micro_r@5"] == pytest.approx(75.0)
    assert m["micro_f1@5"] == pytest.approx(2 * 30 * 75 / 105)
    assert m["micro_p@M"] == pytest.approx(60.0) and m["macro_p@M"] == pytest.approx(30.0)
    perfect = keyphrase_metrics([["b", "a"]], [["a", "b"]], ks=(2,))
    assert perfect["micro_f1@2"] == 100.0 and perfect["macro_f1@M"] == 100.0
    empty = keyphrase_metrics([[]], [[]])
    assert empty["n"] == 0 and empty["macro_f1@5"] == 0.0 and empty["micro_f1@5"] == 0.0


def test_split_keyphrases_and_match_label():
    assert split_keyphrases(" a b; c ;; d ") == ["a b", "c", "d"]
    assert split_keyphrases("a, b\n") == ["a", "b"]
    assert split_keyphrases("a\nb, c") == ["a", "b, c"]
    assert split_keyphrases("") == []
    labels = ["yes", "no", "maybe"]
    assert match_label(" No, because", labels) == "no"
    assert match_label("Positive.", ["negative", "positive"]) == "positive"
    assert match_label("nothing", labels) == "nothing"  # "no" followed by a letter is another word
    assert match_label("not sure", ["no", "not sure"]) == "not sure"


def test_log_parsing_grouping_accuracy():
    m = log_parsing_metrics(["A", "A", "B", "C"], ["X", "X", "Y", "Y"])
    assert m["grouping_accuracy"] == 50.0 and m["template_agreement"] == 0.0
    assert m["predicted_templates"] == 3 and m["gold_templates"] == 2
    assert log_parsing_metrics(["A", "B"], ["A", "B"])["template_agreement"] == 100.0


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_evaluate_predictions_from_files(tmp_path):
    refs = _jsonl(tmp_path / "test.jsonl", [{"id": "a", "text": "good", "label": "positive"},
                                            {"id": "b", "text": "bad", "label": "negative"},
                                            {"id": "c", "text": "meh", "label": "negative"}])
    preds = _jsonl(tmp_path / "pred.jsonl", [{"id": "c", "prediction": " Positive."},
                                             {"id": "a", "prediction": "positive"},
                                             {"id": "b", "prediction": "negative!"}])
    m = evaluate_predictions("classification", preds, refs)
    assert m["task"] == "classification" and m["accuracy"] == pytest.approx(200 / 3) and m["invalid"] == 0
    # no ids: by position; references in the prediction rows themselves
    rows = [{"prediction": "The cat sat.", "completion": " The cat sat."}]
    assert evaluate_predictions("translation", rows)["bleu"] == pytest.approx(100.0)
    kp = [{"prediction": "neural networks; wavelet", "keyphrases": ["neural network", "image coding"]}]
    assert evaluate_predictions("keyphrase", kp)["macro_p@M"] == 50.0
    qa = [{"prediction": "Paris", "completion": "paris"}]
    assert evaluate_predictions("extraction", qa)["exact_match"] == 100
    anomaly = [{"prediction": "anomalous", "label": "anomalous"},
               {"prediction": "normal", "label": "anomalous"}]
    assert evaluate_predictions("anomaly", anomaly)["recall"] == 50.0
    summ = [{"prediction": "the cat sat", "completion": "the cat ran"}]
    assert evaluate_predictions("summarization", summ)["rouge1"] == pytest.approx(200 / 3)


def test_evaluate_predictions_errors(tmp_path):
    refs = _jsonl(tmp_path / "test.jsonl", [{"id": 1, "label": "x"}, {"id": 2, "label": "y"}])
    with pytest.raises(SlmforgeError, match="unknown task 'poetry'"):
        evaluate_predictions("poetry", [])
    with pytest.raises(SlmforgeError, match="pred.jsonl: ids not in .*test.jsonl: 3"):
        evaluate_predictions("classification",
                             _jsonl(tmp_path / "pred.jsonl", [{"id": 3, "prediction": "x"}]), refs)
    with pytest.raises(SlmforgeError, match="1 predictions for 2 references"):
        evaluate_predictions("classification",
                             _jsonl(tmp_path / "pred.jsonl", [{"id": 1, "prediction": "x"}]), refs)
    with pytest.raises(SlmforgeError, match=r"pred.jsonl:2: no field 'prediction'"):
        evaluate_predictions("classification", _jsonl(tmp_path / "pred.jsonl", [
            {"id": 1, "prediction": "x"}, {"id": 2, "output": "y"}]), refs)
    with pytest.raises(SlmforgeError, match="2 predictions but 1 references .* no ids"):
        evaluate_predictions("translation", [{"prediction": "a"}, {"prediction": "b"}], [{"completion": "a"}])
    with pytest.raises(SlmforgeError, match=r"predictions:1: field 'prediction' is not a string"):
        evaluate_predictions("translation", [{"prediction": ["a"], "completion": "a"}])
    with pytest.raises(SlmforgeError, match="no predictions"):
        evaluate_predictions("translation", _jsonl(tmp_path / "empty.jsonl", []))
    with pytest.raises(SlmforgeError, match="missing.jsonl: no such file"):
        evaluate_predictions("translation", tmp_path / "missing.jsonl")


def test_binary_and_invalid_labels_against_sklearn():
    from sklearn.metrics import precision_recall_fscore_support

    t = ["anomalous", "normal", "anomalous", "normal", "anomalous", "normal"]
    p = ["anomalous", "anomalous", "normal", "normal", "anomalous", "???"]
    m = binary_metrics(t, p)
    ps, rs, fs, _ = precision_recall_fscore_support([x == "anomalous" for x in t], [x == "anomalous" for x in p],
                                                    average="binary", zero_division=0)
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((100 * ps, 100 * rs, 100 * fs))
    # a prediction outside the label set: wrong for its example, in no cell, counted as invalid
    m = classification_metrics(["a", "b", "b"], ["a", "zzz", "b"], labels=["a", "b"])
    assert m["invalid"] == 1 and m["confusion"] == [[1, 0], [0, 1]]
    assert m["per_class"]["b"] == pytest.approx({"precision": 100.0, "recall": 50.0, "f1": 200 / 3, "support": 2})
