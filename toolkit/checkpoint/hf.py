"""Export megaforge checkpoints to Hugging Face folders and import them back, streaming.

* :func:`export_hf` — a run directory (its ``checkpoints/latest``) or a ``step_N`` folder →
  ``config.json``, ``model.safetensors`` (or shards + index), ``generation_config.json`` (generative
  models) and the tokenizer files, loadable offline by ``AutoConfig``, ``AutoTokenizer``,
  ``AutoModelFor{CausalLM,MaskedLM,Seq2SeqLM}`` and ``pipeline(...)``. Vocabulary padding is cut off.
* :func:`import_hf` — a local HF folder or a Hub id → a megaforge folder shaped like a run
  directory (``config.yaml``, ``tokenizer/``, ``checkpoints/step_0`` + ``latest``) that
  ``megaforge generate`` and ``checkpoint.init_from`` accept.

Both read and write one conversion step at a time (see :mod:`toolkit.checkpoint.streaming` and
:mod:`toolkit.checkpoint.plan_runner`); the weight names and transforms come from the family's
``models/<family>/hf.py`` adapter, found through :data:`HF_ADAPTERS`. With ``verify=True`` both sides
run a probe batch (:mod:`toolkit.checkpoint.verify`). The megaforge side (finding a run's checkpoint,
loading its model, writing an imported run folder) is :mod:`toolkit.checkpoint.megaforge_folder`;
:func:`convert` is the one entry point ``megaforge convert`` and ``checkpoint.init_from`` use.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Callable

import torch

from toolkit.checkpoint.hf_mapping import FamilyAdapter, HFTarget, MappingContext
from toolkit.checkpoint.megaforge_folder import (
    expected_shapes,
    load_megaforge_model,
    load_run_tokenizer,
    resolve_checkpoint,
    write_megaforge_folder,
)
from toolkit.checkpoint.native import is_complete
from toolkit.checkpoint.plan_runner import DTYPES, StepCache, parse_dtype, plan_metas, stream_steps
from toolkit.checkpoint.streaming import AliasedSource, DCPSource, SafetensorsSource, TensorSource, write_safetensors
from toolkit.config import ModelConfig, load_config
from toolkit.errors import CheckpointError, first_line
from toolkit.models.common.embeddings import padded_vocab_size

__all__ = [  # the conversion API, including what megaforge_folder and plan_runner hold
    "HF_ADAPTERS", "DTYPES", "HUB_PATTERNS", "family_adapter", "adapter_for_model_type", "parse_dtype",
    "resolve_checkpoint", "expected_shapes", "load_megaforge_model", "load_run_tokenizer", "plan_metas",
    "stream_steps", "StepCache", "export_hf", "resolve_hf_source", "read_hf_config", "import_hf",
    "write_megaforge_folder", "detect_source", "convert",
]

#: model family → module holding its ``ADAPTER`` (a :class:`FamilyAdapter`)
HF_ADAPTERS: dict[str, str] = {
    "gpt": "toolkit.models.gpt.hf",
    "bert": "toolkit.models.bert.hf",
    "t5": "toolkit.models.t5.hf",
}
_HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
#: files fetched from the Hub for an import (never pickled weights)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


# ---------------------------------------------------------------------------- adapters


def family_adapter(family: str) -> FamilyAdapter:
    if family not in HF_ADAPTERS:
        raise CheckpointError(f"model family {family!r} has no Hugging Face converter "
                              f"(available: {', '.join(HF_ADAPTERS)})")
    return importlib.import_module(HF_ADAPTERS[family]).ADAPTER


def adapter_for_model_type(model_type: str) -> tuple[FamilyAdapter, HFTarget]:
    """The family adapter and the (first) target reading HF ``model_type`` (e.g. ``gpt2``, ``bert``);
    targets sharing a model_type share its table and config mapping."""
    known = []
    for family in HF_ADAPTERS:
        adapter = family_adapter(family)
        target = adapter.target(model_type)
        if target is not None:
            return adapter, target
        known += [t.model_type for t in adapter.targets if t.model_type not in known]
    raise CheckpointError(f"Hugging Face model_type {model_type!r} is not supported (supported: {', '.join(known)})")


# ---------------------------------------------------------------------------- export


def export_hf(src: str | Path, out: str | Path, *, verify: bool = False, dtype: str | torch.dtype | None = None,
              max_shard_size: int | str = "2GB", tolerance: float = 1e-4,
              log: Callable[[str], None] | None = print) -> Path:
    """Write the Hugging Face folder ``out`` from a megaforge run directory or ``step_N`` checkpoint.

    ``dtype`` (fp32 | bf16 | fp16, default: as stored) casts the weights. With ``verify`` the
    exported folder is loaded with ``transformers`` and compared with our model on a probe batch;
    a difference above ``tolerance`` raises :class:`~toolkit.checkpoint.verify.VerificationError`.
    """
    run_dir, step_dir = resolve_checkpoint(src)
    cfg = load_config(str(run_dir / "config.yaml"))
    mcfg = cfg.model
    adapter = family_adapter(mcfg.family)
    target = adapter.select(mcfg)
    source = DCPSource(step_dir)
    tp = cfg.parallel.tensor_model_parallel_size  # the vocabulary was padded for the layout it trained with
    ours = expected_shapes(mcfg, tp)
    ctx = _padded_context(adapter, mcfg, tp)
    steps = target.table.plan("to_hf", source.names(), ctx, where=str(step_dir))
    torch_dtype = parse_dtype(dtype)
    items = plan_metas(steps, source, ctx, dtype=torch_dtype, expected_src=ours, expected_dst=None,
                       where=str(step_dir))
    out = Path(out)
    write_safetensors(out, items, stream_steps(steps, source, ctx, torch_dtype), max_shard_size=max_shard_size)
    stored = items[0][1].dtype if items else torch.float32
    tokenizer = load_run_tokenizer(run_dir)
    _write_hf_configs(out, target, mcfg, tokenizer, stored)
    if log:
        log(f"exported {step_dir} → {out} ({target.architecture}, {len(items)} tensors, {_HF_DTYPE_NAMES[stored]})")
        if tokenizer is None:
            log(f"note: {run_dir / 'tokenizer'} is missing; the export has no tokenizer files")
    if verify:
        from toolkit.checkpoint.verify import verify_export

        report = verify_export(step_dir, out, tolerance=tolerance, dtype=torch_dtype)
        if log:
            log(report.summary())
        report.raise_if_failed()
    from toolkit.checkpoint.provenance import write_provenance

    write_provenance(out, run_dir, step_dir, cfg)  # megaforge.json: recipe, layout, last metrics (model card)
    return out


def _write_hf_configs(out: Path, target: HFTarget, mcfg: ModelConfig, tokenizer, dtype: torch.dtype) -> None:
    from toolkit.tokenization.export import export_tokenizer, special_token_ids

    config = target.config_to_hf(mcfg)
    token_ids = target.token_config(special_token_ids(tokenizer) if tokenizer is not None else {})
    config.update({**token_ids, "dtype": _HF_DTYPE_NAMES[dtype],
                   "torch_dtype": _HF_DTYPE_NAMES[dtype]})  # transformers 5 reads dtype, 4.x torch_dtype
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = out / "generation_config.json"
    if target.generation:
        set_ids = {k: v for k, v in token_ids.items() if v is not None}
        generation.write_text(json.dumps(set_ids, indent=2) + "\n")
    elif generation.exists():
        generation.unlink()  # left by an earlier export into the same folder
    if tokenizer is not None:
        max_len = mcfg.max_position_embeddings or mcfg.seq_length
        export_tokenizer(tokenizer, out, model_max_length=max_len, tokenizer_class=target.tokenizer_class)


# ---------------------------------------------------------------------------- import


def resolve_hf_source(src: str | Path, *, revision: str | None = None) -> Path:
    """A local folder with ``config.json``, or a Hub repo id downloaded (safetensors only)."""
    path = Path(src).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json; it is not a Hugging Face model folder")
        return path
    if not _is_hub_id(src):
        raise CheckpointError(f"{src} is not a Hugging Face model folder or Hub id")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=str(src), revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # network, auth, missing repo
        raise CheckpointError(f"cannot download {src} from the Hugging Face Hub: {first_line(e)}") from None


def _is_hub_id(src: str | Path) -> bool:
    """Whether ``src``, no folder here, can be a Hub repo id: nothing at that path, not spelled as a
    path (``.``, ``/``, ``~``), at most one ``/``."""
    text = str(src)
    return not (Path(text).expanduser().exists() or text.startswith((".", "/", "~")) or text.count("/") > 1)


def read_hf_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {folder / 'config.json'}: {e}") from None


def import_hf(src: str | Path, out: str | Path, *, verify: bool = False, dtype: str | torch.dtype | None = "fp32",
              tokenizer: str | Path | None = None, revision: str | None = None, tolerance: float = 1e-4,
              tensor_parallel_size: int = 1, log: Callable[[str], None] | None = print) -> Path:
    """Convert a Hugging Face model (folder or Hub id) into the megaforge folder ``out``.

    ``dtype`` is what the checkpoint stores (default fp32, what training starts from; None keeps
    the source dtype). ``tokenizer`` overrides the tokenizer found in the source folder.
    ``tensor_parallel_size`` pads the vocabulary for that layout (and records it in ``config.yaml``);
    any layout loads the checkpoint either way, re-padding on load.
    """
    folder = resolve_hf_source(src, revision=revision)
    hf_config = read_hf_config(folder)
    model_type = hf_config.get("model_type")
    if not model_type:
        raise CheckpointError(f"{folder / 'config.json'} has no model_type")
    adapter, target = adapter_for_model_type(model_type)
    source: TensorSource = SafetensorsSource(folder)
    mcfg = target.import_config(hf_config, source.names())
    if target.tied_aliases:
        source = AliasedSource(source, target.tied_aliases)
    architecture = _architecture(adapter, mcfg, target)
    tok = _import_tokenizer(folder, tokenizer)
    ctx = _padded_context(adapter, mcfg, tensor_parallel_size)
    steps = target.table.plan("from_hf", source.names(), ctx, where=str(folder))
    state = {"step": 0, "consumed_samples": 0, "imported_from": str(src), "architecture": architecture}
    out = write_megaforge_folder(out, mcfg, steps, source, ctx, tokenizer=tok, dtype=dtype, trainer_state=state,
                                 where=str(folder), name=Path(str(src)).name,
                                 description=f"imported from {src} ({architecture})",
                                 tensor_parallel_size=tensor_parallel_size)
    if log:
        log(f"imported {src} ({architecture}) → {out}")
        if tok is None:
            log("note: no tokenizer files found; pass tokenizer=... (--tokenizer) to add one")
    if verify:
        from toolkit.checkpoint.verify import verify_import

        report = verify_import(folder, out, tolerance=tolerance)
        if log:
            log(report.summary())
        report.raise_if_failed()
    return out


def _padded_context(adapter: FamilyAdapter, mcfg: ModelConfig, tensor_parallel_size: int) -> MappingContext:
    """The adapter's context with the vocabulary padded for ``tensor_parallel_size`` (as the model is)."""
    padded = padded_vocab_size(mcfg.vocab_size, mcfg.make_vocab_size_divisible_by, tensor_parallel_size)
    return dataclasses.replace(adapter.context(mcfg), padded_vocab_size=padded)


