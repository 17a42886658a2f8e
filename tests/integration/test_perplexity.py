"""Perplexity of decoder runs (`megaforge evaluate RUN --perplexity --data FILE|PREFIX --stride N`): the
sliding-window loss equals transformers' on the exported model and the same tokens, a jsonl file and
its indexed dataset agree, and an SFT run gives both its generation scores and a perplexity."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import cli_main
from tests.conversion.conftest import GPT2_STYLE, LLAMA_STYLE, make_run, transformers
from toolkit.config import TaskConfig, load_config, save_config
from toolkit.convert import export_hf
from toolkit.training.perplexity import read_token_stream, windows

pytestmark = [pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
              pytest.mark.usefixtures("one_thread")]
DOCS = ["The patient is a 64-year-old man admitted with chest pain radiating to the left arm.",
        "Medications on discharge: aspirin, metoprolol and atorvastatin, to be continued at home.",
        "Blood pressure was 142/88 on arrival and fell to 120/75 after treatment; the troponin stayed normal.",
        "Follow up in the cardiology clinic in two weeks, sooner if the pain comes back or breathing gets harder."]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return root / "docs.jsonl"


def hf_perplexity(hf, ids: list[int], length: int, stride: int) -> tuple[float, int]:
    """Hugging Face's perplexity guide: windows of ``length`` tokens ``stride`` apart, targets already
    scored masked with -100, ``loss`` (mean over the scored targets) weighted by their count."""
    enc = torch.tensor([ids])
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + length, len(ids))
        inputs = enc[:, begin:end]
        labels = inputs.clone()
        labels[:, : -(end - prev_end)] = -100
        n = int((labels[:, 1:] != -100).sum())  # transformers shifts: the first label is never scored
        with torch.no_grad():
            nll += float(hf(inputs, labels=labels).loss) * n
        count += n
        prev_end = end
        if end == len(ids):
            break
    return nll / count, count


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_perplexity_matches_transformers(style, corpus, tmp_path):
    run, _ = make_run(tmp_path / "run", {"gpt2": GPT2_STYLE, "llama": LLAMA_STYLE}[style])
    from toolkit.checkpoint import load_megaforge_model

    tok = load_megaforge_model(run)[2]
    ids = read_token_stream(corpus, tok).tolist()
    assert len(ids) > 80 and ids.count(tok.eod_id) == len(DOCS)  # every document ends with the end-of-document token
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(run, tmp_path / "hf"), dtype=torch.float32).eval()
    for stride in (32, 12):  # model.seq_length 32: disjoint windows, then overlapping ones
        out = cli_main("evaluate", str(run), "--data", str(corpus), "--stride", str(stride), "--device", "cpu")
        assert out.returncode == 0, out.stderr
        ours = json.loads((run / "eval_perplexity.json").read_text())
        theirs, count = hf_perplexity(hf, ids, 32, stride)
        skipped = 0 if stride < 32 else ours["num_windows"] - 1  # disjoint windows: their first tokens have no context
        assert ours["num_tokens"] == count == len(ids) - 1 - skipped  # every other token after the first, once
        assert ours["loss"] == pytest.approx(theirs, abs=1e-5)
        assert ours["ppl"] == pytest.approx(torch.tensor(theirs).exp().item(), rel=1e-4)
    # the same documents as an indexed dataset (megatron format), and as a text file (one document)
    from toolkit.data.preprocess import preprocess

    preprocess(corpus, tmp_path / "idx" / "docs", tok, progress=False, output_format="megatron")
    out = cli_main("evaluate", str(run), "--perplexity", "--data", str(tmp_path / "idx" / "docs"), "--stride", "12")
    assert out.returncode == 0, out.stderr
    assert json.loads((run / "eval_perplexity.json").read_text())["loss"] == pytest.approx(ours["loss"], abs=1e-6)
    (tmp_path / "one.txt").write_text(DOCS[0])
    assert read_token_stream(tmp_path / "one.txt", tok).tolist() == tok.encode(DOCS[0]) + [tok.eod_id]


def test_windows_score_every_token_once():
    for n, length, stride in [(100, 32, 31), (100, 32, 12), (100, 32, 1), (33, 32, 8), (5, 32, 8), (2, 32, 32)]:
        scored = [t for _, end, first in windows(n, length, stride) for t in range(first, end)]
        assert scored == list(range(1, n)), (n, length, stride)
        assert all(end - begin <= length and (first - begin >= length - stride or begin == 0)
                   for begin, end, first in windows(n, length, stride))
    scored = [t for _, end, first in windows(100, 32, 32) for t in range(first, end)]  # disjoint: starts unscored
    assert scored == [t for t in range(1, 100) if t % 32]


def test_sft_run_evaluates_generation_and_perplexity(tmp_path, corpus):
    run, _ = make_run(tmp_path / "sft", GPT2_STYLE)
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps(x) + "\n" for x in [
        {"prompt": "Medications:", "completion": " aspirin"},
        {"messages": [{"role": "user", "content": "Drugs?"}, {"role": "assistant", "content": "metoprolol"}]}]))
    cfg = load_config(str(run / "config.yaml"))
    cfg.task = TaskConfig(type="sft", test_file=str(test))
    save_config(cfg, run / "config.yaml")
    out = cli_main("evaluate", str(run), "--split", "test", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    scores = json.loads((run / "eval_test.json").read_text())
    assert scores["num_examples"] == 2 and {"exact_match", "token_f1", "rouge_l", "loss"} <= scores.keys()
    out = cli_main("evaluate", str(run), "--perplexity", "--data", str(corpus))
    assert out.returncode == 0 and json.loads((run / "eval_perplexity.json").read_text())["num_tokens"] > 80
    # bad input: one line, exit 2
    for args, message in [(["--perplexity"], "perplexity needs --data"),
                          (["--perplexity", "--data", str(tmp_path / "nothing")], "not a .jsonl or .txt file"),
                          (["--perplexity", "--data", str(corpus), "--stride", "40"], "--stride must be between 1")]:
        out = cli_main("evaluate", str(run), *args)
        assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_encoder_runs_are_refused_in_one_line(tmp_path):
    from tests.conversion.conftest import BERT_STYLE

    run, _ = make_run(tmp_path / "bert", BERT_STYLE)
    for args in (["evaluate", str(run), "--data", "x.jsonl"],
                 ["predict", str(run), "--input", "x.jsonl", "--output", str(tmp_path / "o.jsonl")]):
        out = cli_main(*args)
        assert out.returncode == 2 and "is a bert pretraining run; generation and perplexity need a decoder" in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
