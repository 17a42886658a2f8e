"""Assemble a training run from a :class:`~toolkit.config.RunConfig` and start it.

This is what ``megaforge train`` calls; Python users can call :func:`train` directly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from toolkit.config import ModelConfig, RunConfig, save_config, validate
from toolkit.convert.init_from import adopt_source_config, adopt_source_task, resolve_init_from, source_config
from toolkit.convert.lora_weights import record_lora_base
from toolkit.data.corpus import corpus_prefix
from toolkit.errors import ConfigError, first_line
from toolkit.generation import generate_text
from toolkit.models.build import build_meta_model, init_rules, materialize
from toolkit.optim import build_optimizer
from toolkit.parallel import dist_env, validate_parallel
from toolkit.parallel.runtime import ParallelRuntime, setup
from toolkit.registry import get_spec
from toolkit.tokenization import Tokenizer, load_tokenizer
from toolkit.training import finetune
from toolkit.training.cpu_placement import place_cpu_run
from toolkit.training.host_memory import apply_reuse_host_memory
from toolkit.training.metrics import flops_per_token
from toolkit.training.trainer import PartOptimizers, Trainer, TrainResult

logger = logging.getLogger(__name__)


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``trainer.device`` → this process's device (under torchrun, GPU ``LOCAL_RANK``)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")
    if name == "cuda" and dist_env().world_size > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return device
    return torch.device(name)


def run_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.trainer.run_dir or os.path.join("runs", cfg.name))


def setup_tokenizer(cfg: RunConfig) -> Tokenizer:
    """Load the tokenizer and fix ``model.vocab_size`` from it (checking an explicit size fits)."""
    name = cfg.tokenizer.path or get_spec(cfg.model.family).default_tokenizer
    tokenizer = load_tokenizer(name, cfg.tokenizer.type)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({tokenizer.vocab_size} ids from {name}); raise it or unset it")
    return tokenizer


def tokenizer_key(folder: Path) -> str:
    """A short content hash of saved tokenizer files (names cached corpora built with it)."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


#: model settings that change how the model computes, not its weights: a run resumes with them changed
COMPUTE_ONLY = ("recompute_granularity", "fused_cross_entropy", "fused_qkv", "attention_backend")


def model_differences(saved: Any, model: ModelConfig) -> list[str]:
    """The ``model.*`` keys (sorted) in which a run's saved config differs from ``model``, leaving out
    :data:`COMPUTE_ONLY`; a key the saved config lacks (written by an older megaforge) counts as its default."""
    defaults = ModelConfig()
    return sorted(f.name for f in dataclasses.fields(ModelConfig) if f.name not in COMPUTE_ONLY
                  and saved.get(f.name, getattr(defaults, f.name)) != getattr(model, f.name))


def prepare_run_dir(cfg: RunConfig, tokenizer: Tokenizer) -> Path:
    """Create the run directory; refuse to resume a run whose model differs; save config and tokenizer."""
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / "config.yaml"
    if saved.exists() and (run_dir / "checkpoints" / "latest").exists():
        old = OmegaConf.load(saved).get("model")
        diff = model_differences(old, cfg.model) if old is not None else []
        if diff:
            k = diff[0]
            raise ConfigError(f"{run_dir} holds a run with a different model (model.{k}: {old.get(k)} "
                              f"there, {getattr(cfg.model, k)} now); use another trainer.run_dir")
    save_config(cfg, saved)
    tokenizer.save(run_dir / "tokenizer")
    return run_dir