def _architecture(adapter: FamilyAdapter, mcfg: ModelConfig, fallback: HFTarget) -> str:
    """The transformers class our imported model exports back to (e.g. BertForMaskedLM for a model
    imported without NSP head), else the class the model_type first names."""
    try:
        return adapter.select(mcfg).architecture
    except CheckpointError:
        return fallback.architecture


def _import_tokenizer(folder: Path, override: str | Path | None):
    from toolkit.tokenization import load_tokenizer

    if override is not None:
        return load_tokenizer(str(override))
    has_files = (folder / "tokenizer.json").is_file() or any(folder.glob("*.model")) or (folder / "vocab.txt").is_file()
    return load_tokenizer(str(folder)) if has_files else None


# ---------------------------------------------------------------------------- one entry point


def detect_source(src: str | Path) -> str:
    """``megaforge`` (run dir or step folder), ``megatron`` (legacy checkpoint) or ``hf`` (folder or Hub id)."""
    from toolkit.checkpoint.megatron_legacy import is_megatron_checkpoint

    path = Path(src).expanduser()
    if path.is_dir():
        if is_complete(path) or ((path / "config.yaml").is_file() and (path / "checkpoints").is_dir()):
            return "megaforge"
        if is_megatron_checkpoint(path):
            return "megatron"
        if (path / "config.json").is_file():
            return "hf"
        raise CheckpointError(f"cannot tell what {path} holds: not a megaforge run/checkpoint, a Megatron-LM "
                              "checkpoint or a Hugging Face folder")
    if not _is_hub_id(src):
        raise CheckpointError(f"{src} does not exist (and is not a Hugging Face Hub id)")
    return "hf"


