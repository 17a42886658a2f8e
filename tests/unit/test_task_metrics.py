"""toolkit.evaluation.metrics against hand-computed values on small fixtures."""

import json
import math
import warnings

import numpy as np
import pytest

from toolkit.evaluation.metrics import (
    classification_metrics,
    entity_spans,
    majority_baseline,
    majority_prediction,
    ner_metrics,
    regression_metrics,
)

approx = pytest.approx

# Three sentences, 15 tokens. Entities (type, start, end-exclusive):
#   S1 gold PER(0,2) LOC(3,5)     pred PER(0,2) exact; LOC(3,4) wrong right boundary
#   S2 gold ORG(1,4)              pred PER(1,3) overlaps the ORG but has the wrong type
#   S3 gold LOC(0,1) PER(3,4)     pred PER(3,4) exact; the LOC is missed
NER_GOLD = [
    ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O"],
    ["O", "B-ORG", "I-ORG", "I-ORG", "O"],
    ["B-LOC", "O", "O", "B-PER"],
]
NER_PRED = [
    ["B-PER", "I-PER", "O", "B-LOC", "O", "O"],
    ["O", "B-PER", "I-PER", "O", "O"],
    ["O", "O", "O", "B-PER"],
]


def _plain_types(obj):
    """True if every leaf is a plain Python int/float/str (not a numpy scalar)."""
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain_types(v) for k, v in obj.items())
    return type(obj) in (int, float, str)


# --- entity_spans ----------------------------------------------------------------------------------------------


def test_entity_spans_iob2():
    assert entity_spans(NER_GOLD[0]) == [("PER", 0, 2), ("LOC", 3, 5)]
    assert entity_spans(NER_GOLD[1]) == [("ORG", 1, 4)]
    assert entity_spans(["O", "O"]) == []
    assert entity_spans([]) == []
    # B- right after an entity of the same type starts a new one; an entity may run to the end
    assert entity_spans(["B-PER", "B-PER", "I-PER"]) == [("PER", 0, 1), ("PER", 1, 3)]
    # types may contain hyphens: only the first one separates the prefix
    assert entity_spans(["B-DRUG-NAME", "I-DRUG-NAME"]) == [("DRUG-NAME", 0, 2)]


def test_entity_spans_stray_inside_tags_start_entities_like_conlleval():
    # I-PER at the start starts PER; B-PER starts a new PER; I-LOC after a PER starts LOC; I-LOC after O starts LOC
    tags = ["I-PER", "I-PER", "B-PER", "I-LOC", "O", "I-LOC"]
    assert entity_spans(tags) == [("PER", 0, 2), ("PER", 2, 3), ("LOC", 3, 4), ("LOC", 5, 6)]


@pytest.mark.parametrize("bad", ["E-PER", "B-", "PER", "b-PER", ""])
def test_entity_spans_rejects_invalid_tags(bad):
    with pytest.raises(ValueError, match="invalid IOB2 tag"):
        entity_spans(["O", bad])


# --- ner_metrics -----------------------------------------------------------------------------------------------


def test_ner_strict_and_lenient_differ():
    m = ner_metrics(NER_GOLD, NER_PRED)
    # gold entities: PER S1, LOC S1, ORG S2, LOC S3, PER S3 = 5
    # pred entities: PER S1, LOC(3,4) S1, PER S2, PER S3     = 4
    assert m["num_sentences"] == 3 and m["num_gold_entities"] == 5 and m["num_pred_entities"] == 4
    # strict: exact span and type -> PER S1, PER S3 = 2 correct
    #   P = 2/4 = 0.5, R = 2/5 = 0.4, F1 = 2*0.5*0.4 / 0.9 = 4/9
    assert m["precision_strict"] == approx(0.5)
    assert m["recall_strict"] == approx(0.4)
    assert m["f1_strict"] == approx(4 / 9)
    # lenient: the short LOC now counts, the wrong-type PER over the ORG still does not
    #   matched pred = PER S1, LOC S1, PER S3 = 3 -> P = 3/4 = 0.75
    #   matched gold = PER S1, LOC S1, PER S3 = 3 -> R = 3/5 = 0.6 (ORG S2 and LOC S3 unmatched)
    #   F1 = 2*0.75*0.6 / 1.35 = 0.9/1.35 = 2/3
    assert m["precision_lenient"] == approx(0.75)
    assert m["recall_lenient"] == approx(0.6)
    assert m["f1_lenient"] == approx(2 / 3)
    # tokens: S1 5/6 (I-LOC vs O at 4), S2 2/5 (tokens 1-3 wrong), S3 3/4 (token 0 wrong) -> 10/15
    assert m["token_accuracy"] == approx(10 / 15)


