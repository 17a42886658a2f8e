"""Self-verification of conversions: both sides run the same probe batch in fp32.

The report holds the max absolute logit difference over the true vocabulary (padding columns
excluded) and whether ``AutoTokenizer`` gives our token ids on probe texts. Above ``tolerance``
(default 1e-4) :meth:`VerifyReport.raise_if_failed` raises :class:`VerificationError`, which the
CLI turns into exit code 1.

Probes are per task (``HFTarget.task``), in :data:`PROBES`:

* ``causal_lm`` (GPT): next-token logits.
* ``masked_lm`` (BERT): MLM logits with token types (second half of each row = segment B) and a
  padding mask (the random batch's last row ends in padding; padded positions are not compared),
  plus the sentence-pair logits when both sides have that head.
* ``seq2seq_lm`` (T5): decoder logits for encoder inputs (with a padding mask, as above) and
  decoder inputs = the pad id then the inputs shifted right.

The tokenizer half is :mod:`toolkit.tokenization.fidelity`: the *source* tokenizer (ours for an
export, ``AutoTokenizer`` on the source folder for an import) against the result on its probe
battery; the report carries that comparison and fails on any difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from toolkit.checkpoint.run_dir import load_megaforge_model
from toolkit.convert.adapters import export_target
from toolkit.convert.streaming import INDEX_FILE, SINGLE_FILE
from toolkit.errors import CheckpointError
from toolkit.tokenization.fidelity import FidelityReport, check_export, check_import

PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "It was the best of times, it was the worst of times,\nit was the age of wisdom...",
    "  Leading spaces, tabs\tand CAPITALS; numbers 12345 and 3.14159!",
    "naïve café — Zürich, 東京, 🙂",
)


class VerificationError(CheckpointError):
    """The two sides of a conversion disagree beyond the tolerance."""

    exit_code = 1


@dataclass
class VerifyReport:
    max_abs_diff: float
    tolerance: float
    num_tokens: int
    #: the tokenizer comparison (source vs result), or None where there is no tokenizer to compare
    tokenizer: FidelityReport | None = None

    @property
    def texts_checked(self) -> int:
        return self.tokenizer.texts_checked if self.tokenizer is not None else 0

    @property
    def token_mismatch(self) -> str | None:
        """The first probe whose ids differ, or None."""
        return self.tokenizer.mismatch[0] if self.tokenizer is not None and self.tokenizer.mismatch else None

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance and (self.tokenizer is None or self.tokenizer.ok)

    def summary(self) -> str:
        verdict = "verification passed" if self.ok else "verification FAILED"
        text = (f"{verdict}: max |logit difference| = {self.max_abs_diff:.3g} over {self.num_tokens} probe tokens "
                f"(tolerance {self.tolerance:g})")
        if self.tokenizer is not None:
            text += "; " + self.tokenizer.detail()
        return text

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise VerificationError(self.summary())


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise CheckpointError("verification needs the transformers package: pip install 'megaforge[hf]'") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


# ---------------------------------------------------------------------------- probes


def probe_ids(vocab_size: int, max_len: int, tokenizer=None, *, seed: int = 0) -> list[torch.Tensor]:
    """Probe batches [b, s]: random ids, plus the probe texts when a tokenizer is given."""
    gen = torch.Generator().manual_seed(seed)
    s = max(2, min(16, max_len))
    batches = [torch.randint(0, vocab_size, (2, s), generator=gen)]
    if tokenizer is not None:
        for text in PROBE_TEXTS:
            ids = [i for i in tokenizer.encode(text) if i < vocab_size][:max_len]
            if ids:
                batches.append(torch.tensor([ids]))
    return batches


def _max_diff(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    """Max |a - b| over positions where ``keep`` [b, s] is True (all when None)."""
    a, b = a.float(), b.float()
    if a.shape != b.shape:
        raise VerificationError(f"logit shapes differ: ours {tuple(a.shape)}, transformers {tuple(b.shape)}")
    diff = (a - b).abs()
    if keep is not None:
        diff = diff[keep]  # [kept positions, vocab]
    return float(diff.max()) if diff.numel() else 0.0


def padding_mask(ids: torch.Tensor) -> torch.Tensor:
    """[b, s] bool, True = real token: the last row of a batch of several ends in padding (a quarter)."""
    mask = torch.ones_like(ids, dtype=torch.bool)
    if ids.shape[0] > 1:
        mask[-1, ids.shape[1] - max(1, ids.shape[1] // 4):] = False
    return mask


def token_types(ids: torch.Tensor, num_tokentypes: int) -> torch.Tensor | None:
    """[b, s]: segment A then segment B from the middle of each row (None without token types)."""
    if num_tokentypes < 2:
        return None
    return (torch.arange(ids.shape[1]) >= ids.shape[1] // 2).long().expand_as(ids)


@torch.no_grad()
def causal_lm_probe(ours: nn.Module, theirs: nn.Module, ids: torch.Tensor, vocab_size: int) -> float:
    a = ours(ids)[..., :vocab_size]  # [b, s, vocab]
    b = theirs(input_ids=ids).logits[..., :vocab_size]  # [b, s, vocab]
    return _max_diff(a, b)


@torch.no_grad()
def masked_lm_probe(ours: nn.Module, theirs: nn.Module, ids: torch.Tensor, vocab_size: int) -> float:
    mask = padding_mask(ids)
    types = token_types(ids, ours.cfg.num_tokentypes)
    out = ours(ids, token_types=types, padding_mask=mask)
    kwargs = {"token_type_ids": types} if types is not None else {}
    hf = theirs(input_ids=ids, attention_mask=mask.long(), **kwargs)
    mlm = getattr(hf, "prediction_logits", None)  # *ForPreTraining
    mlm = hf.logits if mlm is None else mlm  # *ForMaskedLM
    worst = _max_diff(out["mlm_logits"][..., :vocab_size], mlm[..., :vocab_size], mask)
    theirs_binary = getattr(hf, "seq_relationship_logits", None)
    if out["binary_logits"] is not None and theirs_binary is not None:
        worst = max(worst, _max_diff(out["binary_logits"], theirs_binary))
    return worst


def decoder_inputs(ids: torch.Tensor, start_id: int = 0) -> torch.Tensor:
    """The decoder inputs of the seq2seq probe: ``start_id`` then ``ids`` shifted right."""
    return torch.cat([torch.full_like(ids[:, :1], start_id), ids[:, :-1]], dim=1)


@torch.no_grad()
def seq2seq_lm_probe(ours: nn.Module, theirs: nn.Module, ids: torch.Tensor, vocab_size: int) -> float:
    mask = padding_mask(ids)
    start = getattr(theirs.config, "decoder_start_token_id", None) or 0
    dec = decoder_inputs(ids, start)
    a = ours(ids, dec, encoder_padding_mask=mask)[..., :vocab_size]  # [b, s_dec, vocab]
    b = theirs(input_ids=ids, attention_mask=mask.long(), decoder_input_ids=dec).logits[..., :vocab_size]
    return _max_diff(a, b)


@torch.no_grad()
def task_head_probe(ours: nn.Module, theirs: nn.Module, ids: torch.Tensor, vocab_size: int) -> float:
    """Task heads: token logits [b, s, labels] (real tokens only), sequence logits [b, labels] or
    regression scores [b], with padding and token types as the masked-LM probe."""
    mask = padding_mask(ids)
    types = token_types(ids, ours.cfg.num_tokentypes)
    a = ours(ids, token_types=types, padding_mask=mask)
    kwargs = {"token_type_ids": types} if types is not None else {}
    b = theirs(input_ids=ids, attention_mask=mask.long(), **kwargs).logits
    if a.dim() == 1:
        b = b.squeeze(-1)  # regression: [b, 1] → [b]
    return _max_diff(a, b, mask if a.dim() == 3 else None)


@torch.no_grad()
def encoder_probe(ours: nn.Module, theirs: nn.Module, ids: torch.Tensor, vocab_size: int) -> float:
    """Headless encoders (``BertModel``): final hidden states [b, s, hidden] on real tokens."""
    mask = padding_mask(ids)
    types = token_types(ids, ours.cfg.num_tokentypes)
    a = ours.encode(ids, types, mask)
    kwargs = {"token_type_ids": types} if types is not None else {}
    return _max_diff(a, theirs(input_ids=ids, attention_mask=mask.long(), **kwargs).last_hidden_state, mask)


#: task → (our model, transformers model, ids [b, s], true vocab) → max abs logit difference
PROBES: dict[str, Callable[[nn.Module, nn.Module, torch.Tensor, int], float]] = {
    "causal_lm": causal_lm_probe, "masked_lm": masked_lm_probe, "seq2seq_lm": seq2seq_lm_probe,
    "token_classification": task_head_probe, "sequence_classification": task_head_probe,
    "regression": task_head_probe, "encoder": encoder_probe,
}


def our_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Our model's token logits for ``ids`` [b, s] whatever the family (BERT: MLM; T5: decoder on ``ids``)."""
    if getattr(model, "is_encoder_decoder", False):
        return model(ids, decoder_inputs(ids))
    out = model(ids)
    return out["mlm_logits"] if isinstance(out, dict) else out