def convert(src: str | Path, out: str | Path, *, to: str, verify: bool = False, dtype: str | None = None,
            max_shard_size: int | str = "2GB", tokenizer: str | None = None, vocab_size: int | None = None,
            tolerance: float = 1e-4, tensor_parallel: int = 1, pipeline_parallel: int = 1,
            virtual_pipeline: int | None = None, log: Callable[[str], None] | None = print) -> Path:
    """What ``megaforge convert`` runs: detect what ``src`` is and convert it ``to`` hf or megaforge
    (``--to megaforge`` with ``tensor_parallel``/``pipeline_parallel`` lays the result out for that
    layout; a megaforge source is then resharded offline)."""
    kind = detect_source(src)
    if to == "hf":
        if tensor_parallel > 1 or pipeline_parallel > 1:
            raise CheckpointError("--tensor-parallel/--pipeline-parallel apply to --to megaforge; a Hugging Face "
                                  "export is always one unsharded model")
        if kind != "megaforge":
            hint = ("it already is one" if kind == "hf"
                    else "import it first with --to megaforge, then export that folder")
            raise CheckpointError(f"--to hf needs a megaforge run directory or checkpoint; {src} is a "
                                  f"{'Hugging Face model' if kind == 'hf' else 'Megatron-LM checkpoint'} ({hint})")
        return export_hf(src, out, verify=verify, dtype=dtype, max_shard_size=max_shard_size, tolerance=tolerance,
                         log=log)
    if to != "megaforge":
        raise CheckpointError(f"--to {to!r} is not one of hf, megaforge")
    if kind == "megaforge" or tensor_parallel > 1 or pipeline_parallel > 1:
        from toolkit.checkpoint.reshard import reshard_offline

        if kind == "megaforge":
            return reshard_offline(src, out, tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
                                   virtual_pipeline=virtual_pipeline, log=log)
        import tempfile

        with tempfile.TemporaryDirectory(dir=Path(out).parent if Path(out).parent.is_dir() else None) as tmp:
            imported = convert(src, Path(tmp) / "imported", to="megaforge", verify=verify, dtype=dtype,
                               tokenizer=tokenizer, vocab_size=vocab_size, tolerance=tolerance, log=log)
            return reshard_offline(imported, out, tensor_parallel=tensor_parallel,
                                   pipeline_parallel=pipeline_parallel, virtual_pipeline=virtual_pipeline, log=log)
    if kind == "hf":
        return import_hf(src, out, verify=verify, dtype=dtype or "fp32", tokenizer=tokenizer, tolerance=tolerance,
                         log=log)
    from toolkit.checkpoint.megatron_legacy import import_megatron
    from toolkit.checkpoint.verify import smoke_check

    result = import_megatron(src, out, tokenizer=tokenizer, vocab_size=vocab_size, dtype=dtype or "fp32", log=log)
    if verify:
        report = smoke_check(result)
        if log:
            log("verification: the imported model loads and gives finite logits" if report.ok
                else "verification FAILED: the imported model gives non-finite logits")
        report.raise_if_failed()
    return result
