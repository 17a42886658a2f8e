"""Generation for decoder runs (GPT/Llama; pretraining or ``task.type: sft``): batched prediction over a
jsonl of prompts (``megaforge predict``) and multi-turn chat (``megaforge chat``).

Batches are **left-padded**: each row's prompt ends at the same column, so every row's next token is
read from the last column. An explicit attention mask keeps the padding out (a query sees the
earlier real tokens of its own row; a padding query sees only itself, so nothing becomes NaN), and
positions count from each row's first real token, so learned-absolute and RoPE models see exactly
what they see for the prompt alone. The KV cache holds the padded prompt and each new token; a row
stops at the end token (:func:`toolkit.data.tasks.sft.end_token_id`, what SFT trains and
pretraining puts between documents) or at the model's last position, and the batch stops when every
row has. Greedy batched output equals one-prompt-at-a-time output (tested); with sampling, rows draw
from one generator in batch order.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from toolkit.checkpoint.native import BEST, is_complete
from toolkit.checkpoint.run_dir import load_megaforge_model, resolve_checkpoint
from toolkit.config import RunConfig, load_config
from toolkit.data.tasks.formats import json_lines
from toolkit.data.tasks.sft import chat_prompt, chat_template, check_messages, end_token_id
from toolkit.errors import ConfigError, DataError
from toolkit.generation import sample_next

logger = logging.getLogger(__name__)


def run_config(run_dir: str | Path) -> RunConfig:
    """The ``config.yaml`` of a run directory (or of the run a ``step_N`` folder belongs to)."""
    folder, _ = resolve_checkpoint(run_dir)
    return load_config(str(folder / "config.yaml"))


def is_decoder_lm(model: nn.Module) -> bool:
    """A decoder-only language model with KV caches (GPT/Llama), not an encoder or an encoder–decoder."""
    return hasattr(model, "new_caches") and not getattr(model, "is_encoder_decoder", False)


def require_decoder(run_dir: str | Path) -> RunConfig:
    """The run's config, or a one-line error when its model is not a decoder LM (checked on ``meta``,
    before anything is loaded)."""
    from toolkit.models.build import build_model

    cfg = run_config(run_dir)
    with torch.device("meta"):
        model = build_model(cfg.model)
    if not is_decoder_lm(model):
        kind = "pretraining run" if cfg.task.type == "none" else f"{cfg.task.type} run"
        raise ConfigError(f"{run_dir} is a {cfg.model.family} {kind}; generation and perplexity need a decoder language "
                          "model (a GPT/Llama pretraining or sft run), evaluate and predict on an encoder need a run "
                          "from megaforge finetune")
    return cfg


def load_lm_run(run_dir: str | Path, *, device: str = "cpu"):
    """(model, config, tokenizer, checkpoint folder) of a decoder run: ``checkpoints/best`` when the run
    kept one, else its latest checkpoint (or the ``step_N`` folder given)."""
    run_dir = Path(run_dir)
    best = run_dir / "checkpoints" / BEST
    src = best if is_complete(best) else run_dir
    src = resolve_checkpoint(src)[1]  # the step folder read, for the reports
    model, cfg, tokenizer = load_megaforge_model(src, device=device)
    if not is_decoder_lm(model):
        require_decoder(run_dir)  # raises the one-line error
    if tokenizer is None:
        raise ConfigError(f"{run_dir} has no tokenizer/ folder; text generation and scoring need the run's tokenizer")
    return model, cfg, tokenizer, src


def position_limit(model: nn.Module) -> int:
    """Positions the model has (learned table or RoPE cache): prompt plus new tokens fit in it."""
    return model.cfg.max_position_embeddings or model.cfg.seq_length


# ---------------------------------------------------------------------------- batched generation


@torch.no_grad()
def generate_batch(model: nn.Module, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int | None,
                   temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                   generator: torch.Generator | None = None) -> list[list[int]]:
    """The new ids of each prompt (non-empty id lists of any lengths, each within the model's
    positions), generated together with one KV cache; each list ends before the end token ``eos_id``."""
    was_training = model.training
    model.eval()
    try:
        return _generate_batch(model, prompts, max_new_tokens=max_new_tokens, eos_id=eos_id, temperature=temperature,
                               top_k=top_k, top_p=top_p, generator=generator)
    finally:
        model.train(was_training)


def _generate_batch(model: nn.Module, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int | None,
                    temperature: float, top_k: int | None, top_p: float | None,
                    generator: torch.Generator | None) -> list[list[int]]:
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # [b]
    b, s = len(prompts), int(lengths.max())
    budget = (position_limit(model) - lengths).clamp(min=0, max=max_new_tokens)  # [b] new tokens each row may take
    steps = int(budget.max())
    if steps == 0:
        return [[] for _ in prompts]
    tokens = torch.zeros(b, s, dtype=torch.long, device=device)  # [b, s], left-padded
    for i, p in enumerate(prompts):
        tokens[i, s - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
    offset = (s - lengths)[:, None]  # [b, 1] padding columns of each row
    col = torch.arange(s, device=device)[None, :]  # [1, s]
    real = col >= offset  # [b, s]
    positions = (col - offset).clamp(min=0)  # [b, s], 0 at each row's first real token
    keys = torch.zeros(b, s + steps, dtype=torch.bool, device=device)  # [b, cache length]: which keys are real
    keys[:, :s] = real
    causal = torch.ones(s, s, dtype=torch.bool, device=device).tril()  # [s, s]
    eye = torch.eye(s, dtype=torch.bool, device=device)  # a padding query attends to itself alone
    mask = (causal[None] & real[:, None, :]) | eye[None]  # [b, s, s]
    caches = model.new_caches(b, s + steps, device=device, dtype=dtype)
    logits = model(tokens, caches=caches, positions=positions, attn_mask=mask[:, None])[:, -1]  # [b, V]
    out = torch.zeros(b, steps, dtype=torch.long, device=device)
    taken = torch.zeros(b, dtype=torch.long, device=device)  # new tokens kept per row (the end token not counted)
    done = budget == 0
    for i in range(steps):
        nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)  # [b]
        out[:, i] = nxt
        ended = nxt == eos_id if eos_id is not None else torch.zeros_like(done)
        taken += (~done & ~ended).long()
        done |= ended | (budget <= i + 1)
        if bool(done.all()):
            break
        keys[:, s + i] = True
        # [b, 1]: the new token's position in its own row (a finished row may run past the table: clamped)
        pos = (lengths + i).clamp(max=position_limit(model) - 1)[:, None]
        logits = model(nxt[:, None], caches=caches, positions=pos,
                       attn_mask=keys[:, None, None, : s + i + 1])[:, -1]  # mask [b, 1, 1, s + i + 1]
    return [out[r, : int(taken[r])].tolist() for r in range(b)]


def encode_prompt(tokenizer, text: str, limit: int) -> list[int]:
    """``text``'s ids, cut from the start to leave room for one new token (as SFT training cuts); an
    empty prompt starts from the end-of-document token, as a new document does."""
    ids = tokenizer.encode(text)
    if not ids:
        start = tokenizer.eod_id if tokenizer.eod_id is not None else end_token_id(tokenizer)
        ids = [start] if start is not None else []
    if not ids:
        raise ConfigError("an empty prompt needs a tokenizer with an end-of-document token to start from")
    return ids[-(limit - 1):]


def generate_texts(model: nn.Module, tokenizer, prompts: list[str], *, batch_size: int = 8, max_new_tokens: int = 128,
                   temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                   seed: int | None = 0) -> list[str]:
    """The generated text of each prompt, in order; prompts are batched by length (least padding)."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1 (got {batch_size})")
    limit = position_limit(model)
    ids = [encode_prompt(tokenizer, p, limit) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None and temperature > 0 else None
    out: list[str] = [""] * len(ids)
    eos = end_token_id(tokenizer)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        new = generate_batch(model, [ids[i] for i in chunk], max_new_tokens=max_new_tokens, eos_id=eos,
                             temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
        for i, n in zip(chunk, new):
            out[i] = tokenizer.decode(n)
    return out


# ---------------------------------------------------------------------------- megaforge predict


def read_prompts(path: str | Path) -> tuple[list[dict], list[str | list[dict]]]:
    """(the input records, what each is continued from: its ``prompt`` string, or its checked ``messages``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; pass a jsonl file of {{\"prompt\": ...}} or {{\"messages\": [...]}} lines")
    records, inputs = [], []
    for where, obj in json_lines(path):
        if not isinstance(obj, dict):
            raise DataError(f"{where}: each line must be a JSON object with 'prompt' or 'messages'")
        if "messages" in obj:
            inputs.append(check_messages(obj["messages"], where))
        elif isinstance(obj.get("prompt"), str):
            inputs.append(obj["prompt"])
        else:
            raise DataError(f"{where}: a prediction line needs a string 'prompt' or a 'messages' list "
                            f"(has {sorted(obj)})")
        records.append(obj)
    if not records:
        raise DataError(f"{path} holds no prompts")
    return records, inputs


def predict_generative(run_dir: str | Path, input_path: str | Path, output: str | Path, *, device: str = "cpu",
                       batch_size: int = 8, max_new_tokens: int = 128, temperature: float = 0.0,
                       top_k: int | None = None, top_p: float | None = None, seed: int | None = 0) -> Path:
    """``megaforge predict RUN --input FILE --output FILE`` for a decoder run: every input line written
    back, all its fields kept, with ``completion`` (the generated text) added."""
    require_decoder(run_dir)
    records, inputs = read_prompts(input_path)  # bad lines fail before the model loads
    model, cfg, tokenizer, src = load_lm_run(run_dir, device=device)
    template = chat_template(cfg, tokenizer)
    texts = [x if isinstance(x, str) else chat_prompt(template, x, tokenizer) for x in inputs]
    completions = generate_texts(model, tokenizer, texts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for rec, completion in zip(records, completions):
            fh.write(json.dumps({**rec, "completion": completion}, ensure_ascii=False) + "\n")
    tmp.replace(output)  # the output appears whole or not at all
    replaced = sum("completion" in rec for rec in records)
    if replaced:
        logger.warning(f"{replaced} input lines had a 'completion' field; in {output} it holds the generated text "
                       f"({input_path} keeps the original)")
    logger.info(f"generated {len(records)} completions with {src} → {output}")
    return output


# ---------------------------------------------------------------------------- megaforge chat


def chat_replies(model: nn.Module, tokenizer, turns: Iterable[str], *, template: str, system: str | None = None,
                 max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = 0) -> Iterator[str]:
    """The assistant's reply to each user turn in ``turns``, the conversation so far (``system``, the
    earlier turns and replies) rendered with the chat ``template`` before each reply."""
    messages = [{"role": "system", "content": system}] if system else []
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None and temperature > 0 else None
    limit, eos = position_limit(model), end_token_id(tokenizer)
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        ids = encode_prompt(tokenizer, chat_prompt(template, messages, tokenizer), limit)
        new = generate_batch(model, [ids], max_new_tokens=max_new_tokens, eos_id=eos, temperature=temperature,
                             top_k=top_k, top_p=top_p, generator=gen)[0]
        reply = tokenizer.decode(new)
        messages.append({"role": "assistant", "content": reply})
        yield reply
