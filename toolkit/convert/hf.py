"""Export megaforge checkpoints to Hugging Face folders and import them back, streaming.

* :func:`export_hf` — a run directory (its ``checkpoints/latest``) or a ``step_N`` folder →
  ``config.json``, ``model.safetensors`` (or shards + index), ``generation_config.json`` (generative
  models) and the tokenizer files, loadable offline by ``AutoConfig``, ``AutoTokenizer``,
  ``AutoModelFor{CausalLM,MaskedLM,Seq2SeqLM}`` and ``pipeline(...)``. Vocabulary padding is cut off.
* :func:`import_hf` — a local HF folder or a Hub id → a megaforge folder shaped like a run
  directory (``config.yaml``, ``tokenizer/``, ``checkpoints/step_0`` + ``latest``) that
  ``megaforge generate`` and ``checkpoint.init_from`` accept.

Both read and write one conversion step at a time (see :mod:`toolkit.convert.streaming`); the
weight names and transforms come from the family's ``models/<family>/hf.py`` adapter, its
``ModelSpec.hf_adapter`` (:mod:`toolkit.convert.adapters`). With ``verify=True`` both sides run a
probe batch (:mod:`toolkit.convert.verify`). Either way the source tokenizer and the result must give
the same ids on the probe battery of :mod:`toolkit.tokenization.fidelity` (exit code 1 if not).
Reading a run is :mod:`toolkit.checkpoint.run_dir`, writing an imported one
:mod:`toolkit.convert.megaforge_folder`; :func:`toolkit.convert.convert` is the one entry point
``megaforge convert`` and ``checkpoint.init_from`` use.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from huggingface_hub import snapshot_download

from toolkit.checkpoint.run_dir import load_run_tokenizer, resolve_checkpoint
from toolkit.config import ModelConfig, check_model_config, load_config
from toolkit.convert.adapters import (
    adapter_for_model_type,
    architecture_of,
    export_target,
    family_adapter,
    padded_context,
    task_config,
    task_from_hf,
)
from toolkit.convert.lora_weights import merged_lora_weights, tensor_dict_source
from toolkit.convert.megaforge_folder import expected_shapes, write_megaforge_folder
from toolkit.convert.provenance import write_provenance
from toolkit.convert.streaming import (
    AliasedSource,
    DCPSource,
    SafetensorsSource,
    TensorSource,
    parse_dtype,
    plan_metas,
    stream_steps,
    write_safetensors,
)
from toolkit.convert.verify import verify_export, verify_import
from toolkit.data.tasks.sft import chat_template
from toolkit.errors import CheckpointError, ConfigError, first_line
from toolkit.mapping.tables import HFTarget
from toolkit.tokenization import load_tokenizer
from toolkit.tokenization.export import export_tokenizer, special_token_ids
from toolkit.tokenization.fidelity import FidelityReport, check_export, check_import

logger = logging.getLogger(__name__)
_HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
#: files fetched from the Hub for an import (never pickled weights)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


# ---------------------------------------------------------------------------- export


def export_hf(src: str | Path, out: str | Path, *, verify: bool = False, dtype: str | torch.dtype | None = None,
              max_shard_size: int | str = "2GB", tolerance: float = 1e-4,
              weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the Hugging Face folder ``out`` from a megaforge run directory or ``step_N`` checkpoint.

    ``dtype`` (fp32 | bf16 | fp16, default: as stored) casts the weights. With ``verify`` the
    exported folder is loaded with ``transformers`` and compared with our model on a probe batch;
    a difference above ``tolerance`` raises :class:`~toolkit.convert.verify.VerificationError`.
    A LoRA run (``peft.method: lora``) is written merged (its base with every adapter folded in);
    ``weights`` replaces the checkpoint's tensors (single-device names; the base of a ``--to peft`` export).
    """
    run_dir, step_dir = resolve_checkpoint(src)
    cfg = load_config(str(run_dir / "config.yaml"))
    mcfg = cfg.model
    adapter = family_adapter(mcfg.family)
    target = export_target(cfg)
    if weights is None and cfg.peft.method == "lora":
        weights = merged_lora_weights(step_dir)
    source = DCPSource(step_dir) if weights is None else tensor_dict_source(weights)
    tp = cfg.parallel.tensor_model_parallel_size  # the vocabulary was padded for the layout it trained with
    ours = expected_shapes(mcfg, tp, task=cfg.task)
    ctx = padded_context(adapter, mcfg, tp)
    steps = target.table.plan("to_hf", source.names(), ctx, where=str(step_dir))
    torch_dtype = parse_dtype(dtype)
    items = plan_metas(steps, source, ctx, dtype=torch_dtype, expected_src=ours, expected_dst=None,
                       where=str(step_dir))
    out = Path(out)
    write_safetensors(out, items, stream_steps(steps, source, ctx, torch_dtype), max_shard_size=max_shard_size)
    stored = items[0][1].dtype if items else torch.float32
    tokenizer = load_run_tokenizer(run_dir)
    _write_hf_configs(out, target, mcfg, tokenizer, stored, extra=task_config(cfg.task))
    if cfg.task.type == "sft" and tokenizer is not None:  # apply_chat_template then renders as training did
        config_path = out / "tokenizer_config.json"
        tok_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        tok_config["chat_template"] = chat_template(cfg, tokenizer)
        config_path.write_text(json.dumps(tok_config, indent=2) + "\n")
    logger.info(f"exported {step_dir} → {out} ({target.architecture}, {len(items)} tensors, "
                f"{_HF_DTYPE_NAMES[stored]})")
    if tokenizer is None:
        logger.info(f"note: {run_dir / 'tokenizer'} is missing; the export has no tokenizer files")
    # the run's tokenizer (the source) vs AutoTokenizer on the export, on the fidelity probe battery
    fidelity = check_export(tokenizer, out) if tokenizer is not None else None
    if verify:
        report = verify_export(step_dir, out, tolerance=tolerance, dtype=torch_dtype, fidelity=fidelity)
        logger.info(report.summary())
        report.raise_if_failed()
    elif fidelity is not None:
        fidelity.raise_if_failed()
        logger.info(fidelity.detail())
    write_provenance(out, run_dir, step_dir, cfg)  # megaforge.json: recipe, layout, last metrics (model card)
    return out


