"""What ``megaforge convert`` runs: :func:`detect_source` tells what a path or id holds, and
:func:`convert` sends it to the Hugging Face exporter or importer, the Megatron-LM importer (to a
megaforge folder, or on to a Hugging Face folder in one step), the NeMo importer and exporter
(:mod:`toolkit.convert.nemo`) or the offline resharder."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from toolkit.checkpoint.native import is_complete
from toolkit.convert.adapters import family_adapter
from toolkit.convert.hf import export_hf, import_hf, is_hub_id
from toolkit.convert.megaforge_folder import check_new_run_dir
from toolkit.convert.megatron_legacy import RANK_FILE, check_imported_logits, is_megatron_checkpoint, plan_megatron
from toolkit.convert.nemo import import_nemo, is_nemo_archive, is_nemo_source, nemo_to_hf
from toolkit.convert.nemo_export import export_nemo
from toolkit.convert.peft_export import export_peft
from toolkit.convert.provenance import update_provenance
from toolkit.convert.reshard import reshard_offline
from toolkit.convert.streaming import scratch_dir
from toolkit.errors import CheckpointError

logger = logging.getLogger(__name__)


def detect_source(src: str | Path) -> str:
    """``megaforge`` (run dir or step folder), ``nemo`` (a ``.nemo`` archive or its unpacked folder, a
    NeMo 2.0 folder), ``megatron`` (legacy checkpoint) or ``hf`` (folder or Hub id)."""
    path = Path(src).expanduser()
    if path.is_dir():
        if is_complete(path) or ((path / "config.yaml").is_file() and (path / "checkpoints").is_dir()):
            return "megaforge"
        if is_nemo_source(path):
            return "nemo"
        if is_megatron_checkpoint(path):
            return "megatron"
        if (path / "config.json").is_file():
            return "hf"
        raise CheckpointError(f"cannot tell what {path} holds: not a megaforge run/checkpoint, a NeMo or "
                              "Megatron-LM checkpoint or a Hugging Face folder")
    if is_nemo_archive(path):
        return "nemo"
    if path.exists():
        hint = (f"; give its checkpoint folder, {path.parent.parent}" if path.name == RANK_FILE
                else "; give the folder that holds the checkpoint")
        raise CheckpointError(f"{src} is a file, not a checkpoint folder{hint}")
    if not is_hub_id(src):
        raise CheckpointError(f"{src} does not exist (and is not a Hugging Face Hub id)")
    return "hf"


_KIND_NAMES = {"hf": "Hugging Face model", "megatron": "Megatron-LM checkpoint", "nemo": "NeMo checkpoint",
               "megaforge": "megaforge run"}


def _is_local(src: str | Path) -> bool:
    return Path(src).expanduser().exists()


def convert(src: str | Path, out: str | Path, *, to: str, verify: bool = False, dtype: str | None = None,
            max_shard_size: int | str = "2GB", tokenizer: str | None = None, vocab_size: int | None = None,
            tolerance: float = 1e-4, tensor_parallel: int = 1, pipeline_parallel: int = 1,
            virtual_pipeline: int | None = None) -> Path:
    """What ``megaforge convert`` runs: detect what ``src`` is and convert it ``to`` hf, megaforge or
    nemo (``--to megaforge`` with ``tensor_parallel``/``pipeline_parallel`` lays the result out for that
    layout; a megaforge source is then resharded offline). A Megatron-LM or NeMo checkpoint goes
    ``--to hf`` in one step (:func:`megatron_to_hf`, :func:`~toolkit.convert.nemo.nemo_to_hf`); a
    megaforge GPT run goes ``--to nemo`` as a NeMo 1.x ``.nemo`` archive."""
    if to not in ("hf", "megaforge", "nemo", "peft"):
        raise CheckpointError(f"--to {to!r} is not one of hf, megaforge, nemo, peft")
    kind = detect_source(src)
    if to == "peft":
        if kind != "megaforge":
            raise CheckpointError(f"--to peft needs a megaforge LoRA run directory or checkpoint; {src} is a "
                                  f"{_KIND_NAMES[kind]}")
        return export_peft(src, out)
    if to == "nemo":
        if kind != "megaforge":
            raise CheckpointError(f"--to nemo needs a megaforge run directory or checkpoint; {src} is a "
                                  f"{_KIND_NAMES[kind]} (convert it --to megaforge first)")
        if tensor_parallel > 1 or pipeline_parallel > 1:
            raise CheckpointError("--tensor-parallel/--pipeline-parallel apply to --to megaforge; a .nemo export "
                                  "is written without model parallelism")
        return export_nemo(src, out, dtype=dtype, verify=verify, tolerance=tolerance)
    if to == "hf":
        if tensor_parallel > 1 or pipeline_parallel > 1:
            raise CheckpointError("--tensor-parallel/--pipeline-parallel apply to --to megaforge; a Hugging Face "
                                  "export is always one unsharded model")
        if kind == "hf":
            if not _is_local(src):
                raise CheckpointError(f"{src} does not exist; --to hf needs a megaforge run directory or "
                                      "checkpoint, or a Megatron-LM checkpoint folder")
            raise CheckpointError(f"--to hf needs a megaforge run directory or checkpoint, or a Megatron-LM "
                                  f"checkpoint; {src} is a Hugging Face model (it already is one)")
        if kind == "nemo":
            return nemo_to_hf(src, out, verify=verify, dtype=dtype, max_shard_size=max_shard_size,
                              tokenizer=tokenizer, vocab_size=vocab_size, tolerance=tolerance)
        if kind == "megatron":
            return megatron_to_hf(src, out, verify=verify, dtype=dtype, max_shard_size=max_shard_size,
                                  tokenizer=tokenizer, vocab_size=vocab_size, tolerance=tolerance)
        return export_hf(src, out, verify=verify, dtype=dtype, max_shard_size=max_shard_size, tolerance=tolerance)
    if kind == "megaforge" or tensor_parallel > 1 or pipeline_parallel > 1:
        if kind == "megaforge":
            return reshard_offline(src, out, tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
                                   virtual_pipeline=virtual_pipeline)
        with tempfile.TemporaryDirectory(dir=scratch_dir(out), prefix=".megaforge-convert-") as tmp:
            imported = convert(src, Path(tmp) / "imported", to="megaforge", verify=verify, dtype=dtype,
                               tokenizer=tokenizer, vocab_size=vocab_size, tolerance=tolerance)
            return reshard_offline(imported, out, tensor_parallel=tensor_parallel,
                                   pipeline_parallel=pipeline_parallel, virtual_pipeline=virtual_pipeline)
    check_new_run_dir(out)  # before a download or a plan: an import never overwrites a run
    if kind == "hf":
        return _import_hf(src, out, verify=verify, dtype=dtype, tokenizer=tokenizer, tolerance=tolerance)
    if kind == "nemo":
        return import_nemo(src, out, tokenizer=tokenizer, vocab_size=vocab_size, dtype=dtype or "fp32",
                           verify=verify)
    plan = plan_megatron(src, tokenizer=tokenizer, vocab_size=vocab_size)
    result = plan.write(out, dtype=dtype or "fp32")
    if verify:
        _verify_megatron(result, plan.shapes_checked)
    return result


def _import_hf(src, out, *, verify, dtype, tokenizer, tolerance) -> Path:
    try:
        return import_hf(src, out, verify=verify, dtype=dtype or "fp32", tokenizer=tokenizer, tolerance=tolerance)
    except CheckpointError as e:
        if _is_local(src) or not str(e).startswith(f"cannot download {src}"):
            raise
        detail = str(e)[len(f"cannot download {src} from the Hugging Face Hub"):].lstrip(": ")
        raise CheckpointError(f"{src} does not exist here, nor can it be downloaded as a Hugging Face Hub id"
                              + (f": {detail}" if detail else "")) from None


def _verify_megatron(folder: Path, shapes_checked: int) -> None:
    report = check_imported_logits(folder, shapes_checked=shapes_checked)
    (logger.info if report.ok else logger.error)(report.summary())
    report.raise_if_failed()


def megatron_to_hf(src: str | Path, out: str | Path, *, verify: bool = False, dtype: str | None = None,
                   max_shard_size: int | str = "2GB", tokenizer: str | None = None, vocab_size: int | None = None,
                   tolerance: float = 1e-4) -> Path:
    """A Megatron-LM checkpoint → the Hugging Face folder ``out`` in one step.

    Everything is read and checked first (config from ``args``, merged shapes, and whether a
    Hugging Face class can hold the model), so a refusal writes nothing. The weights then go through
    a megaforge folder in a temporary directory beside ``out`` (in the checkpoint's own dtype, so it
    is no bigger than the checkpoint), which :func:`~toolkit.convert.hf.export_hf` exports and which is
    removed afterwards, on failure too. With ``verify`` the import's checks (shapes, logit statistics)
    and the export's (logits against ``transformers``, tokenizer ids) both run.
    """
    plan = plan_megatron(src, tokenizer=tokenizer, vocab_size=vocab_size)
    family_adapter(plan.cfg.family).select(plan.cfg)  # refuses a model no Hugging Face class holds
    with tempfile.TemporaryDirectory(dir=scratch_dir(out), prefix=".megaforge-convert-") as tmp:
        imported = Path(tmp) / "imported"
        with _TempPathsInLogs(imported, src):
            plan.write(imported, dtype=None, announce=False)
            if verify:
                _verify_megatron(imported, plan.shapes_checked)
            result = export_hf(imported, out, verify=verify, dtype=dtype, max_shard_size=max_shard_size,
                               tolerance=tolerance)
    if tokenizer is None:
        logger.info("note: no --tokenizer given; the export has no tokenizer files")
    update_provenance(result, tokenizer=str(tokenizer) if tokenizer is not None else None)
    return result


class _TempPathsInLogs(logging.Filter):
    """While the one-step path runs: the converters' messages name the source instead of the
    temporary folder, and the export's note about that folder's missing tokenizer is left out
    (:func:`megatron_to_hf` says it in its own words)."""

    LOGGERS = ("toolkit.convert.hf", "toolkit.convert.megatron_legacy", "toolkit.convert.verify")

    def __init__(self, temp: Path, src: str | Path):
        super().__init__()
        self.step = str(temp / "checkpoints" / "step_0")
        self.temp, self.src = str(temp), str(src)

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if str(Path(self.temp) / "tokenizer") in text:
            return False
        if self.temp in text:
            record.msg, record.args = text.replace(self.step, self.src).replace(self.temp, self.src), None
        return True

    def __enter__(self) -> _TempPathsInLogs:
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self)
