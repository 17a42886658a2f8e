"""Supervised fine-tuning data for decoders (``task.type: sft``): jsonl examples, the chat template,
and the loss mask.

Two record shapes, told apart per line:

* ``{"prompt": ..., "completion": ...}`` — the input is ``prompt + completion + EOS``; the loss is on
  the completion and the EOS token;
* ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`` — rendered with a
  chat template (the tokenizer's own, or :data:`DEFAULT_CHAT_TEMPLATE`) exactly as
  ``transformers``' ``tokenizer.apply_chat_template`` renders it (a sandboxed Jinja2 environment with
  ``trim_blocks`` and ``lstrip_blocks``); the loss is on every assistant turn, its end-of-turn text
  included, and on nothing else.

The rendered conversation is tokenized whole (the ids ``apply_chat_template(..., tokenize=True)``
gives), and a token is trained when it starts inside an assistant turn's characters, found by
rendering the conversation up to that turn with and without it. That needs a template whose renders
of a conversation's beginnings are prefixes of the whole; one that is not is a one-line error.

Too long: a sample longer than ``max_length + 1`` tokens loses tokens from its **start** (the oldest
prompt text) so the answer survives; a sample whose trained tokens alone do not fit, or that would
keep no trained token, is dropped and counted — never trained with every label masked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from toolkit.data.tasks.formats import json_lines
from toolkit.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant")

#: the template megaforge renders conversations with when the tokenizer has none, and writes into
#: an exported tokenizer_config.json (``chat_template``), so ``apply_chat_template`` reproduces it
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass
class SftExample:
    """One training record: a conversation (``messages``), or a ``prompt`` and ``completion`` kept as
    raw text (no template; see :func:`encode_sft`)."""

    messages: list[dict] = field(default_factory=list)
    where: str = ""
    prompt: str | None = None  # prompt/completion records keep their raw text
    completion: str | None = None


def read_sft(path: str | Path) -> list[SftExample]:
    """The SFT examples of a jsonl file (one record per line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; check task.train_file / valid_file / test_file")
    examples = [parse_sft_record(obj, where) for where, obj in json_lines(path)]
    if not examples:
        raise DataError(f"{path} holds no examples; check the file (an empty split cannot train or evaluate)")
    return examples


def chat_template(cfg, tokenizer) -> str:
    """The run's chat template: ``task.chat_template`` (a file, or the template text), else the
    ``chat_template`` of the tokenizer's ``tokenizer_config.json``, else :data:`DEFAULT_CHAT_TEMPLATE`."""
    given = cfg.task.chat_template
    if given:
        path = Path(given)
        return path.read_text(encoding="utf-8") if "{" not in given and path.is_file() else given
    where = Path(tokenizer.path) if getattr(tokenizer, "path", None) else None
    config = (where if where.is_dir() else where.parent) / "tokenizer_config.json" if where is not None else None
    if config is not None and config.is_file():
        found = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(found, list):  # [{"name": "default", "template": ...}, ...]
            found = next((t.get("template") for t in found if t.get("name") == "default"), None)
        if isinstance(found, str) and found:
            return found
    return DEFAULT_CHAT_TEMPLATE


def check_messages(messages, where: str) -> list[dict]:
    """A conversation: a non-empty list of ``{role, content}`` with known roles (just those two keys
    kept), or a one-line DataError naming ``where``."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] needs a string 'content'")
        if m.get("role") not in ROLES:
            raise DataError(f"{where}: messages[{i}] has role {m.get('role')!r}; roles are {', '.join(ROLES)}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def parse_sft_record(obj: dict, where: str) -> SftExample:
    """A jsonl record → :class:`SftExample`, or a one-line DataError naming ``where``."""
    if "messages" in obj:
        messages = check_messages(obj["messages"], where)
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: the conversation has no assistant turn, so nothing to train on")
        return SftExample(messages, where)
    if "prompt" in obj and "completion" in obj:
        if not isinstance(obj["prompt"], str) or not isinstance(obj["completion"], str):
            raise DataError(f"{where}: 'prompt' and 'completion' must be strings")
        if not obj["completion"]:
            raise DataError(f"{where}: empty 'completion', nothing to train on")
        return SftExample(where=where, prompt=obj["prompt"], completion=obj["completion"])
    raise DataError(f"{where}: an SFT record needs 'prompt' + 'completion' or 'messages' (has {sorted(obj)})")


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = False, eos_token: str = "",
                bos_token: str = "") -> str:
    """``messages`` rendered with the Jinja2 chat ``template`` as ``transformers`` renders it."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                eos_token=eos_token, bos_token=bos_token)
    except TemplateError as e:
        raise ConfigError(f"the chat template does not render: {' '.join(str(e).split())}") from None
    except (ArithmeticError, LookupError, TypeError, ValueError) as e:  # the sandbox's range limit, 1/0, ...
        raise ConfigError(f"the chat template does not render: {type(e).__name__}: {' '.join(str(e).split())}") \
            from None


def end_token_id(tokenizer) -> int | None:
    """The token that ends an answer: the tokenizer's eos, else its eod. SFT trains it; generation stops at it."""
    return tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.eod_id


def template_tokens(tokenizer) -> dict[str, str]:
    """The special-token strings a chat template sees: ``eos_token`` (:func:`end_token_id`) and ``bos_token``."""
    def name(idx: int | None) -> str:
        return tokenizer.id_to_token(idx) if idx is not None else ""

    return {"eos_token": name(end_token_id(tokenizer)), "bos_token": name(tokenizer.bos_id)}


def chat_prompt(template: str, messages: list[dict], tokenizer) -> str:
    """``messages`` rendered with ``template`` and its generation prompt: the text a model answers."""
    return render_chat(template, messages, add_generation_prompt=True, **template_tokens(tokenizer))


def assistant_spans(template: str, messages: list[dict], tokenizer, *, where: str) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, the character spans of its assistant turns)."""
    kw = template_tokens(tokenizer)
    text = render_chat(template, messages, **kw)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_chat(template, messages[:i], add_generation_prompt=True, **kw)
        through = render_chat(template, messages[: i + 1], **kw)
        if not (text.startswith(before) and text.startswith(through) and through.startswith(before)):
            raise ConfigError(f"{where}: the chat template renders the conversation's first turns differently from "
                              "the whole, so assistant turns cannot be located; use a template whose renders extend "
                              "each other (as DEFAULT_CHAT_TEMPLATE's do)")
        spans.append((len(before), len(through)))
    return text, spans


def encode_sft(example: SftExample, tokenizer, template: str | None) -> tuple[list[int], list[bool]]:
    """(token ids, trained flag per token) of one example, before any truncation."""
    eos = end_token_id(tokenizer)
    if eos is None:
        raise ConfigError("SFT needs a tokenizer with an end-of-sequence token (eos or eod), the token that "
                          "teaches the model to stop")
    if example.prompt is not None:
        prompt, completion = tokenizer.encode(example.prompt), tokenizer.encode(example.completion)
        return prompt + completion + [eos], [False] * len(prompt) + [True] * (len(completion) + 1)
    encode_offsets = getattr(tokenizer, "encode_with_offsets", None)
    if encode_offsets is None:
        raise ConfigError(f"chat-format SFT ({example.where}) needs a tokenizer with character offsets (a Hugging "
                          "Face tokenizer.json); prompt/completion records work with any tokenizer")
    text, spans = assistant_spans(template or DEFAULT_CHAT_TEMPLATE, example.messages, tokenizer, where=example.where)
    ids, offsets = encode_offsets(text)
    trained = [any(s <= start < e for s, e in spans) for start, _ in offsets]
    return ids, trained


def fit(ids: list[int], trained: list[bool], length: int) -> tuple[list[int], list[bool]] | None:
    """Cut ``ids`` to ``length`` tokens from the start, keeping every trained token; None when the
    trained tokens do not fit or none would be left in a position that is predicted."""
    if len(ids) > length:
        first = trained.index(True) if True in trained else len(trained)
        cut = len(ids) - length
        if cut > max(first - 1, 0):  # the first trained token must keep a token before it to be predicted from
            return None
        ids, trained = ids[cut:], trained[cut:]
    return (ids, trained) if any(trained[1:]) else None


@dataclass
class SftEncoded:
    """Encoded SFT examples, one row per example or, packed, several per row: tokens [n, length + 1]
    (inputs ``[:-1]``, targets ``[1:]``), the loss mask over the targets [n, length], and for packed
    rows each token's sample id and position within its sample [n, length + 1] (segments: 0 is
    padding, samples count from 1). ``dropped`` counts examples that could not fit."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    dropped: int
    examples: list[SftExample]
    segments: np.ndarray | None = None
    positions: np.ndarray | None = None