def _write_hf_configs(out: Path, target: HFTarget, mcfg: ModelConfig, tokenizer, dtype: torch.dtype, *,
                      extra: dict | None = None) -> None:
    config = {**target.config_to_hf(mcfg), **(extra or {})}
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
    if not is_hub_id(src):
        raise CheckpointError(f"{src} is not a Hugging Face model folder or Hub id")
    try:
        return Path(snapshot_download(repo_id=str(src), revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # network, auth, missing repo
        raise CheckpointError(f"cannot download {src} from the Hugging Face Hub: {first_line(e)}") from None


def is_hub_id(src: str | Path) -> bool:
    """Whether ``src``, no folder here, can be a Hub repo id: nothing at that path, not spelled as a
    path (``.``, ``/``, ``~``), at most one ``/``."""
    text = str(src)
    return not (Path(text).expanduser().exists() or text.startswith((".", "/", "~")) or text.count("/") > 1)


def read_hf_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {folder / 'config.json'}: {first_line(e)}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{folder / 'config.json'} holds a JSON {type(config).__name__}, not an object; it is "
                              "not a Hugging Face model config")
    return config


def import_hf(src: str | Path, out: str | Path, *, verify: bool = False, dtype: str | torch.dtype | None = "fp32",
              tokenizer: str | Path | None = None, revision: str | None = None, tolerance: float = 1e-4,
              tensor_parallel_size: int = 1) -> Path:
    """Convert a Hugging Face model (folder or Hub id) into the megaforge folder ``out``.

    ``dtype`` is what the checkpoint stores (default fp32, what training starts from; None keeps
    the source dtype). ``tokenizer`` overrides the tokenizer found in the source folder.
    ``tensor_parallel_size`` pads the vocabulary for that layout (and records it in ``config.yaml``);
    any layout loads the checkpoint either way, re-padding on load.
    """
    folder = resolve_hf_source(src, revision=revision)
    hf_config = read_hf_config(folder)
    model_type = hf_config.get("model_type")
    where = str(folder / "config.json")
    if not model_type or not isinstance(model_type, str):
        raise CheckpointError(f"{where} has no model_type (a string such as \"gpt2\" or \"bert\")")
    adapter, target = adapter_for_model_type(model_type)
    source: TensorSource = SafetensorsSource(folder)
    try:
        if adapter.import_target is not None:  # the tensors decide (BERT: a headless BertModel folder, a task model)
            target = adapter.import_target(model_type, frozenset(source.names()), hf_config) or target
        mcfg = check_model_config(target.import_config(hf_config, source.names()), where)
    except (TypeError, ValueError, KeyError, ZeroDivisionError, OverflowError, AttributeError) as e:
        raise CheckpointError(f"{where}: a value has the wrong type or is out of range ({first_line(e)}); is it a "
                              f"{model_type} config as transformers writes it?") from None
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    task = task_from_hf(hf_config, target.task, where=str(folder / "config.json"))
    if target.tied_aliases:
        source = AliasedSource(source, target.tied_aliases)
    architecture = target.architecture if task is not None else architecture_of(adapter, mcfg, target)
    tok = _import_tokenizer(folder, tokenizer)
    # the source tokenizer vs ours before anything is written (write_megaforge_folder then checks that the
    # saved copy loads back the same); with --verify the verdict comes beside the logit difference
    fidelity = _import_fidelity(folder, tokenizer, tok)
    if fidelity is not None and not verify:
        fidelity.raise_if_failed()
        logger.info(fidelity.detail())
    ctx = padded_context(adapter, mcfg, tensor_parallel_size)
    steps = target.table.plan("from_hf", source.names(), ctx, where=str(folder))
    state = {"step": 0, "consumed_samples": 0, "imported_from": str(src), "architecture": architecture}
    out = write_megaforge_folder(out, mcfg, steps, source, ctx, tokenizer=tok, dtype=dtype, trainer_state=state,
                                 where=str(folder), name=Path(str(src)).name,
                                 description=f"imported from {src} ({architecture})",
                                 tensor_parallel_size=tensor_parallel_size, task=task)
    logger.info(f"imported {src} ({architecture}) → {out}")
    if task is not None:
        labels = f" with labels {', '.join(task.labels)}" if task.labels else ""
        logger.info(f"note: {src} is a fine-tuned {task.type} model{labels}; `megaforge finetune ... "
                    f"checkpoint.init_from={src}` continues from it, its head{' and labels' if labels else ''} included")
    if target.task == "encoder":
        logger.info(f"note: {src} is a headless {target.architecture} (no masked-LM head): lm_head.* initialized "
                    "fresh; a fine-tune replaces it with its task head anyway")
    if tok is None:
        logger.info("note: no tokenizer files found; pass tokenizer=... (--tokenizer) to add one")
    if verify:
        report = verify_import(folder, out, tolerance=tolerance, source_target=target, fidelity=fidelity)
        logger.info(report.summary())
        report.raise_if_failed()
    return out


def _import_fidelity(folder: Path, override: str | Path | None, tok) -> FidelityReport | None:
    """The import's tokenizer check: ``AutoTokenizer`` on the folder the tokenizer came from (the
    source folder, or an override that is a Hugging Face tokenizer folder) vs ``tok``."""
    if tok is None:
        return None
    source = folder if override is None else Path(str(override)).expanduser()
    if not source.is_dir():  # a shipped name or a single file: megaforge's own loader is the source
        return None
    return check_import(source, tok, result_name="the imported tokenizer")


def _import_tokenizer(folder: Path, override: str | Path | None):
    if override is not None:
        return load_tokenizer(str(override))
    has_files = (folder / "tokenizer.json").is_file() or any(folder.glob("*.model")) or (folder / "vocab.txt").is_file()
    return load_tokenizer(str(folder)) if has_files else None