def build_datasets(cfg: RunConfig, tokenizer: Tokenizer, run_dir: Path):
    prefixes = list(cfg.data.data_prefix) or [corpus_prefix(cfg.data.corpus, tokenizer,
                                                            tokenizer_key(run_dir / "tokenizer"))]
    t = cfg.trainer
    evals = (t.max_steps // t.eval_interval + 1) if t.eval_interval > 0 else 0
    num_samples = (t.max_steps * t.global_batch_size, max(1, evals) * t.eval_iters * t.global_batch_size,
                   t.eval_iters * t.global_batch_size)
    train, valid, _ = get_spec(cfg.model.family).datasets(cfg, tokenizer, prefixes, num_samples)
    if train is None:
        raise ConfigError(f"data.splits_string={cfg.data.splits_string!r} leaves no training documents")
    return train, valid


def train(cfg: RunConfig) -> TrainResult:
    """Train ``cfg`` in this process, or as one rank of a ``torchrun`` job (resuming from the run
    directory's latest checkpoint)."""
    if cfg.trainer.dry_run:  # the CLI dispatches it; from Python, call the dry run itself
        raise ConfigError("trainer.dry_run=true: call toolkit.training.dry_run.dry_run(cfg) (or `megaforge train "
                          "RECIPE --dry-run`) instead of train(cfg)")
    env = dist_env()
    fresh_head = _resolve_init_from(cfg) if cfg.checkpoint.init_from else False
    validate_parallel(cfg, env.world_size)  # before any collective: a bad layout is one line, exit 2
    t = cfg.trainer
    place_cpu_run(t.num_threads, t.pin_cores, t.device)  # threads per rank; CPU runs: each rank on its own cores
    apply_reuse_host_memory(t.reuse_host_memory)  # freed host memory stays in the heap for the next step
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    runtime = setup(cfg, pick_device(t.device, env.local_rank))  # a world of size 1 without torchrun
    try:
        return _train(cfg, runtime, fresh_head=fresh_head)
    except BaseException as e:
        if runtime.dims.world_size > 1:
            cause = e  # the root of a chain (the pipeline schedule wraps a stage's error in its own)
            while cause.__cause__ is not None:
                cause = cause.__cause__
            logger.error(f"megaforge: rank {runtime.rank} failed: {type(cause).__name__}: {first_line(cause)}")
        raise
    finally:
        runtime.close()


def _resolve_init_from(cfg: RunConfig) -> bool:
    """Import ``checkpoint.init_from`` if needed, take its architecture, tokenizer (and a fine-tuned
    source's labels) into ``cfg`` and point ``checkpoint.init_from`` at the megaforge checkpoint the
    trainer loads. Returns whether the source's task head is left out of the load."""
    spec = cfg.checkpoint.init_from
    source_dir, step = resolve_init_from(spec)
    src = source_config(source_dir)  # read once for both
    changed = adopt_source_config(cfg, source_dir, src)
    fresh_head = adopt_source_task(cfg, source_dir, src)
    validate(cfg)
    record_lora_base(cfg, spec)
    cfg.checkpoint.init_from = str(step.resolve())  # absolute: a LoRA run's base is reloaded from it later
    took = f"; its architecture replaces model.{{{', '.join(changed)}}}" if changed else ""
    logger.info(f"init_from: {spec} → {step} (tokenizer {cfg.tokenizer.path}){took}")
    return fresh_head


def build_model_parts(cfg: RunConfig, runtime: ParallelRuntime, *, materialize_parts: bool = True,
                      meta_model: torch.nn.Module | None = None):
    """This rank's model parts, parallelized, and the pipeline driving them (None when pp = 1).

    Sharded initialization: the model is built on ``meta``, split into this rank's pipeline stages
    and parallelized there (TP/SP → recompute → FSDP2), then only what this rank holds is
    materialized and initialized, each parameter drawn whole from a generator keyed by its name and
    ``trainer.seed`` (so every layout starts bitwise equal to one process); set-up memory is this
    rank's shard plus the largest single parameter. A family without init rules (a plugin with only
    ``init_weights``) is materialized whole first, as before. Returns (parts, pipeline, parameter
    count of the whole model without positions). ``materialize_parts=False`` leaves everything on
    ``meta`` and ``meta_model`` is the whole model already built there, which a pipeline split leaves
    as it is (the dry run builds it once for every rank it simulates: ``toolkit.training.dry_run``).
    """
    spec = get_spec(cfg.model.family)
    model = meta_model if meta_model is not None else build_meta_model(cfg)
    n_params = model.num_parameters(exclude_positions=True)
    rules = init_rules(model)
    if not materialize_parts:
        init = None
    elif rules is None:
        model.to_empty(device=runtime.device)
        model.init_weights(cfg.trainer.seed)
        init = None
    else:
        def init(part):
            return materialize(part, rules, cfg.trainer.seed, runtime.device)
    recompute = cfg.model.recompute_granularity
    if runtime.dims.pp > 1:
        pipeline = runtime.build_pipeline(model, spec.pipeline_split, spec.pipeline_objective,
                                          spec.tensor_parallel, recompute, materialize=init)
        if runtime.dims.dp == 1 or cfg.parallel.data_parallel_sharding != "full":
            _fuse_last_stage_loss(pipeline)  # (FSDP full sharding reshards the output weight after forward)
        return pipeline.parts, pipeline, n_params
    runtime.parallelize(model, spec.tensor_parallel, recompute, materialize=init)
    return [model], None, n_params


def _fuse_last_stage_loss(pipeline) -> None:
    """A last stage whose model fuses its loss (GPT with ``model.fused_cross_entropy``) returns its final
    hidden states, and the pipeline's loss is the stage's own (output layer + cross-entropy over token
    chunks), so the last stage never holds whole logits. The loss runs after the stage's forward, so the
    output weight must still be gathered then: not under ``data_parallel_sharding=full`` with dp > 1
    (FSDP2 reshards it after forward), where the last stage keeps returning logits."""
    last = pipeline.parts[-1] if pipeline.has_last else None
    if last is not None and getattr(last, "fuses_loss", False):
        last.hidden_output = True
        pipeline.objective = dataclasses.replace(pipeline.objective, loss=last.loss)


def _train(cfg: RunConfig, runtime: ParallelRuntime, *, fresh_head: bool = False) -> TrainResult:
    t = cfg.trainer
    spec = get_spec(cfg.model.family)
    tokenizer = setup_tokenizer(cfg)
    task = finetune.prepare(cfg, tokenizer) if cfg.task.type != "none" else None  # fixes task.labels
    # rank 0 writes the run directory and builds index caches; the others then read them
    if runtime.is_logging_rank:
        run_dir = prepare_run_dir(cfg, tokenizer)
        train_ds, valid_ds = (task.train, task.valid) if task else build_datasets(cfg, tokenizer, run_dir)
    runtime.barrier()
    if not runtime.is_logging_rank:
        run_dir = run_dir_of(cfg)
        train_ds, valid_ds = (task.train, task.valid) if task else build_datasets(cfg, tokenizer, run_dir)
    parts, pipeline, n_params = build_model_parts(cfg, runtime)
    optimizers = PartOptimizers([build_optimizer(part, cfg.optim) for part in parts])
    objective = spec.task_objectives[cfg.task.type] if task else spec.objective
    if t.compile and t.compile_scope == "layers":
        compile_layers(parts)
    elif t.compile:  # the trainer keeps the plain module: checkpoints and clipping see single-device names
        objective = _compiled_objective(objective, torch.compile(parts[0]))
    trainer = Trainer(cfg=cfg, model_parts=parts, optimizers=optimizers, objective=objective,
                      train_dataset=train_ds, valid_dataset=valid_ds, runtime=runtime, run_dir=run_dir,
                      flops_per_token=flops_per_token(cfg.model, n_params),
                      tokens_per_sample=spec.tokens_per_sample(cfg), pipeline=pipeline,
                      evaluator=finetune.evaluator(cfg, task, runtime.device) if task else None,
                      metric_for_best=finetune.main_metric(cfg) if task else None, fresh_head=fresh_head)
    if runtime.is_logging_rank:
        where = (f"{runtime.dims.world_size} processes, layout {runtime.layout}" if runtime.dims.world_size > 1
                 else runtime.device)
        if pipeline is not None:
            where = f"{where}, {pipeline.schedule} schedule over {pipeline.num_stages} stages"
        logger.info(f"megaforge: training {cfg.name} ({n_params / 1e6:.2f}M parameters) on {where} → {run_dir}")
    result = trainer.fit()
    if result.preempted:
        return result
    if t.sample_prompt and runtime.dims.tp > 1:
        if runtime.is_logging_rank:
            logger.info("megaforge: end-of-run sample skipped under tensor parallelism; run "
                        "`megaforge generate RUN_DIR`")
    elif t.sample_prompt and cfg.task.type == "none":
        # under torchrun every rank generates in lockstep (data-parallel replicas alike; a pipeline
        # passes hidden states stage to stage); rank 0 prints
        text = generate_text(pipeline if pipeline is not None else parts[0], tokenizer, t.sample_prompt,
                             max_new_tokens=t.sample_tokens, device=runtime.device, temperature=0.8, top_k=40,
                             seed=t.seed)
        if runtime.is_logging_rank:
            logger.info(f"\nsample> {t.sample_prompt}{text}\n")
    return result


def compile_layers(parts: list[nn.Module]) -> int:
    """``trainer.compile_scope=layers``: compile each transformer layer in place (``nn.Module.compile``:
    the module, its parameter names and any FSDP2/TP wrapping stay as they are); layers of one shape
    reuse one compiled graph, so compile time does not grow with depth. Returns how many were compiled."""
    layers = [layer for part in parts for stack in _layer_stacks(part) for layer in stack.values()]
    for layer in layers:
        layer.compile()
    return len(layers)


def _layer_stacks(part: nn.Module) -> list[nn.ModuleDict]:
    """The ``ModuleDict``s of transformer layers in a model part (``layers``; T5: its encoder's and decoder's)."""
    return [m.layers for m in part.modules() if isinstance(getattr(m, "layers", None), nn.ModuleDict)]


def _compiled_objective(objective, compiled_model):
    """Run the family objective through the compiled module while the trainer keeps the plain one."""
    return lambda _model, batch: objective(compiled_model, batch)