def encode_sft_examples(examples: list[SftExample], tokenizer, *, seq_length: int, template: str | None = None,
                        packing: bool = False) -> SftEncoded:
    """Encode, fit and lay out ``examples`` in rows of ``seq_length + 1`` tokens: one per row, or with
    ``packing`` as many consecutive samples per row as fit (a new row when the next does not)."""
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    width = seq_length + 1
    samples, kept, dropped = [], [], 0
    for ex in examples:
        fitted = fit(*encode_sft(ex, tokenizer, template), width)
        if fitted is None:
            dropped += 1
            continue
        samples.append(fitted)
        kept.append(ex)
    if not samples:
        raise DataError(f"no SFT example fits model.seq_length={seq_length} ({dropped} dropped); raise "
                        "model.seq_length or shorten the prompts")
    rows: list[list[tuple[list[int], list[bool]]]] = []
    for sample in samples:
        if packing and rows and sum(len(ids) for ids, _ in rows[-1]) + len(sample[0]) <= width:
            rows[-1].append(sample)
        else:
            rows.append([sample])
    tokens = np.full((len(rows), width), pad, dtype=np.int64)
    mask = np.zeros((len(rows), seq_length), dtype=bool)
    segments = np.zeros((len(rows), width), dtype=np.int64)
    positions = np.zeros((len(rows), width), dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for k, (ids, trained) in enumerate(row, start=1):
            n = len(ids)
            tokens[r, at:at + n] = ids
            mask[r, at:at + n - 1] = trained[1:]  # target j is token j + 1 of the same sample; never the next sample's first
            segments[r, at:at + n] = k
            positions[r, at:at + n] = np.arange(n)
            at += n
    if not packing:
        return SftEncoded(tokens, mask, dropped, kept)
    return SftEncoded(tokens, mask, dropped, kept, segments=segments, positions=positions)


class SftDataset(torch.utils.data.Dataset):
    """Rows ``{"tokens": [length + 1], "loss_mask": [length]}`` (packed rows add ``segments`` and
    ``positions`` [length + 1]) for the masked causal-LM objective."""

    def __init__(self, encoded: SftEncoded):
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.encoded.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        e = self.encoded
        row = {"tokens": torch.from_numpy(e.tokens[i]), "loss_mask": torch.from_numpy(e.loss_mask[i])}
        if e.segments is not None:
            row["segments"], row["positions"] = torch.from_numpy(e.segments[i]), torch.from_numpy(e.positions[i])
        return row


def generation_prompt(example: SftExample, tokenizer, template: str | None) -> tuple[str, str]:
    """(the text a model continues, the reference answer) for generation-based evaluation: the prompt
    and completion, or the conversation up to its last assistant turn (rendered with the generation
    prompt) and that turn's content."""
    if example.prompt is not None:
        return example.prompt, example.completion
    last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
    return chat_prompt(template or DEFAULT_CHAT_TEMPLATE, example.messages[:last], tokenizer), example.messages[last]["content"]
