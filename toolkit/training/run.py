"""Assemble a training run from a :class:`~toolkit.config.RunConfig` and start it.

This is what ``megaforge train`` calls; Python users can call :func:`train` directly.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from toolkit.config import RunConfig, save_config, to_yaml
from toolkit.errors import ConfigError
from toolkit.registry import build_model
from toolkit.tokenization import Tokenizer, load_tokenizer
from toolkit.training.metrics import flops_per_token
from toolkit.training.families import family
from toolkit.training.optim import build_optimizer
from toolkit.training.trainer import Trainer, TrainResult

def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")
    return torch.device(name)


def run_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.trainer.run_dir or os.path.join("runs", cfg.name))


def setup_tokenizer(cfg: RunConfig) -> Tokenizer:
    """Load the tokenizer and fix ``model.vocab_size`` from it (checking an explicit size fits)."""
    name = cfg.tokenizer.path or family(cfg.model.family).default_tokenizer
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


def prepare_run_dir(cfg: RunConfig, tokenizer: Tokenizer) -> Path:
    """Create the run directory; refuse to resume a run whose model differs; save config and tokenizer."""
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / "config.yaml"
    if saved.exists() and (run_dir / "checkpoints" / "latest").exists():
        old = OmegaConf.load(saved).get("model")
        new = OmegaConf.structured(cfg).model
        if old is not None and OmegaConf.to_container(old) != OmegaConf.to_container(new):
            diff = sorted(k for k in new if old.get(k) != new.get(k))
            raise ConfigError(f"{run_dir} holds a run with a different model (model.{diff[0]}: {old.get(diff[0])} "
                              f"there, {new.get(diff[0])} now); use another trainer.run_dir")
    save_config(cfg, saved)
    tokenizer.save(run_dir / "tokenizer")
    return run_dir


def build_datasets(cfg: RunConfig, tokenizer: Tokenizer, run_dir: Path):
    from toolkit.data.corpus import corpus_prefix

    prefixes = list(cfg.data.data_prefix) or [corpus_prefix(cfg.data.corpus, tokenizer,
                                                            tokenizer_key(run_dir / "tokenizer"))]
    t = cfg.trainer
    evals = (t.max_steps // t.eval_interval + 1) if t.eval_interval > 0 else 0
    num_samples = (t.max_steps * t.global_batch_size, max(1, evals) * t.eval_iters * t.global_batch_size,
                   t.eval_iters * t.global_batch_size)
    train, valid, _ = family(cfg.model.family).datasets(cfg, tokenizer, prefixes, num_samples)
    if train is None:
        raise ConfigError(f"data.splits_string={cfg.data.splits_string!r} leaves no training documents")
    return train, valid


def build_initialized_model(cfg: RunConfig, device: torch.device) -> torch.nn.Module:
    """Build on ``meta``, materialize on ``device``, initialize from ``trainer.seed``.

    The vocabulary is padded for ``parallel.tensor_model_parallel_size`` so a run's checkpoints
    load into the single-device model whatever layout wrote them.
    """
    with torch.device("meta"):
        model = build_model(cfg.model, tensor_parallel_size=cfg.parallel.tensor_model_parallel_size)
    model.to_empty(device=device)
    model.init_weights(cfg.trainer.seed)
    return model


def train(cfg: RunConfig) -> TrainResult:
    """Train ``cfg`` in this process, or as one rank of a ``torchrun`` job (resuming from the run
    directory's latest checkpoint)."""
    from toolkit.parallel import dist_env, validate_parallel

    env = dist_env()
    if cfg.checkpoint.init_from:
        _resolve_init_from(cfg, log=print if env.rank == 0 else None)
    validate_parallel(cfg, env.world_size)  # before any collective: a bad layout is one line, exit 2
    if cfg.parallel.pipeline_model_parallel_size > 1 and family(cfg.model.family).pipeline is None:
        raise ConfigError(f"model.family={cfg.model.family} has no pipeline objective (parallel."
                          f"pipeline_model_parallel_size={cfg.parallel.pipeline_model_parallel_size}); use tensor "
                          "or data parallelism")
    t = cfg.trainer
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    device = pick_device(t.device)
    if env.world_size == 1:
        return _train(cfg, device, None)
    from toolkit.parallel.mesh import destroy
    from toolkit.parallel.runtime import setup

    if device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    runtime = setup(cfg, device)
    try:
        return _train(cfg, device, runtime)
    except BaseException as e:
        print(f"megaforge: rank {runtime.rank} failed: {type(e).__name__}: {str(e).strip().splitlines()[:1]}",
              file=sys.stderr, flush=True)
        raise
    finally:
        destroy()


def _resolve_init_from(cfg: RunConfig, log) -> None:
    """Import ``checkpoint.init_from`` if needed, take its architecture and tokenizer into ``cfg`` and
    point ``checkpoint.init_from`` at the megaforge checkpoint the trainer loads."""
    from toolkit.checkpoint.init_from import adopt_source_config, resolve_init_from
    from toolkit.config import validate

    spec = cfg.checkpoint.init_from
    source_dir, step = resolve_init_from(spec, log=log)
    changed = adopt_source_config(cfg, source_dir)
    validate(cfg)
    cfg.checkpoint.init_from = str(step)
    if log:
        took = f"; its architecture replaces model.{{{', '.join(changed)}}}" if changed else ""
        log(f"init_from: {spec} → {step} (tokenizer {cfg.tokenizer.path}){took}")


def _train(cfg: RunConfig, device: torch.device, runtime) -> TrainResult:
    import torch.distributed as dist

    t = cfg.trainer
    spec = family(cfg.model.family)
    tokenizer = setup_tokenizer(cfg)
    logging_rank = runtime is None or runtime.is_logging_rank
    if runtime is None:
        run_dir = prepare_run_dir(cfg, tokenizer)
        train_ds, valid_ds = build_datasets(cfg, tokenizer, run_dir)
    else:  # rank 0 writes the run directory and builds index caches; the others then read them
        if logging_rank:
            run_dir = prepare_run_dir(cfg, tokenizer)
            train_ds, valid_ds = build_datasets(cfg, tokenizer, run_dir)
        dist.barrier()
        if not logging_rank:
            run_dir = run_dir_of(cfg)
            train_ds, valid_ds = build_datasets(cfg, tokenizer, run_dir)
    model = build_initialized_model(cfg, device)
    n_params = model.num_parameters(exclude_positions=True)
    pipeline = None
    if runtime is not None and runtime.dims.pp > 1:
        # the full model is materialized and initialized on every rank (so init matches one process
        # exactly), then split into this rank's stages; the other stages' layers are freed here
        from toolkit.registry import pipeline_split, tensor_parallel_plan

        pipeline = runtime.build_pipeline(model, pipeline_split(cfg.model.family),
                                          tensor_parallel_plan(cfg.model.family), cfg.model.recompute_granularity)
        model = pipeline.parts
    elif runtime is not None:
        from toolkit.registry import tensor_parallel_plan

        runtime.parallelize(model, tensor_parallel_plan(cfg.model.family), cfg.model.recompute_granularity)
    elif cfg.model.recompute_granularity != "none":
        from toolkit.parallel.recompute import apply_recompute, transformer_blocks

        apply_recompute(transformer_blocks(model), cfg.model.recompute_granularity)
    if pipeline is not None:
        from toolkit.training.trainer import PartOptimizers

        optimizer = PartOptimizers([build_optimizer(part, cfg.optim) for part in model])
    else:
        optimizer = build_optimizer(model, cfg.optim)
    train_model = torch.compile(model) if t.compile else model
    trainer = Trainer(
        model=model,  # the plain module: checkpoints and clipping see single-device names
        optimizer=optimizer,
        objective=_compiled_objective(spec.objective, train_model) if t.compile else spec.objective,
        train_dataset=train_ds,
        valid_dataset=valid_ds,
        trainer_cfg=t,
        optim_cfg=cfg.optim,
        checkpoint_cfg=cfg.checkpoint,
        logging_cfg=cfg.logging,
        run_dir=run_dir,
        device=device,
        flops_per_token=flops_per_token(cfg.model, n_params),
        seq_length=spec.tokens_per_sample(cfg),
        config_dict=OmegaConf.to_container(OmegaConf.create(to_yaml(cfg))),
        layout=runtime.layout if runtime is not None else None,
        data_parallel_rank=runtime.dp_rank if runtime is not None else 0,
        data_parallel_size=runtime.dims.dp if runtime is not None else 1,
        is_logging_rank=logging_rank,
        parallel=runtime,
        pipeline=pipeline,
        pipeline_objective=spec.pipeline,
    )
    if logging_rank:
        where = f"{runtime.dims.world_size} processes, layout {runtime.layout}" if runtime is not None else device
        if pipeline is not None:
            where = f"{where}, {pipeline.schedule} schedule over {pipeline.num_stages} stages"
        print(f"megaforge: training {cfg.name} ({n_params / 1e6:.2f}M parameters) on {where} "
              f"→ {run_dir}", flush=True)
    result = trainer.fit()
    if t.sample_prompt and runtime is not None and runtime.dims.tp > 1:
        if logging_rank:
            print("megaforge: end-of-run sample skipped under tensor parallelism; run `megaforge generate RUN_DIR`",
                  flush=True)
    elif t.sample_prompt:
        from toolkit.generation import generate_text

        # under torchrun every rank generates in lockstep (data-parallel replicas alike; a pipeline
        # passes hidden states stage to stage); rank 0 prints
        text = generate_text(pipeline if pipeline is not None else model, tokenizer, t.sample_prompt,
                             max_new_tokens=t.sample_tokens, device=device, temperature=0.8, top_k=40, seed=t.seed)
        if logging_rank:
            print(f"\nsample> {t.sample_prompt}{text}\n", flush=True)
    return result


def _compiled_objective(objective, compiled_model):
    """Run the family objective through the compiled module while the trainer keeps the plain one."""
    return lambda _model, batch: objective(compiled_model, batch)
