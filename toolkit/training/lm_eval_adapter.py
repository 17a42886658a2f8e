"""A megaforge decoder run as a model of EleutherAI's lm-evaluation-harness (``lm-eval``, an optional
dependency: ``pip install 'megaforge[eval]'``). Nothing else in megaforge imports this module, so
``lm_eval`` is loaded only when it is used.

Python::

    import lm_eval
    from lm_eval.tasks import TaskManager
    from toolkit.training.lm_eval_adapter import MegaforgeLM

    results = lm_eval.simple_evaluate(model=MegaforgeLM("runs/gpt-tiny"), tasks=["my_task"],
                                      task_manager=TaskManager(include_path="my_tasks/"))

or ``megaforge lm-eval RUN --tasks my_task --include-path my_tasks/``; importing this module also
registers the class as ``--model megaforge`` (``model_args="run_dir=runs/gpt-tiny"``) for lm-eval's
own command line.

The scoring follows lm-eval's ``HFLM`` for causal models: a continuation's tokens are those of
``context + continuation`` after the context's (:class:`~lm_eval.api.model.TemplateLM`), the input
keeps the last ``max_length + 1`` tokens, and rolling log-likelihoods use lm-eval's disjoint
windows with the end-of-document token as the prefix. Generation uses megaforge's batched,
KV-cached :func:`toolkit.training.generative.generate_batch`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from toolkit.data.tasks.sft import chat_prompt, chat_template, end_token_id
from toolkit.errors import ConfigError
from toolkit.training.generative import encode_prompt, generate_batch, load_lm_run, position_limit


@register_model("megaforge")
class MegaforgeLM(TemplateLM):
    """``lm_eval.api.model.LM`` over a megaforge GPT/Llama run directory (its best checkpoint if kept)."""

    def __init__(self, run_dir: str | Path, *, device: str = "cpu", batch_size: int | str = 8,
                 max_gen_toks: int = 256, **_ignored) -> None:
        super().__init__()
        self.model, self.cfg, self.tokenizer, self.checkpoint = load_lm_run(run_dir, device=str(device))
        self.run_dir = str(run_dir)
        self._device = torch.device(device)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" → 8
        self.max_gen_toks = int(max_gen_toks)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> MegaforgeLM:
        """``--model megaforge --model_args run_dir=RUN[,device=cpu,batch_size=8]``."""
        args = lm_utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k in ("device", "batch_size")}
        return cls(**{**args, **extra})

    # ------------------------------------------------------------------ what TemplateLM asks for

    @property
    def eot_token_id(self) -> int:
        """The end-of-document token (what pretraining puts between documents)."""
        eod = self.tokenizer.eod_id
        return eod if eod is not None else end_token_id(self.tokenizer)

    @property
    def max_length(self) -> int:
        return position_limit(self.model)

    @property
    def tokenizer_name(self) -> str:
        return self.run_dir.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation rendered with the run's chat template (as SFT trains and ``megaforge chat`` renders)."""
        if not add_generation_prompt:
            raise ConfigError("lm-eval asked for a chat render without the generation prompt (an assistant prefill); "
                              "megaforge renders conversations to be answered only")
        return chat_prompt(chat_template(self.cfg, self.tokenizer), chat_history, self.tokenizer)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``(sum of log p(continuation tokens | context), whether greedy decoding produces them)`` of
        each ``(key, context ids, continuation ids)``; batched with right padding (a causal model's real
        positions never see it)."""
        out: list[tuple[float, bool]] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start:start + self.batch_size]
            inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            width = max(len(x) for x in inputs)
            tokens = torch.zeros(len(chunk), width, dtype=torch.long, device=self._device)  # [k, width]
            for i, x in enumerate(inputs):
                tokens[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            logprobs = F.log_softmax(self.model(tokens).float(), dim=-1)  # [k, width, V]
            for i, ((_, _, cont), x) in enumerate(zip(chunk, inputs)):
                n = len(cont)
                rows = logprobs[i, len(x) - n: len(x)]  # [n, V]: the positions that predict the continuation
                target = torch.tensor(cont, dtype=torch.long, device=self._device)
                score = float(rows.gather(-1, target[:, None]).sum())
                out.append((score, bool((rows.argmax(-1) == target).all())))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's whole log-likelihood, from lm-eval's disjoint rolling windows of ``max_length``."""
        out = []
        for (text,) in [r.args for r in requests]:
            wins = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            out.append(sum(s for s, _ in self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in wins])))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (unless ``do_sample``/``temperature`` ask otherwise) continuations cut at the first
        ``until`` string; requests with the same generation settings are batched."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            gen = torch.Generator(device=self._device).manual_seed(int(kwargs.get("seed", 0))) if temperature else None
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                ids = [encode_prompt(self.tokenizer, requests[i].args[0], self.max_length) for i in chunk]
                new = generate_batch(self.model, ids, max_new_tokens=max_new, eos_id=end_token_id(self.tokenizer),
                                     temperature=temperature, top_k=kwargs.get("top_k"), top_p=kwargs.get("top_p"),
                                     generator=gen)
                for i, n in zip(chunk, new):
                    text = self.tok_decode(n)
                    for stop in until:
                        if stop and stop in text:
                            text = text[: text.index(stop)]
                    out[i] = text
        return out  # type: ignore[return-value]


def run_lm_eval(run_dir: str | Path, *, tasks: list[str], include_path: str | None = None, device: str = "cpu",
                batch_size: int = 8, num_fewshot: int | None = None, limit: int | None = None) -> dict:
    """``lm_eval.simple_evaluate`` of the run on ``tasks`` (names known to lm-eval, or defined by task YAML
    files under ``include_path``); returns lm-eval's ``results`` per task."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    # the include path alone when it defines every task asked for: indexing lm-eval's own thousands of task
    # files takes tens of seconds
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"lm-eval knows no task {unknown[0]!r}" + (f" (include path {include_path})" if include_path
                          else "") + "; pass --include-path DIR with its task YAML, or a task name lm-eval lists")
    out = lm_eval.simple_evaluate(model=MegaforgeLM(run_dir, device=device, batch_size=batch_size), tasks=tasks,
                                  task_manager=manager, num_fewshot=num_fewshot, limit=limit, bootstrap_iters=0,
                                  log_samples=False)
    return out["results"]
