"""What ``megaforge convert`` runs: :func:`detect_source` tells what a path or id holds, and
:func:`convert` sends it to the Hugging Face exporter or importer, the legacy Megatron-LM importer or
the offline resharder."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from toolkit.checkpoint.native import is_complete
from toolkit.convert.hf import export_hf, import_hf, is_hub_id
from toolkit.convert.megatron_legacy import import_megatron, is_megatron_checkpoint
from toolkit.convert.reshard import reshard_offline
from toolkit.convert.verify import smoke_check
from toolkit.errors import CheckpointError

logger = logging.getLogger(__name__)


def detect_source(src: str | Path) -> str:
    """``megaforge`` (run dir or step folder), ``megatron`` (legacy checkpoint) or ``hf`` (folder or Hub id)."""
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
    if not is_hub_id(src):
        raise CheckpointError(f"{src} does not exist (and is not a Hugging Face Hub id)")
    return "hf"


def convert(src: str | Path, out: str | Path, *, to: str, verify: bool = False, dtype: str | None = None,
            max_shard_size: int | str = "2GB", tokenizer: str | None = None, vocab_size: int | None = None,
            tolerance: float = 1e-4, tensor_parallel: int = 1, pipeline_parallel: int = 1,
            virtual_pipeline: int | None = None) -> Path:
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
        return export_hf(src, out, verify=verify, dtype=dtype, max_shard_size=max_shard_size, tolerance=tolerance)
    if to != "megaforge":
        raise CheckpointError(f"--to {to!r} is not one of hf, megaforge")
    if kind == "megaforge" or tensor_parallel > 1 or pipeline_parallel > 1:
        if kind == "megaforge":
            return reshard_offline(src, out, tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
                                   virtual_pipeline=virtual_pipeline)
        with tempfile.TemporaryDirectory(dir=Path(out).parent if Path(out).parent.is_dir() else None) as tmp:
            imported = convert(src, Path(tmp) / "imported", to="megaforge", verify=verify, dtype=dtype,
                               tokenizer=tokenizer, vocab_size=vocab_size, tolerance=tolerance)
            return reshard_offline(imported, out, tensor_parallel=tensor_parallel,
                                   pipeline_parallel=pipeline_parallel, virtual_pipeline=virtual_pipeline)
    if kind == "hf":
        return import_hf(src, out, verify=verify, dtype=dtype or "fp32", tokenizer=tokenizer, tolerance=tolerance)
    result = import_megatron(src, out, tokenizer=tokenizer, vocab_size=vocab_size, dtype=dtype or "fp32")
    if verify:
        report = smoke_check(result)
        if report.ok:
            logger.info("verification: the imported model loads and gives finite logits")
        else:
            logger.error("verification FAILED: the imported model gives non-finite logits")
        report.raise_if_failed()
    return result
