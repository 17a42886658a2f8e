"""SFT data: the loss mask token by token on hand-built examples, chat-template parity with
transformers, truncation that keeps the answer, and one-line errors."""

from __future__ import annotations

import json

import pytest

from toolkit.data.tasks.sft import (
    DEFAULT_CHAT_TEMPLATE,
    encode_sft,
    encode_sft_examples,
    parse_sft_record,
    read_sft,
)
from toolkit.errors import ConfigError, DataError
from toolkit.tokenization import load_tokenizer

TOK = load_tokenizer("english-bpe")
EOS = TOK.eos_id
CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                     {"role": "assistant", "content": "Goodbye."}]}
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_prompt_completion_mask_token_by_token():
    ex = parse_sft_record({"prompt": "Q: sky? A:", "completion": " blue"}, "t:1")
    prompt, completion = TOK.encode("Q: sky? A:"), TOK.encode(" blue")
    ids, trained = encode_sft(ex, TOK, None)
    assert ids == prompt + completion + [EOS]
    assert trained == [False] * len(prompt) + [True] * (len(completion) + 1)
    enc = encode_sft_examples([ex], TOK, seq_length=16)
    mask = enc.loss_mask[0].tolist()  # target j is token j + 1
    n = len(prompt)
    assert mask[n - 2] is False and mask[n - 1] is True  # the first answer token is predicted from the prompt's last
    assert mask[n - 1 + len(completion)] is True and enc.tokens[0][n + len(completion)] == EOS  # the end token is trained
    assert sum(mask) == len(completion) + 1 and enc.tokens.shape == (1, 17)


def test_every_assistant_turn_and_only_those_are_trained():
    ids, trained = encode_sft(parse_sft_record(CHAT, "t:1"), TOK, None)
    assert TOK.decode([i for i, t in zip(ids, trained) if t]) == "Hello!Goodbye."
    assert [i for i, t in zip(ids, trained) if t].count(EOS) == 2  # each turn's end token
    assert TOK.decode([i for i, t in zip(ids, trained) if not t]).count("Hi there") == 1


@pytest.mark.parametrize("template", [DEFAULT_CHAT_TEMPLATE, CHATML])
def test_chat_template_matches_transformers_apply_chat_template(template):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=TOK.backend, eos_token=TOK.id_to_token(EOS))
    hf.chat_template = template
    theirs = hf.apply_chat_template(CHAT["messages"], tokenize=True)
    theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
    ids, trained = encode_sft(parse_sft_record(CHAT, "t:1"), TOK, template)
    assert ids == list(theirs)
    if template == CHATML:  # the assistant turn's own end-of-turn text is trained
        assert TOK.decode([i for i, t in zip(ids, trained) if t]) == "Hello!<|im_end|>\nGoodbye.<|im_end|>\n"


def test_long_prompt_is_cut_from_its_start_and_the_answer_survives():
    long_prompt = " ".join(["word"] * 40) + " A:"
    ex = parse_sft_record({"prompt": long_prompt, "completion": " yes"}, "t:1")
    enc = encode_sft_examples([ex], TOK, seq_length=12)
    assert enc.dropped == 0
    row = enc.tokens[0].tolist()
    assert row[-2:] == TOK.encode(" yes")[-1:] + [EOS] and TOK.decode(row).endswith("A: yes")
    assert enc.loss_mask[0].sum() == len(TOK.encode(" yes")) + 1


def test_answer_that_cannot_fit_is_dropped_and_counted_never_all_masked():
    too_long = parse_sft_record({"prompt": "Q:", "completion": " " + " ".join(["no"] * 40)}, "t:1")
    fine = parse_sft_record({"prompt": "Q:", "completion": " ok"}, "t:2")
    enc = encode_sft_examples([too_long, fine], TOK, seq_length=12)
    assert enc.dropped == 1 and len(enc.tokens) == 1 and enc.loss_mask.any(axis=1).all()
    with pytest.raises(DataError, match="no SFT example fits model.seq_length=4"):
        encode_sft_examples([too_long], TOK, seq_length=4)


@pytest.mark.parametrize("record,needle", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "role 'bot'; roles are system, user, assistant"),
    ({"messages": [{"role": "user"}]}, "needs a string 'content'"),
    ({"text": "hi"}, r"needs 'prompt' \+ 'completion' or 'messages'"),
    ({"prompt": "hi", "completion": ""}, "empty 'completion'"),
])
def test_bad_records_are_one_line_naming_file_and_line(tmp_path, record, needle):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=needle) as e:
        read_sft(path)
    assert f"{path}:2" in str(e.value) and "\n" not in str(e.value)


def test_template_that_does_not_render_is_one_line():
    bad = "{% for m in messages %}{{ raise_exception('only user turns') }}{% endfor %}"
    with pytest.raises(ConfigError, match="the chat template does not render: only user turns"):
        encode_sft(parse_sft_record(CHAT, "t:1"), TOK, bad)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_packed_and_unpacked_batches_give_the_same_per_token_losses(style):
    """Several samples in one row, attention confined to each and positions restarting per sample,
    give every trained token the loss it has alone in its own row."""
    import torch

    from toolkit.config import ModelConfig
    from toolkit.models.gpt import GPTModel
    from toolkit.models.gpt.objective import masked_causal_lm

    extra = dict(position_embedding_type="rope", normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
                 num_query_groups=2, share_embeddings_and_output_weights=False) if style == "llama" else {}
    cfg = ModelConfig(family="gpt", num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=40,
                      max_position_embeddings=64, vocab_size=TOK.vocab_size, hidden_dropout=0.0, attention_dropout=0.0,
                      **extra)
    model = GPTModel(cfg)
    model.init_weights(0)
    records = [{"prompt": "Q: sky?", "completion": " blue"}, CHAT, {"prompt": "Name a fruit:", "completion": " apple"},
               {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}]
    examples = [parse_sft_record(r, f"t:{i}") for i, r in enumerate(records)]
    alone = encode_sft_examples(examples, TOK, seq_length=40)
    packed = encode_sft_examples(examples, TOK, seq_length=40, packing=True)
    assert len(packed.tokens) < len(alone.tokens) and packed.segments.max() >= 2  # some row holds several samples

    def per_token(enc):  # the trained targets' losses, row-major: samples in order either way
        tokens = torch.from_numpy(enc.tokens)
        extra = {} if enc.segments is None else {"positions": torch.from_numpy(enc.positions)[:, :-1],
                                                 "segments": torch.from_numpy(enc.segments)[:, :-1]}
        with torch.no_grad():
            logits = model(tokens[:, :-1], **extra).float()
        losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        return losses[torch.from_numpy(enc.loss_mask).flatten()]

    a, b = per_token(alone), per_token(packed)
    assert a.shape == b.shape and a.numel() == int(alone.loss_mask.sum())
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    # the objective the trainer calls agrees with the token mean
    batch = {"tokens": torch.from_numpy(packed.tokens), "loss_mask": torch.from_numpy(packed.loss_mask),
             "positions": torch.from_numpy(packed.positions), "segments": torch.from_numpy(packed.segments)}
    with torch.no_grad():
        torch.testing.assert_close(masked_causal_lm(model, batch), a.mean(), rtol=1e-5, atol=1e-6)
