"""Batched generation for decoder runs: `megaforge predict` over a jsonl of prompts and conversations
(left-padded batches with a KV cache = one prompt at a time = transformers' greedy generate on the
exported model), and `megaforge chat` over turns read from stdin (the history kept)."""

from __future__ import annotations

import io
import json

import pytest
import torch

from tests.conftest import cli_main
from tests.conversion.conftest import GPT2_STYLE, LLAMA_STYLE, make_run, transformers
from toolkit.convert import export_hf
from toolkit.data.tasks.sft import DEFAULT_CHAT_TEMPLATE, chat_prompt, end_token_id
from toolkit.training.generative import encode_prompt, generate_batch, generate_texts

pytestmark = [pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
              pytest.mark.usefixtures("one_thread")]
STYLES = {"gpt2": GPT2_STYLE, "llama": LLAMA_STYLE}  # learned absolute positions; RoPE with grouped-query attention
PROMPTS = ["The patient", "Blood pressure was stable and the", "Discharged home on", "A",
           "History of present illness: a 64-year-old man with chest pain radiating to the left arm, sweating and"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, style in STYLES.items():
        root = tmp_path_factory.mktemp(name)
        out[name] = (*make_run(root / "run", style), root)
    return out


@pytest.mark.parametrize("style", sorted(STYLES))
def test_batched_equals_one_at_a_time_and_transformers(runs, style):
    folder, model, root = runs[style]
    from toolkit.checkpoint import load_megaforge_model

    _, _, tok = load_megaforge_model(folder)
    limit = model.cfg.max_position_embeddings  # 64
    ids = [encode_prompt(tok, p, limit) for p in PROMPTS]
    ids.append(list(range(100, 160)))  # 60 tokens: only 4 positions left, a row that stops before the others
    assert len({len(x) for x in ids}) == len(ids)  # every row padded differently
    batched = generate_batch(model, ids, max_new_tokens=12, eos_id=None)
    alone = [generate_batch(model, [x], max_new_tokens=12, eos_id=None)[0] for x in ids]
    assert batched == alone
    assert [len(x) for x in batched] == [12] * len(PROMPTS) + [4]
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(folder, root / "hf"), dtype=torch.float32).eval()
    for x, ours in zip(ids, batched):
        theirs = hf.generate(torch.tensor([x]), attention_mask=torch.ones(1, len(x), dtype=torch.long),
                             max_new_tokens=len(ours), do_sample=False, eos_token_id=None, pad_token_id=0)
        assert theirs[0, len(x):].tolist() == ours
    # a row stops at the end token, the others go on; text-level batching sorts and restores the order
    stop = batched[1][2]
    stopped = generate_batch(model, ids[:3], max_new_tokens=12, eos_id=stop)
    assert stopped == [cut(x, stop) for x in batched[:3]] and len(stopped[1]) <= 2
    texts = generate_texts(model, tok, PROMPTS, batch_size=2, max_new_tokens=6)
    assert texts == generate_texts(model, tok, PROMPTS, batch_size=1, max_new_tokens=6)
    assert texts == [tok.decode(cut(x[:6], end_token_id(tok))) for x in batched[: len(PROMPTS)]]


def cut(ids: list[int], stop: int) -> list[int]:
    """``ids`` up to (without) the first ``stop``."""
    return ids[: ids.index(stop)] if stop in ids else ids


def test_predict_writes_each_line_back_with_its_completion(runs, tmp_path):
    folder, model, _ = runs["llama"]
    from toolkit.checkpoint import load_megaforge_model

    _, _, tok = load_megaforge_model(folder)
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "List the drugs."}]
    lines = [{"id": i, "prompt": p, "meta": {"k": [i]}} for i, p in enumerate(PROMPTS)]
    lines.insert(2, {"id": "chat", "messages": convo})
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = cli_main("predict", str(folder), "--input", str(src), "--output", str(tmp_path / "out.jsonl"),
                   "--batch-size", "3", "--max-new-tokens", "5", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    got = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in g.items() if k != "completion"} for g in got] == lines  # every field kept, in order
    texts = [x.get("prompt") or chat_prompt(DEFAULT_CHAT_TEMPLATE, convo, tok) for x in lines]
    assert [g["completion"] for g in got] == generate_texts(model, tok, texts, batch_size=1, max_new_tokens=5)
    # bad lines: one line, exit 2, nothing written
    for bad, message in [({"text": "no prompt"}, "needs a string 'prompt' or a 'messages' list"),
                         ({"messages": [{"role": "robot", "content": "x"}]}, "has role 'robot'")]:
        src.write_text(json.dumps(lines[0]) + "\n" + json.dumps(bad) + "\n")
        out = cli_main("predict", str(folder), "--input", str(src), "--output", str(tmp_path / "bad.jsonl"))
        assert out.returncode == 2 and f"{src}:2: " in out.stderr and message in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad.jsonl").exists()


def test_chat_keeps_the_conversation_across_turns(runs, monkeypatch):
    folder, model, _ = runs["llama"]
    from toolkit.checkpoint import load_megaforge_model
    from toolkit.training import generative

    _, _, tok = load_megaforge_model(folder)
    turns = ["What did the patient take?", "And the dose?"]
    system = {"role": "system", "content": "Answer briefly."}

    def reply(messages):
        return generate_texts(model, tok, [chat_prompt(DEFAULT_CHAT_TEMPLATE, messages, tok)], max_new_tokens=6)[0]

    first = reply([system, {"role": "user", "content": turns[0]}])
    history = [system, {"role": "user", "content": turns[0]}, {"role": "assistant", "content": first},
               {"role": "user", "content": turns[1]}]
    second = reply(history)
    seen = []  # the prompt ids of each reply

    def spy(model, prompts, **kw):
        seen.extend(prompts)
        return generate_batch(model, prompts, **kw)

    monkeypatch.setattr(generative, "generate_batch", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO(turns[0] + "\n\n" + turns[1] + "\n"))  # a blank line is skipped
    out = cli_main("chat", str(folder), "--system", system["content"], "--max-new-tokens", "6", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert out.stdout == first + "\n" + second + "\n"
    # the second reply answers the whole conversation (its end: it is longer than the model's 64 positions)
    assert len(seen) == 2 and seen[1] == encode_prompt(tok, chat_prompt(DEFAULT_CHAT_TEMPLATE, history, tok), 64)
    assert first + "<|user|>\nAnd the dose?" in tok.decode(seen[1])  # (decode drops the end token between)