def compare_models(ours: nn.Module, theirs: nn.Module, *, vocab_size: int, max_len: int, task: str = "causal_lm",
                   tokenizer=None, tolerance: float = 1e-4) -> VerifyReport:
    ours.eval()
    theirs.eval()
    probe = PROBES[task]
    worst, tokens = 0.0, 0
    for ids in probe_ids(vocab_size, max_len, tokenizer):
        worst = max(worst, probe(ours, theirs, ids, vocab_size))
        tokens += ids.numel()
    return VerifyReport(max_abs_diff=worst, tolerance=tolerance, num_tokens=tokens)


def compare_tokenizers(ours, hf_folder: str | Path) -> FidelityReport | None:
    """Ours (the source) vs ``AutoTokenizer`` on ``hf_folder`` over the fidelity probe battery."""
    require_transformers()
    return check_export(ours, hf_folder)


def _round_weights(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """Round our weights through ``dtype`` (as an export in that dtype does) and back to fp32."""
    if dtype is not None and dtype != torch.float32:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(dtype).float())
    return model


def _load_hf_model(folder: Path, architecture: str) -> nn.Module:
    """``transformers.<architecture>`` loaded from the local ``folder``: never the folder's own code
    (``trust_remote_code=False``), and only its safetensors weights where it has them — always, for
    the folders verified here: an export just written, or an import's source, which
    :class:`~toolkit.convert.streaming.SafetensorsSource` read."""
    transformers = require_transformers()
    cls = getattr(transformers, architecture)
    safetensors = (folder / SINGLE_FILE).is_file() or (folder / INDEX_FILE).is_file()
    kwargs = {"use_safetensors": True} if safetensors else {}
    return cls.from_pretrained(str(folder), dtype=torch.float32, trust_remote_code=False, **kwargs).eval()