def test_ner_per_type_strict():
    per_type = ner_metrics(NER_GOLD, NER_PRED)["per_type"]
    assert set(per_type) == {"PER", "LOC", "ORG"}  # avg rows dropped
    # PER: gold S1,S3 (2); pred S1,S2,S3 (3); exact S1,S3 (2) -> P = 2/3, R = 2/2 = 1, F1 = 2*(2/3)*1/(5/3) = 0.8
    assert per_type["PER"] == {"precision": approx(2 / 3), "recall": approx(1.0), "f1": approx(0.8), "support": 2}
    # LOC: gold S1,S3 (2); pred S1 with the wrong boundary (1); exact 0 -> all 0
    assert per_type["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    # ORG: gold 1, never predicted -> all 0 (zero_division=0)
    assert per_type["ORG"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_ner_returns_exact_keys_and_plain_json_values():
    m = ner_metrics(NER_GOLD, NER_PRED)
    assert set(m) == {
        "precision_strict", "recall_strict", "f1_strict",
        "precision_lenient", "recall_lenient", "f1_lenient",
        "token_accuracy", "per_type", "num_sentences", "num_gold_entities", "num_pred_entities",
    }
    assert _plain_types(m)
    assert json.loads(json.dumps(m)) == m


def test_ner_inside_tag_without_begin():
    gold = [["O", "I-PER", "I-PER", "O"]]
    pred = [["O", "B-PER", "I-PER", "O"]]
    m = ner_metrics(gold, pred)
    # strict IOB2 (seqeval): a gold span opened by I- is no entity -> 0 gold, 1 pred, 0 correct -> P = R = F1 = 0
    assert m["precision_strict"] == 0.0 and m["recall_strict"] == 0.0 and m["f1_strict"] == 0.0
    assert m["per_type"]["PER"]["support"] == 0
    # lenient (conlleval spans): gold PER(1,3) overlaps pred PER(1,3) -> 1/1 each
    assert m["precision_lenient"] == approx(1.0) and m["recall_lenient"] == approx(1.0) and m["f1_lenient"] == approx(1.0)
    assert m["num_gold_entities"] == 1 and m["num_pred_entities"] == 1
    # token 1: I-PER vs B-PER -> 3/4
    assert m["token_accuracy"] == approx(0.75)


def test_ner_perfect_and_empty_predictions():
    m = ner_metrics(NER_GOLD, NER_GOLD)
    for key in ("precision_strict", "recall_strict", "f1_strict", "precision_lenient", "recall_lenient", "f1_lenient",
                "token_accuracy"):
        assert m[key] == approx(1.0), key
    # predicting only O: no entities, so precision is 0/0 -> 0, recall 0/5 = 0; 6 of 15 gold tags are O
    m = ner_metrics(NER_GOLD, [["O"] * len(s) for s in NER_GOLD])
    assert m["num_pred_entities"] == 0
    assert m["precision_strict"] == 0.0 and m["f1_lenient"] == 0.0
    assert m["token_accuracy"] == approx(6 / 15)


def test_ner_empty_corpus_is_all_zero():
    m = ner_metrics([], [])
    assert m["num_sentences"] == 0 and m["f1_strict"] == 0.0 and m["token_accuracy"] == 0.0 and m["per_type"] == {}


def test_ner_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="number of sentences"):
        ner_metrics(NER_GOLD, NER_PRED[:2])
    with pytest.raises(ValueError, match="sentence 1"):
        ner_metrics(NER_GOLD, [NER_PRED[0], NER_PRED[1][:-1], NER_PRED[2]])
    with pytest.raises(ValueError, match="invalid IOB2 tag"):
        ner_metrics([["O", "S-PER"]], [["O", "O"]])


# --- classification_metrics ------------------------------------------------------------------------------------

# unbalanced: 6 a, 2 b, 2 c
CLS_GOLD = ["a", "a", "a", "a", "a", "a", "b", "b", "c", "c"]
CLS_PRED = ["a", "a", "a", "a", "a", "a", "a", "b", "c", "a"]


def test_classification_macro_f1_differs_from_accuracy():
    m = classification_metrics(CLS_GOLD, CLS_PRED)
    # correct: 6 a + 1 b + 1 c = 8 of 10
    assert m["accuracy"] == approx(0.8)
    # a: TP 6, predicted 8, gold 6 -> P 6/8, R 1,   F1 = 2*0.75/1.75 = 6/7
    # b: TP 1, predicted 1, gold 2 -> P 1,   R 1/2, F1 = 2*0.5/1.5  = 2/3
    # c: TP 1, predicted 1, gold 2 -> P 1,   R 1/2, F1 = 2/3
    # macro = (6/7 + 2/3 + 2/3) / 3 = 46/63
    assert m["macro_f1"] == approx(46 / 63)
    assert m["num_examples"] == 10
    assert _plain_types(m)


def test_classification_labels_argument():
    # an extra label never seen counts as F1 0: (6/7 + 2/3 + 2/3 + 0) / 4 = 46/84
    assert classification_metrics(CLS_GOLD, CLS_PRED, labels=["a", "b", "c", "d"])["macro_f1"] == approx(46 / 84)
    # a subset averages only those: (2/3 + 2/3) / 2
    assert classification_metrics(CLS_GOLD, CLS_PRED, labels=["b", "c"])["macro_f1"] == approx(2 / 3)


def test_classification_numpy_labels_give_plain_values():
    m = classification_metrics(np.array([0, 1, 1]), np.array([0, 1, 0]))
    # accuracy 2/3; class 0: P 1/2 R 1 F1 2/3; class 1: P 1 R 1/2 F1 2/3 -> macro 2/3
    assert m == {"accuracy": approx(2 / 3), "macro_f1": approx(2 / 3), "num_examples": 3}
    assert _plain_types(m)


def test_classification_errors():
    with pytest.raises(ValueError, match="number of examples"):
        classification_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one"):
        classification_metrics([], [])


# --- regression_metrics ----------------------------------------------------------------------------------------


def test_regression_perfectly_linear():
    # pred = 2*gold + 1 -> Pearson 1, Spearman 1; errors 2,3,4,5 -> mse = (4+9+16+25)/4 = 13.5
    m = regression_metrics([1, 2, 3, 4], [3, 5, 7, 9])
    assert m == {"pearson": approx(1.0), "spearman": approx(1.0), "mse": approx(13.5), "num_examples": 4}
    assert _plain_types(m)


def test_regression_reversed_order():
    # errors 3,1,1,3 -> mse = (9+1+1+9)/4 = 5; exact reversal is also perfectly (negatively) linear
    m = regression_metrics([1, 2, 3, 4], [4, 3, 2, 1])
    assert m["spearman"] == approx(-1.0) and m["pearson"] == approx(-1.0) and m["mse"] == approx(5.0)


def test_regression_known_values():
    # gold 1,2,3 -> deviations -1,0,1; pred 1,3,2 -> deviations -1,1,0
    # Pearson = sum(dx*dy) / sqrt(sum dx^2 * sum dy^2) = 1 / sqrt(2*2) = 0.5; ranks equal the values -> Spearman 0.5
    # mse = (0 + 1 + 1) / 3
    m = regression_metrics([1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert m["pearson"] == approx(0.5) and m["spearman"] == approx(0.5) and m["mse"] == approx(2 / 3)
    # monotonic but not linear: Spearman 1; Pearson = 25 / sqrt(5 * 129)
    # (dx = -1.5,-.5,.5,1.5; dy = -6.5,-3.5,1.5,8.5; sum dxdy = 25, sum dx^2 = 5, sum dy^2 = 129)
    m = regression_metrics([1, 2, 3, 4], [1, 4, 9, 16])
    assert m["spearman"] == approx(1.0) and m["pearson"] == approx(25 / math.sqrt(645))


def test_regression_constant_input_is_zero_not_nan():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConstantInputWarning either
        m = regression_metrics([1, 2, 3, 4], [2, 2, 2, 2])
        assert m["pearson"] == 0.0 and m["spearman"] == 0.0
        # errors -1,0,1,2 -> (1+0+1+4)/4 = 1.5
        assert m["mse"] == approx(1.5)
        m = regression_metrics([5, 5, 5], [1, 2, 3])
        assert m["pearson"] == 0.0 and m["spearman"] == 0.0


def test_regression_errors():
    with pytest.raises(ValueError, match="number of examples"):
        regression_metrics([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least two"):
        regression_metrics([1], [1])
    with pytest.raises(ValueError, match="non-finite"):
        regression_metrics([1, 2, float("nan")], [1, 2, 3])


# --- majority_baseline -----------------------------------------------------------------------------------------


def test_majority_prediction():
    train = [["O", "O", "B-PER"], ["O", "B-LOC", "I-LOC"]]  # O 3, others 1 each
    assert majority_prediction(train, "token_classification") == "O"
    assert majority_prediction(["x", "y", "y", "z"], "sequence_classification") == "y"
    assert majority_prediction(["p", "q", "q", "p"], "sequence_classification") == "p"  # tie: first seen
    assert majority_prediction([1, 2, 3, 6], "regression") == approx(3.0)  # mean 12/4


def test_majority_baseline_token_classification():
    train = [["O", "O", "B-PER"], ["O", "B-LOC", "I-LOC"]]  # majority tag O
    m = majority_baseline(train, NER_GOLD, "token_classification")
    # all-O prediction: no entities -> every entity score 0; gold O tags: S1 2, S2 2, S3 2 -> 6/15
    assert m["token_accuracy"] == approx(0.4)
    assert m["f1_strict"] == 0.0 and m["f1_lenient"] == 0.0 and m["recall_strict"] == 0.0
    assert m["num_gold_entities"] == 5 and m["num_pred_entities"] == 0
    assert {t: row["support"] for t, row in m["per_type"].items()} == {"PER": 2, "LOC": 2, "ORG": 1}
    assert set(m) == set(ner_metrics(NER_GOLD, NER_PRED))  # same keys as a model's scores


def test_majority_baseline_sequence_classification():
    # majority y; eval gold y,x,y,z -> pred y,y,y,y: accuracy 2/4
    # y: P 2/4, R 1, F1 2/3; x and z: F1 0 -> macro (2/3)/3 = 2/9
    m = majority_baseline(["x", "y", "y", "z"], ["y", "x", "y", "z"], "sequence_classification")
    assert m == {"accuracy": approx(0.5), "macro_f1": approx(2 / 9), "num_examples": 4}
    # with an explicit label set including an unseen w: (2/3)/4 = 1/6
    m = majority_baseline(["x", "y", "y", "z"], ["y", "x", "y", "z"], "sequence_classification", labels=["w", "x", "y", "z"])
    assert m["macro_f1"] == approx(1 / 6)


def test_majority_baseline_regression():
    # train mean (1+2+3+6)/4 = 3 -> pred 3,3 for gold 2,4: mse (1+1)/2 = 1; constant pred -> correlations 0
    m = majority_baseline([1, 2, 3, 6], [2, 4], "regression")
    assert m == {"pearson": 0.0, "spearman": 0.0, "mse": approx(1.0), "num_examples": 2}


def test_majority_baseline_errors():
    with pytest.raises(ValueError, match="unknown task"):
        majority_baseline(["a"], ["a"], "summarization")
    with pytest.raises(ValueError, match="non-empty"):
        majority_baseline([], ["a"], "sequence_classification")
    with pytest.raises(ValueError, match="non-empty"):
        majority_baseline([[], []], [["O"]], "token_classification")


# --- generation metrics (SFT evaluate) -------------------------------------------------------------------------


def test_generation_metrics_on_hand_computed_values():
    from toolkit.evaluation.metrics import generation_metrics, normalize_answer, token_f1

    assert normalize_answer("The  Amlodipine, Metformin.") == "amlodipine metformin"
    assert token_f1("amlodipine metformin", "amlodipine aspirin") == pytest.approx(0.5)  # P = R = 1/2
    assert token_f1("x y z", "z y x w") == pytest.approx(2 * (3 / 4) * 1 / (3 / 4 + 1))  # P 3/4, R 1
    assert token_f1("a b c", "c b a d") == pytest.approx(0.8)  # articles drop: "b c" vs "c b d", P 2/3, R 1
    scores = generation_metrics(["Amlodipine, Metformin", "x y z w", "blue"],
                                ["amlodipine metformin", "x z w v", "red"])
    assert scores["exact_match"] == pytest.approx(1 / 3)
    # token F1: 1, 3/4 (x z w shared: P = R = 3/4), 0 → mean 7/12
    assert scores["token_f1"] == pytest.approx((1 + 0.75 + 0) / 3)
    # ROUGE-L F: 1 ("amlodipine metformin" both ways), LCS "x z w" = 3 of 4 → 0.75, 0
    assert scores["rouge_l"] == pytest.approx((1 + 0.75 + 0) / 3)
    assert scores["num_examples"] == 3
