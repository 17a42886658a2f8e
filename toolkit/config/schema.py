"""The run configuration's schema: one dataclass per section of a recipe, each field with its default
and a comment, the allowed values of the string choices, and every dotted key.

OmegaConf builds structured configs from these dataclasses (:mod:`toolkit.config.loading`); recipes
and overrides are merged onto them, so a key that is not here is an error.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Optional


@dataclass
class ModelConfig:
    family: str = "gpt"  # model family registered in toolkit.registry: gpt | bert | t5 | a plugin's
    num_layers: int = 2  # transformer layers (encoder layers for T5)
    hidden_size: int = 64  # model width
    ffn_hidden_size: Optional[int] = None  # MLP inner width; None → 4 × hidden_size
    num_attention_heads: int = 4  # query heads
    num_query_groups: Optional[int] = None  # key/value heads (grouped-query attention); None → heads
    kv_channels: Optional[int] = None  # per-head width; None → hidden_size / heads
    seq_length: int = 128  # training sequence length (encoder length for T5)
    max_position_embeddings: Optional[int] = None  # learned-position table size; None → seq_length
    position_embedding_type: str = "learned_absolute"  # learned_absolute | rope | relative | none
    rotary_base: float = 10000.0  # RoPE base frequency
    normalization: str = "LayerNorm"  # LayerNorm | RMSNorm
    layernorm_epsilon: float = 1e-5  # epsilon of every norm
    layernorm_position: str = "pre"  # pre (GPT, Megatron-BERT) | post (original BERT)
    activation: str = "gelu"  # gelu | gelu_tanh | relu | swiglu | geglu
    add_bias_linear: bool = True  # biases in attention and MLP linears
    share_embeddings_and_output_weights: bool = True  # tie the output layer to the word embeddings
    hidden_dropout: float = 0.1  # dropout on residual branches and embeddings
    attention_dropout: float = 0.1  # dropout on attention probabilities
    init_method_std: float = 0.02  # std of the normal init; output projections use std/sqrt(2L)
    make_vocab_size_divisible_by: int = 128  # pad the vocabulary to a multiple of this (× tp)
    vocab_size: Optional[int] = None  # true vocabulary size; None → from the tokenizer
    recompute_granularity: str = "none"  # activation recompute: none | selective | full
    fused_cross_entropy: bool = False  # GPT: output layer + loss over token chunks, logits never whole (less memory)
    fused_qkv: bool = False  # self-attention q, k, v as one matmul over their concatenated weights (names unchanged)
    attention_backend: str = "auto"  # attention kernel: auto (PyTorch picks) | flash | cudnn | efficient | math
    # BERT family
    num_tokentypes: int = 2  # token-type (segment) vocabulary; 0 disables token-type embeddings
    bert_binary_head: bool = True  # sentence-pair head (NSP / sentence order)
    # T5 family
    num_decoder_layers: Optional[int] = None  # decoder layers; None → num_layers
    decoder_seq_length: int = 32  # target length for span corruption
    relative_attention_num_buckets: int = 32  # T5 relative position buckets
    relative_attention_max_distance: int = 128  # T5 relative position max distance


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1  # tensor-parallel ranks (split heads, MLP, vocabulary)
    pipeline_model_parallel_size: int = 1  # pipeline stages
    virtual_pipeline_model_parallel_size: Optional[int] = None  # model chunks per stage (interleaved)
    sequence_parallel: bool = False  # shard norms/dropout activations along the sequence (needs tp > 1)
    data_parallel_sharding: str = "optimizer_and_grads"  # full | optimizer_and_grads | none (replicated)
    pipeline_schedule: str = "1f1b"  # 1f1b | interleaved_1f1b | gpipe
    timeout_seconds: int = 120  # collective timeout: a dead rank ends the job after this long


@dataclass
class DataConfig:
    data_prefix: List[Any] = field(default_factory=list)  # dataset prefixes, optionally weighted: [0.7, a, 0.3, b] or "0.7 a 0.3 b"
    corpus: str = "english"  # shipped sample corpus used when data_prefix is empty: english | clinical
    splits_string: str = "969,30,1"  # train,valid,test proportions of documents
    index_cache_dir: Optional[str] = None  # where sample indices are cached; None → beside the data
    num_workers: int = 0  # data-loader worker processes
    # BERT family
    masked_lm_prob: float = 0.15  # fraction of tokens masked
    short_seq_prob: float = 0.1  # probability of a shorter sample
    whole_word_masking: bool = False  # mask whole WordPiece words
    bert_pair_task: str = "sop"  # sop (sentence-order prediction, as Megatron-BERT) | nsp (next sentence, as original BERT)
    # T5 family
    noise_density: float = 0.15  # fraction of tokens corrupted into spans
    mean_noise_span_length: float = 3.0  # mean corrupted span length


@dataclass
class TokenizerConfig:
    path: Optional[str] = None  # tokenizer file/folder, or the name of a shipped one; None → the recipe's default
    type: str = "auto"  # auto | sentencepiece | huggingface


@dataclass
class OptimConfig:
    name: str = "adamw"  # optimizer (adamw)
    lr: float = 3e-4  # peak learning rate
    min_lr: float = 3e-5  # learning rate at the end of decay
    weight_decay: float = 0.1  # decoupled weight decay (not applied to biases and norms)
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.95  # AdamW beta2
    adam_eps: float = 1e-8  # AdamW epsilon
    clip_grad: float = 1.0  # global gradient-norm clip; 0 disables
    lr_decay_style: str = "cosine"  # cosine | linear | constant
    lr_warmup_steps: int = 0  # linear warmup steps
    lr_decay_steps: Optional[int] = None  # steps to decay over; None → trainer.max_steps
    implementation: str = "auto"  # AdamW kernels: fused | foreach | auto (fused on CPU and CUDA)


@dataclass
class TrainerConfig:
    max_steps: int = 100  # optimizer steps (the schedule and data order are planned for this many)
    exit_interval: Optional[int] = None  # save and exit when step % exit_interval == 0 (Megatron's --exit-interval)
    exit_signal: Optional[str] = None  # besides SIGTERM, a signal that saves and exits (e.g. SIGUSR1 for sbatch --signal)
    max_skipped_steps: int = 3  # stop after this many consecutive steps with a non-finite loss or gradient norm
    micro_batch_size: int = 4  # samples per forward/backward on one rank
    global_batch_size: int = 8  # samples per optimizer step over all data-parallel ranks
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 uses dynamic loss scaling)
    initial_loss_scale: float = 65536.0  # fp16 only: starting loss scale
    seed: int = 1234  # seed for init, data order and dropout
    deterministic: bool = False  # force deterministic kernels (torch.use_deterministic_algorithms)
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile the model
    compile_scope: str = "model"  # with compile: model (one graph) | layers (each transformer layer, torchtitan's way)
    run_dir: Optional[str] = None  # run directory; None → runs/<recipe>
    log_interval: int = 1  # steps between metrics lines
    eval_interval: int = 50  # steps between validation passes; 0 disables
    eval_iters: int = 4  # validation micro-batches per pass
    sample_prompt: Optional[str] = None  # text to continue with the trained model at the end
    sample_tokens: int = 40  # tokens generated for the end-of-run sample
    num_threads: Optional[int] = None  # CPU threads for torch; None → on CPU the physical cores of this rank's share
    pin_cores: Optional[bool] = None  # CPU: pin each local rank to its own share of the cores; None → when ranks share a machine
    reuse_host_memory: bool = False  # glibc malloc keeps freed memory in its heap for reuse (CPU: no page faults per step)
    dry_run: bool = False  # apply the parallel plans on meta for a simulated world, report per-rank shards, exit
    dry_run_world_size: Optional[int] = None  # dry run: simulated processes; None → tp × pp (one data-parallel replica)
    dry_run_ranks: List[int] = field(default_factory=list)  # dry run: ranks reported; [] → first/middle/last stage × first/last tp


@dataclass
class CheckpointConfig:
    save_interval: int = 50  # steps between checkpoints (and one at the end); 0 → only at the end
    keep_last: int = 2  # complete checkpoints kept
    resume: bool = True  # continue from run_dir/checkpoints/latest when present
    init_from: Optional[str] = None  # seed a new run: megaforge run/checkpoint, HF folder/Hub id, Megatron-LM checkpoint
    verify_hashes: bool = True  # check each file's SHA-256 before loading (sizes are always checked); off for huge runs


@dataclass
class TaskConfig:
    type: str = "none"  # none (pretraining) | token_classification | sequence_classification | regression | sft | seq2seq
    train_file: Optional[str] = None  # training data: a file, a BRAT folder, or a shipped task NAME:SPLIT
    valid_file: Optional[str] = None  # validation data (metrics every trainer.eval_interval, checkpoints/best)
    test_file: Optional[str] = None  # test data (megaforge evaluate RUN --split test)
    format: Optional[str] = None  # conll | jsonl_tokens | jsonl_entities | brat | table; None → detected per file
    stride: int = 32  # sub-tokens shared by two windows of a document longer than model.seq_length
    metric_for_best: Optional[str] = None  # validation metric kept best as checkpoints/best; None → the task's main one
    classifier_dropout: Optional[float] = None  # dropout before the task head; None → model.hidden_dropout
    labels: List[str] = field(default_factory=list)  # label names in id order; set from the training file
    chat_template: Optional[str] = None  # sft: Jinja2 chat template (text or a file); None → the tokenizer's, else the default
    packing: bool = False  # sft: pack several samples per training sequence (attention and positions kept per sample)
    input_field: str = "input"  # seq2seq: the jsonl key holding the encoder input text
    target_field: str = "target"  # seq2seq: the jsonl key holding the target text (trained, and scored by evaluate)


@dataclass
class PeftConfig:
    method: str = "none"  # none (train every weight) | lora (frozen base, low-rank adapters; heads stay trainable)
    rank: int = 8  # lora: r, the inner size of each adapter (A: [r, in], B: [out, r])
    alpha: float = 16.0  # lora: the adapter output is scaled by alpha / rank
    dropout: float = 0.0  # lora: dropout on the adapter's input
    target_modules: List[str] = field(default_factory=lambda: ["q", "v"])  # lora: linears to adapt, by megaforge
    #   name (q k v out fc1 gate fc2) or the family's HF name (q_proj ... down_proj, c_attn c_proj c_fc, query key value dense)
    base_model_name_or_path: Optional[str] = None  # `convert --to peft`: the HF base the adapter names; None → the
    #   HF folder/id checkpoint.init_from came from, else an HF export of the base written beside the adapter


@dataclass
class WandbConfig:
    enabled: bool = True  # log to Weights & Biases
    mode: str = "offline"  # offline | online
    project: str = "megaforge"  # wandb project
    entity: Optional[str] = None  # wandb entity (team)
    name: Optional[str] = None  # run name; None → run directory name


@dataclass
class TensorBoardConfig:
    enabled: bool = False  # write the metrics.jsonl scalars as TensorBoard events (rank 0)
    dir: Optional[str] = None  # event-file folder; None → RUN_DIR/tensorboard


@dataclass
class LoggingConfig:
    progress_bar: bool = True  # show a progress bar on rank 0
    plot: bool = True  # write loss.png at the end
    peak_tflops: Optional[float] = None  # per-device peak for MFU; None → looked up for the device
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)


@dataclass
class RunConfig:
    name: str = "run"  # recipe name
    description: str = ""  # one line for `megaforge recipes`
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)


CHOICES = {  # model.family is checked against the registry (built-in families and plugins)
    "model.position_embedding_type": ("learned_absolute", "rope", "relative", "none"),
    "model.normalization": ("LayerNorm", "RMSNorm"),
    "model.layernorm_position": ("pre", "post"),
    "model.activation": ("gelu", "gelu_tanh", "relu", "swiglu", "geglu"),
    "model.recompute_granularity": ("none", "selective", "full"),
    "model.attention_backend": ("auto", "flash", "cudnn", "efficient", "math"),
    "parallel.data_parallel_sharding": ("full", "optimizer_and_grads", "none"),
    "parallel.pipeline_schedule": ("1f1b", "interleaved_1f1b", "gpipe"),
    "data.corpus": ("english", "clinical"),
    "data.bert_pair_task": ("sop", "nsp"),
    "tokenizer.type": ("auto", "sentencepiece", "huggingface"),
    "optim.name": ("adamw",),
    "optim.lr_decay_style": ("cosine", "linear", "constant"),
    "optim.implementation": ("auto", "fused", "foreach"),
    "trainer.precision": ("fp32", "bf16", "fp16"),
    "trainer.device": ("auto", "cpu", "cuda"),
    "trainer.compile_scope": ("model", "layers"),
    "logging.wandb.mode": ("offline", "online"),
    "peft.method": ("none", "lora"),
    "task.type": ("none", "token_classification", "sequence_classification", "regression", "sft", "seq2seq"),
}


def _schema_keys(cls=RunConfig, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of the schema → its dataclass field type (nested sections included)."""
    keys: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        full = f"{prefix}{f.name}"
        keys[full] = f.type
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys.update(_schema_keys(type(default), full + "."))
    return keys


SCHEMA_KEYS = _schema_keys()
