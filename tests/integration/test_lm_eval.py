"""megaforge's model for EleutherAI's lm-evaluation-harness, offline on a local 10-question
multiple-choice task (tests/integration/lm_eval_task/): the log-likelihoods lm-eval records are the
model's own, its accuracy is the hand-computed argmax, and `megaforge lm-eval` reports the same."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import cli_main
from tests.conversion.conftest import GPT2_STYLE, make_run

lm_eval = pytest.importorskip("lm_eval")
pytestmark = [pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.usefixtures("one_thread")]
TASK = Path(__file__).parent / "lm_eval_task"


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network: datasets reads the local json through its packaged builder, into a private cache."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    folder = tmp_path / "tasks"
    folder.mkdir()
    shutil.copy(TASK / "tiny_mc.jsonl", folder / "tiny_mc.jsonl")
    yaml = (TASK / "tiny_mc.yaml").read_text().replace("DATA_FILE", str(folder / "tiny_mc.jsonl"))
    (folder / "tiny_mc.yaml").write_text(yaml)
    return folder


@torch.no_grad()
def direct_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context) from the model's logits: the continuation's tokens are those of
    context + continuation after the context's (as lm-eval splits them)."""
    ctx, whole = tok.encode(context), tok.encode(context + continuation)
    logprobs = model(torch.tensor([whole[:-1]]))[0].float().log_softmax(-1)  # [len - 1, V]
    return sum(float(logprobs[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def test_lm_eval_scores_a_local_task_with_the_models_own_loglikelihoods(tmp_path, offline):
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    from toolkit.training.generative import generate_texts
    from toolkit.training.lm_eval_adapter import MegaforgeLM

    run, model = make_run(tmp_path / "run", GPT2_STYLE)
    lm = MegaforgeLM(run, batch_size=3)
    out = lm_eval.simple_evaluate(model=lm, tasks=["megaforge_tiny_mc"], bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=str(offline), include_defaults=False))
    docs = [json.loads(line) for line in (TASK / "tiny_mc.jsonl").read_text().splitlines()]
    samples = sorted(out["samples"]["megaforge_tiny_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(docs) == 10
    correct = 0
    for doc, sample in zip(docs, samples):
        ours = [direct_loglikelihood(model, lm.tokenizer, doc["question"], " " + c) for c in doc["choices"]]
        theirs = [float(r[0]) for r in sample["filtered_resps"]]
        assert theirs == pytest.approx(ours, abs=1e-4)
        correct += max(range(4), key=lambda i: ours[i]) == doc["answer"]
    assert out["results"]["megaforge_tiny_mc"]["acc,none"] == pytest.approx(correct / 10)
    # rolling log-likelihood (a text shorter than the model: one window after the end-of-document token)
    # and generation (greedy, cut at the first stop string)
    text = "Chest pain radiating to the left arm."
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = [lm.eot_token_id, *lm.tokenizer.encode(text)]
    with torch.no_grad():
        logprobs = model(torch.tensor([ids[:-1]]))[0].log_softmax(-1)  # [len - 1, V]
    assert rolling == pytest.approx(sum(float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))), abs=1e-4)
    full = generate_texts(model, lm.tokenizer, ["The patient", "Aspirin"], max_new_tokens=8)
    stop = full[0][3:6]
    gens = lm.generate_until([Instance("generate_until", {}, (p, {"until": [stop], "max_gen_toks": 8}), i)
                              for i, p in enumerate(["The patient", "Aspirin"])])
    assert gens == [g[: g.index(stop)] if stop in g else g for g in full]
    # the command: the same accuracy
    res = cli_main("lm-eval", str(run), "--tasks", "megaforge_tiny_mc", "--include-path", str(offline),
                   "--device", "cpu")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["megaforge_tiny_mc"]["acc,none"] == pytest.approx(correct / 10)
