"""The megaforge end of an import: :func:`write_megaforge_folder` writes a new run directory
(``config.yaml``, ``tokenizer/``, ``checkpoints/step_0`` + ``latest``) from a conversion plan, one
step at a time (what the Hugging Face and legacy Megatron-LM importers write). The tokenizer written
is loaded back and compared with the one converted (:mod:`toolkit.tokenization.fidelity`). Reading a run
directory is :mod:`toolkit.checkpoint.run_dir`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from toolkit.config import ModelConfig, ParallelConfig, RunConfig, TaskConfig, save_config, validate
from toolkit.convert.streaming import StepCache, TensorSource, parse_dtype, plan_metas, write_dcp_checkpoint
from toolkit.errors import CheckpointError, MegaforgeError
from toolkit.mapping.tables import MappingContext, Step
from toolkit.models.build import build_model
from toolkit.tokenization import Tokenizer, load_tokenizer
from toolkit.tokenization.fidelity import check_same


def expected_shapes(cfg: ModelConfig, tensor_parallel_size: int = 1, *, task=None) -> dict[str, torch.Size]:
    """Our parameter shapes for ``cfg`` (with ``task``'s head), from the model built on ``meta``."""
    with torch.device("meta"):
        model = build_model(cfg, tensor_parallel_size=tensor_parallel_size, task=task)
    return {k: v.shape for k, v in model.state_dict().items()}


def check_saved_tokenizer(tokenizer: Tokenizer, folder: Path) -> None:
    """The tokenizer loaded back from ``folder`` (where ``tokenizer`` was just saved) gives the same ids
    on the fidelity probe battery; :class:`~toolkit.tokenization.fidelity.TokenizerFidelityError` if not."""
    check_same(tokenizer, load_tokenizer(str(folder)), source_name="the tokenizer converted",
               result_name=f"its copy saved in {folder}").raise_if_failed()


def check_new_run_dir(out: str | Path) -> None:
    """A one-line :class:`CheckpointError` when ``out`` already holds a run (``config.yaml`` or
    ``checkpoints/``): an import would replace its ``step_0``, repoint ``latest`` and overwrite its
    config."""
    out = Path(out)
    held = [name for name in ("config.yaml", "checkpoints") if (out / name).exists() or (out / name).is_symlink()]
    if held:
        raise CheckpointError(f"{out} already holds {' and '.join(held)} (a megaforge run); an import writes a new "
                              "run directory and would overwrite it — pick an empty or new output folder")


def write_megaforge_folder(out: str | Path, mcfg: ModelConfig, steps: list[Step], source: TensorSource,
                           ctx: MappingContext, *, tokenizer, dtype: str | torch.dtype | None, trainer_state: dict,
                           where: str, name: str = "imported", description: str = "",
                           tensor_parallel_size: int = 1, task: TaskConfig | None = None) -> Path:
    """Write ``out/config.yaml``, ``out/tokenizer/`` and ``out/checkpoints/step_0`` (+ ``latest``),
    producing our tensors from ``source`` through ``steps`` one at a time. ``ctx.padded_vocab_size``
    must be the padding for ``tensor_parallel_size``. ``task``: the task head the tensors include (an
    imported fine-tuned model), written as the folder's ``task`` section. An ``out`` that already holds
    a run is refused (:func:`check_new_run_dir`)."""
    if tensor_parallel_size < 1:
        raise CheckpointError(f"tensor_parallel_size must be at least 1, got {tensor_parallel_size}")
    check_new_run_dir(out)
    cfg = RunConfig(name=name or "imported", description=description, model=mcfg,
                    parallel=ParallelConfig(tensor_model_parallel_size=tensor_parallel_size))
    if task is not None:
        cfg.task = task
    out = Path(out)
    if tokenizer is not None and tokenizer.vocab_size > mcfg.vocab_size:
        raise CheckpointError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary is "
                              f"{mcfg.vocab_size}; they do not belong together")
    try:
        validate(cfg)
    except MegaforgeError as e:
        raise CheckpointError(f"{where}: its config is not a valid megaforge model: {e}") from None
    items = plan_metas(steps, source, ctx, dtype=parse_dtype(dtype), expected_src=None,
                       expected_dst=expected_shapes(mcfg, tensor_parallel_size, task=task), where=where)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        tokenizer.save(out / "tokenizer")
        cfg.tokenizer.path = str((out / "tokenizer").resolve())
        check_saved_tokenizer(tokenizer, out / "tokenizer")
    write_dcp_checkpoint(out / "checkpoints", 0, dict(items), StepCache(steps, source, ctx), trainer_state)
    save_config(cfg, out / "config.yaml")
    return out
