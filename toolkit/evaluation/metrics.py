"""Evaluation metrics for fine-tuning tasks, computed with the libraries directly (no ``evaluate``, no network).

Token classification (NER), on tag sequences in IOB2 (``O``, ``B-X``, ``I-X``), one list per sentence:

* **strict** precision/recall/F1 are entity-level micro scores from ``seqeval`` in strict mode with the IOB2
  scheme: a predicted entity is correct only if its span (first and last token) and its type equal those of a
  gold entity. In strict mode an ``I-X`` that does not continue an ``X`` entity starts no entity at all.
* **lenient** precision/recall/F1 count overlaps: a predicted entity is correct if it shares at least one token
  with a gold entity of the same type; precision = matched predicted / predicted, recall = matched gold / gold
  (a gold entity is matched if a same-type predicted entity overlaps it), F1 their harmonic mean. Entities come
  from :func:`entity_spans`, which follows conlleval: an ``I-X`` that does not continue an ``X`` entity starts a
  new one. A wrong-type overlap counts for neither scoring.
* ``token_accuracy`` is the fraction of tokens whose predicted tag equals the gold tag (``O`` included, so it is
  high even for a predictor that finds no entity).
* ``per_type`` holds the strict precision/recall/F1 and gold support of each entity type.

Every undefined ratio (no predictions, no gold entities) is 0. Sequence classification reports accuracy and
macro-F1 (the unweighted mean of per-class F1, so rare classes weigh as much as frequent ones); regression reports
Pearson and Spearman correlation (0 when an input is constant) and mean squared error. :func:`majority_baseline`
gives the scores of a trivial predictor, the floor a fine-tuned model has to beat. All returned values are plain
Python ``int``/``float``/``str``, so the dicts serialize to JSON as they are.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

from toolkit.data.tasks.tags import spans

TASKS = ("token_classification", "sequence_classification", "regression")


def _check_tag(tag: str, where: str) -> None:
    if tag == "O":
        return
    if not isinstance(tag, str) or len(tag) < 3 or tag[:2] not in ("B-", "I-"):
        raise ValueError(f"invalid IOB2 tag {tag!r} {where}: expected 'O', 'B-<type>' or 'I-<type>'")


def entity_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """The entities of one IOB2 tag sequence as ``(type, start, end)``, ``end`` exclusive, in order.

    ``B-X`` starts an entity of type ``X``; ``I-X`` continues it while the previous token is inside an ``X``
    entity, and otherwise (after ``O``, at the start, or after another type) starts a new one, as conlleval does.
    Raises ``ValueError`` on a tag that is not ``O``, ``B-<type>`` or ``I-<type>``.
    """
    for i, tag in enumerate(tags):
        _check_tag(tag, f"at token {i}")
    return spans(tags, "iob2")


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


def _f1(p: float, r: float) -> float:
    return 2.0 * p * r / (p + r) if p + r else 0.0


def _check_pairs(gold: Sequence, pred: Sequence, what: str) -> None:
    if len(gold) != len(pred):
        raise ValueError(f"gold and pred differ in the number of {what}: {len(gold)} vs {len(pred)}")


def _overlaps(a: tuple[str, int, int], b: tuple[str, int, int]) -> bool:
    return a[0] == b[0] and a[1] < b[2] and b[1] < a[2]


def ner_metrics(gold: list[list[str]], pred: list[list[str]]) -> dict[str, Any]:
    """Strict (seqeval) and lenient (overlap) entity scores, token accuracy and per-type strict scores.

    ``gold`` and ``pred`` are IOB2 tag sequences, one per sentence. Returns ``precision_strict``,
    ``recall_strict``, ``f1_strict``, ``precision_lenient``, ``recall_lenient``, ``f1_lenient``,
    ``token_accuracy``, ``per_type`` (``{type: {"precision", "recall", "f1", "support"}}``), ``num_sentences``,
    ``num_gold_entities`` and ``num_pred_entities`` (the last two count conlleval entities, as lenient scoring
    does). Raises ``ValueError`` if the sentence counts or a sentence's lengths differ, or on an invalid tag.
    """
    gold = [list(s) for s in gold]
    pred = [list(s) for s in pred]
    _check_pairs(gold, pred, "sentences")
    for i, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: gold has {len(g)} tags but pred has {len(p)}")
        for j, tag in enumerate(g):
            _check_tag(tag, f"in gold sentence {i}, token {j}")
        for j, tag in enumerate(p):
            _check_tag(tag, f"in pred sentence {i}, token {j}")

    n_tokens = n_correct = 0
    n_gold = n_pred = matched_gold = matched_pred = 0
    for g, p in zip(gold, pred):
        n_tokens += len(g)
        n_correct += sum(a == b for a, b in zip(g, p))
        g_spans, p_spans = entity_spans(g), entity_spans(p)
        n_gold += len(g_spans)
        n_pred += len(p_spans)
        matched_gold += sum(any(_overlaps(gs, ps) for ps in p_spans) for gs in g_spans)
        matched_pred += sum(any(_overlaps(ps, gs) for gs in g_spans) for ps in p_spans)

    p_len, r_len = _ratio(matched_pred, n_pred), _ratio(matched_gold, n_gold)
    out: dict[str, Any] = {}
    if gold:
        from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
        from seqeval.scheme import IOB2

        kw = dict(mode="strict", scheme=IOB2, zero_division=0)
        out["precision_strict"] = float(precision_score(gold, pred, **kw))
        out["recall_strict"] = float(recall_score(gold, pred, **kw))
        out["f1_strict"] = float(f1_score(gold, pred, **kw))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the dropped avg rows take means of empty slices
            report = classification_report(gold, pred, output_dict=True, **kw)
        per_type = {
            str(t): {"precision": float(row["precision"]), "recall": float(row["recall"]), "f1": float(row["f1-score"]),
                     "support": int(row["support"])}
            for t, row in report.items() if not t.endswith(" avg")
        }
    else:  # seqeval rejects an empty corpus; every score is undefined, hence 0
        out.update(precision_strict=0.0, recall_strict=0.0, f1_strict=0.0)
        per_type = {}
    out.update(
        precision_lenient=p_len,
        recall_lenient=r_len,
        f1_lenient=_f1(p_len, r_len),
        token_accuracy=_ratio(n_correct, n_tokens),
        per_type=per_type,
        num_sentences=len(gold),
        num_gold_entities=n_gold,
        num_pred_entities=n_pred,
    )
    return out


def _plain(x: Any) -> Any:
    """A numpy scalar as the Python value it holds; anything else unchanged."""
    return x.item() if hasattr(x, "item") and getattr(x, "ndim", None) == 0 else x


def classification_metrics(gold: Sequence, pred: Sequence, *, labels: list | None = None) -> dict[str, Any]:
    """``accuracy``, ``macro_f1`` (over ``labels``, by default every label seen in gold or pred) and
    ``num_examples``. Raises ``ValueError`` if the lengths differ or there are no examples."""
    from sklearn.metrics import accuracy_score, f1_score

    gold, pred = [_plain(x) for x in gold], [_plain(x) for x in pred]
    _check_pairs(gold, pred, "examples")
    if not gold:
        raise ValueError("classification_metrics needs at least one example")
    return {
        "accuracy": float(accuracy_score(gold, pred)),
        "macro_f1": float(f1_score(gold, pred, average="macro", labels=labels, zero_division=0)),
        "num_examples": len(gold),
    }


def _correlation(fn, gold: list[float], pred: list[float]) -> float:
    if min(gold) == max(gold) or min(pred) == max(pred):
        return 0.0  # undefined for a constant input (scipy would warn and return NaN)
    value = float(fn(gold, pred)[0])
    return 0.0 if math.isnan(value) else value


def regression_metrics(gold: Sequence[float], pred: Sequence[float]) -> dict[str, Any]:
    """``pearson``, ``spearman`` (0.0 where an input is constant), ``mse`` and ``num_examples``.

    Raises ``ValueError`` if the lengths differ, there are fewer than two examples, or a value is not finite.
    """
    from scipy.stats import pearsonr, spearmanr

    gold, pred = [float(x) for x in gold], [float(x) for x in pred]
    _check_pairs(gold, pred, "examples")
    if len(gold) < 2:
        raise ValueError(f"regression_metrics needs at least two examples, got {len(gold)}")
    if not all(math.isfinite(x) for x in gold + pred):
        raise ValueError("regression_metrics got a non-finite value (NaN or inf) in gold or pred")
    return {
        "pearson": _correlation(pearsonr, gold, pred),
        "spearman": _correlation(spearmanr, gold, pred),
        "mse": sum((g - p) ** 2 for g, p in zip(gold, pred)) / len(gold),
        "num_examples": len(gold),
    }


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")


def majority_prediction(gold_train: Sequence, task: str) -> Any:
    """The constant a trivial predictor outputs: the most frequent training tag (``token_classification``,
    over all tokens) or label (``sequence_classification``), ties going to the one seen first, or the training
    mean (``regression``). Raises ``ValueError`` on an unknown task or empty training data."""
    _check_task(task)
    if task == "token_classification":
        values = [tag for sentence in gold_train for tag in sentence]
    else:
        values = [_plain(x) for x in gold_train]
    if not values:
        raise ValueError(f"majority baseline for {task} needs non-empty training data")
    if task == "regression":
        return sum(float(x) for x in values) / len(values)
    return Counter(values).most_common(1)[0][0]


def majority_baseline(gold_train: Sequence, gold_eval: Sequence, task: str, *, labels: list | None = None) -> dict[str, Any]:
    """The metrics of a trivial predictor that outputs :func:`majority_prediction` of ``gold_train`` for every
    token or example of ``gold_eval``: the dict of :func:`ner_metrics`, :func:`classification_metrics` (with
    ``labels``, so macro-F1 averages over the same classes as the model's) or :func:`regression_metrics`."""
    constant = majority_prediction(gold_train, task)
    if task == "token_classification":
        return ner_metrics(gold_eval, [[constant] * len(sentence) for sentence in gold_eval])
    if task == "sequence_classification":
        return classification_metrics(gold_eval, [constant] * len(gold_eval), labels=labels)
    return regression_metrics(gold_eval, [constant] * len(gold_eval))


# ---------------------------------------------------------------------------- generation


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalization: lower case, no punctuation, no articles (a, an, the), single spaces."""
    import re
    import string

    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(reference: str, prediction: str) -> float:
    """SQuAD's token F1 between normalized answers (1.0 when both are empty)."""
    ref, pred = normalize_answer(reference).split(), normalize_answer(prediction).split()
    if not ref or not pred:
        return float(ref == pred)
    common = sum((Counter(ref) & Counter(pred)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def generation_metrics(references: Sequence[str], predictions: Sequence[str]) -> dict[str, Any]:
    """Generated text against references: ``exact_match`` (after :func:`normalize_answer`), mean
    ``token_f1`` and mean ROUGE-L F-measure (``rouge-score``, no stemming), over ``num_examples``."""
    from rouge_score import rouge_scorer

    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    n = len(references)
    if n == 0:
        return {"exact_match": 0.0, "token_f1": 0.0, "rouge_l": 0.0, "num_examples": 0}
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    em = sum(normalize_answer(r) == normalize_answer(p) for r, p in zip(references, predictions)) / n
    f1 = sum(token_f1(r, p) for r, p in zip(references, predictions)) / n
    rouge = sum(scorer.score(r, p)["rougeL"].fmeasure for r, p in zip(references, predictions)) / n
    return {"exact_match": em, "token_f1": f1, "rouge_l": rouge, "num_examples": n}