def _max_len(cfg) -> int:
    return cfg.max_position_embeddings or cfg.seq_length


# ---------------------------------------------------------------------------- entry points


def verify_export(checkpoint: str | Path, hf_folder: str | Path, *, tolerance: float = 1e-4,
                  dtype: torch.dtype | None = None, fidelity: FidelityReport | None = None) -> VerifyReport:
    """Our checkpoint (weights rounded through ``dtype``) vs ``transformers`` loading ``hf_folder``;
    our tokenizer vs ``AutoTokenizer`` on ``hf_folder`` (``fidelity``: that comparison, already run)."""
    model, cfg, tokenizer = load_megaforge_model(checkpoint)
    target = export_target(cfg)
    theirs = _load_hf_model(Path(hf_folder), target.architecture)
    report = compare_models(_round_weights(model, dtype), theirs, vocab_size=cfg.model.vocab_size,
                            max_len=_max_len(cfg.model), task=target.task, tokenizer=tokenizer, tolerance=tolerance)
    if tokenizer is not None:
        report.tokenizer = fidelity if fidelity is not None else compare_tokenizers(tokenizer, hf_folder)
    return report


def verify_import(hf_folder: str | Path, megaforge_folder: str | Path, *, tolerance: float = 1e-4,
                  source_target=None, fidelity: FidelityReport | None = None) -> VerifyReport:
    """``transformers`` loading ``hf_folder`` vs our model loaded from the imported folder (as the class
    our model exports to: e.g. ``BertForMaskedLM`` for a checkpoint without NSP head,
    ``BertForTokenClassification`` for a fine-tuned one; a headless
    ``source_target`` — ``task="encoder"`` — compares the encoders' hidden states). The tokenizer half:
    ``fidelity`` when given (the import's own comparison with its source tokenizer), else
    ``AutoTokenizer`` on ``hf_folder`` vs the imported tokenizer."""
    model, cfg, tokenizer = load_megaforge_model(megaforge_folder)
    target = export_target(cfg)  # with a task head (an imported fine-tuned model): its task class
    if source_target is not None and source_target.task == "encoder":
        target = source_target
    theirs = _load_hf_model(Path(hf_folder), target.architecture)
    report = compare_models(model, theirs, vocab_size=cfg.model.vocab_size, max_len=_max_len(cfg.model),
                            task=target.task, tokenizer=tokenizer, tolerance=tolerance)
    if fidelity is not None:
        report.tokenizer = fidelity
    elif tokenizer is not None:
        report.tokenizer = check_import(hf_folder, tokenizer, result_name=f"the imported tokenizer "
                                        f"({Path(megaforge_folder) / 'tokenizer'})")
    return report


@torch.no_grad()
def smoke_check(megaforge_folder: str | Path) -> VerifyReport:
    """Without a reference model (legacy imports): the model loads and gives finite logits."""
    model, cfg, tokenizer = load_megaforge_model(megaforge_folder)
    ids = probe_ids(cfg.model.vocab_size, _max_len(cfg.model), tokenizer)[0]
    logits = our_logits(model, ids)[..., : cfg.model.vocab_size]
    finite = bool(torch.isfinite(logits).all())
    return VerifyReport(max_abs_diff=0.0 if finite else float("inf"), tolerance=0.0, num_tokens=ids.numel())
