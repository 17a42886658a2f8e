"""Training throughput: megaforge's real training step vs. Hugging Face ``GPT2LMHeadModel``, same run.

megaforge is driven through its trainer, not a hand-made loop: the run config comes from a recipe
(``toolkit.config.load_config``, with the shape flags as overrides), the model from
``toolkit.training.run.build_model_parts`` on a ``ParallelRuntime`` of one process, the optimizer
from ``toolkit.optim.build_optimizer``, ``trainer.compile`` as ``megaforge train`` applies it, and
every timed step is one ``Trainer.train_step`` call (LR schedule, autocast, forward/backward through
the family objective, loss scaling, ``Trainer._optimizer_step``: clipping through the runtime, the
AdamW step, ``zero_grad``, and the loss read back to the host). Hugging Face is a plain loop on the
same batches: ``GPT2LMHeadModel`` (SDPA attention) of the same shape, the same loss function,
autocast in the same precision, ``clip_grad_norm_(1.0)`` and AdamW with the same LR, betas, eps,
weight decay and decay/no-decay grouping (``fused=True``: the Hugging Face Trainer's default optimizer,
``adamw_torch_fused``, on CPU and CUDA alike). Both count
the whole step: host-to-device copy of the batch, forward, backward, clipping, optimizer step.

    python benchmarks/gpt_throughput.py --seq 512 --micro-batch 4 --precisions fp32 --steps 2  # CPU, 124M
    python benchmarks/gpt_throughput.py --layers 2 --hidden 128 --heads 4 --seq 64 --vocab 512   # a quick look
    python benchmarks/gpt_throughput.py --device cuda --recipe gpt-1.3b --modes eager,compiled   # GPU
    bash benchmarks/gpu_check.sh                                                                # the GPU check

Each (mode, precision) measures Hugging Face, then megaforge, one model in memory at a time, each in
a process of its own (Hugging Face's is this script again, ``--hf-worker``), so a process-wide setting
of one (megaforge's ``trainer.reuse_host_memory``: glibc malloc keeping freed memory) is not the
other's; ``--hf-reuse-host-memory`` gives Hugging Face the same setting. It prints a markdown row
per model and a ratio row megaforge / Hugging Face: tokens/s, MFU, peak memory, s/step, the warm-up
time (compilation included) and the loss of the first and last step. FLOPs per token = 6·N +
12·L·h·s with N the parameters excluding position embeddings
(the same N for both: Hugging Face gets megaforge's padded vocabulary). MFU divides by the peak
``toolkit.training.metrics.peak_flops`` gives the trainer (data sheet on known GPUs: 989 TFLOP/s
dense bf16 on H100/H200; on CPU the measured matmul peak) unless ``--peak-tflops`` is given. Peak
memory: ``torch.cuda.max_memory_allocated`` on CUDA, reset before each model is built; on CPU the
growth of the process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) above its RSS
before the model was built. Dropout is 0 unless ``--dropout`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from toolkit.config import RunConfig, load_config, model_vocab_sizes
from toolkit.models.common.loss import lm_cross_entropy
from toolkit.optim import build_optimizer, param_groups
from toolkit.parallel.runtime import setup as setup_runtime
from toolkit.registry import get_spec
from toolkit.training.host_memory import apply_reuse_host_memory, proc_status_bytes
from toolkit.training.metrics import flops_per_token, peak_flops
from toolkit.training.run import _compiled_objective, build_model_parts, compile_layers, pick_device, setup_tokenizer
from toolkit.training.trainer import PartOptimizers, Trainer

GIB = 1024**3
HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}  # GPT-2's own is gelu_new


# ---------------------------------------------------------------------------- config and batches


def run_config(args, precision: str, compiled: bool, run_dir: str) -> RunConfig:
    """The recipe with the benchmark's shape, batch, precision and compile switch, as ``megaforge
    train RECIPE key=value ...`` would build it (validated); nothing is saved or evaluated."""
    over = [f"trainer.precision={precision}", f"trainer.device={args.device}", f"trainer.compile={compiled}",
            f"trainer.run_dir={run_dir}", "trainer.eval_interval=0", "trainer.sample_prompt=null",
            "checkpoint.save_interval=0", "checkpoint.resume=false", "logging.wandb.enabled=false",
            "logging.progress_bar=false", "logging.plot=false",
            f"model.hidden_dropout={args.dropout}", f"model.attention_dropout={args.dropout}"]
    if args.peak_tflops:
        over.append(f"logging.peak_tflops={args.peak_tflops}")
    over += args.set  # megaforge-only settings, e.g. model.fused_cross_entropy=true
    for flag, key in (("layers", "num_layers"), ("hidden", "hidden_size"), ("heads", "num_attention_heads"),
                      ("vocab", "vocab_size"), ("seq", "seq_length")):
        if getattr(args, flag) is not None:
            over.append(f"model.{key}={getattr(args, flag)}")
    if args.micro_batch is not None:  # one micro-batch per optimizer step, as the Hugging Face loop does
        over += [f"trainer.micro_batch_size={args.micro_batch}", f"trainer.global_batch_size={args.micro_batch}"]
    else:
        base = load_config(args.recipe)
        over.append(f"trainer.global_batch_size={base.trainer.micro_batch_size}")
    if args.seq is not None:
        base = load_config(args.recipe)
        if (base.model.max_position_embeddings or base.model.seq_length) < args.seq:
            over.append(f"model.max_position_embeddings={args.seq}")
    cfg = load_config(args.recipe, over)
    if cfg.model.vocab_size is None:
        setup_tokenizer(cfg)  # the recipe's tokenizer fixes the vocabulary, as in `megaforge train`
    return cfg


def check_gpt2_shape(cfg: RunConfig) -> None:
    m = cfg.model
    problems = []
    if m.family != "gpt":
        problems.append(f"model.family={m.family}")
    if m.position_embedding_type != "learned_absolute":
        problems.append(f"position_embedding_type={m.position_embedding_type}")
    if m.normalization != "LayerNorm" or m.layernorm_position != "pre":
        problems.append(f"normalization={m.normalization}/{m.layernorm_position}")
    if m.activation not in HF_ACTIVATION:
        problems.append(f"activation={m.activation}")
    if not m.add_bias_linear or not m.share_embeddings_and_output_weights:
        problems.append("no biases or untied head")
    if (m.num_query_groups or m.num_attention_heads) != m.num_attention_heads:
        problems.append(f"num_query_groups={m.num_query_groups}")
    if m.kv_channels and m.kv_channels * m.num_attention_heads != m.hidden_size:
        problems.append(f"kv_channels={m.kv_channels}")
    if problems:
        sys.exit(f"gpt_throughput: recipe has no GPT2LMHeadModel equivalent ({', '.join(problems)}); "
                 "use a GPT-2-shaped recipe (gpt-tiny, gpt2-124m, gpt2-350m, gpt-1.3b)")


def make_batches(cfg: RunConfig, n: int, device: torch.device) -> list[torch.Tensor]:
    """``n`` random windows [micro_batch, seq + 1] on the host (pinned on CUDA, as the trainer's
    DataLoader gives them); each step copies its batch to the device."""
    gen = torch.Generator().manual_seed(1)
    shape = (cfg.trainer.micro_batch_size, cfg.model.seq_length + 1)
    out = [torch.randint(0, cfg.model.vocab_size, shape, generator=gen) for _ in range(n)]
    return [b.pin_memory() for b in out] if device.type == "cuda" else out


# ---------------------------------------------------------------------------- memory


class PeakMemory:
    """Peak memory of what runs inside: CUDA ``max_memory_allocated`` above what was allocated at the
    start; on CPU the peak RSS (``VmHWM``, reset at the start) above the RSS at the start."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back so RSS starts low
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM to the current RSS
        self.base = proc_status_bytes("VmRSS") or 0

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() - self.base
        return (proc_status_bytes("VmHWM") or 0) - self.base


def release(device: torch.device) -> None:
    torch._dynamo.reset()  # compiled graphs hold the model they were traced from
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- the two step functions


@dataclass
class Result:
    model: str
    step_s: float = math.nan
    warmup_s: float = math.nan
    peak_bytes: int = 0
    first_loss: float = math.nan
    last_loss: float = math.nan
    error: str = ""
    n_params: int = 0  # megaforge: parameters without position embeddings
    fpt: float = 0.0  # megaforge: training FLOPs per token
    faults: float = math.nan  # minor page faults of the model's process per timed step (its memory faulted in anew)
    info: str = ""  # a note printed under the table
    rss_trace: list = field(default_factory=list)  # --rss-trace, CPU: (RSS, peak RSS so far) in bytes after each step


#: ``--profile K``: after the timed steps, one more step of each model under ``torch.profiler``, and the
#: K ops with the most self time printed below the table (0 = off)
PROFILE_TOP = 0
#: ``--rss-trace``: read the process's RSS and peak RSS after every step (CPU), printed below the table
RSS_TRACE = False


def profile_step(device, step, batch, label: str) -> str:
    """One ``step(batch)`` under ``torch.profiler``: the ``PROFILE_TOP`` ops by self time, as text."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with profile(activities=activities) as prof:
        step(batch)
        sync(device)
    table = prof.key_averages().table(sort_by=sort, row_limit=PROFILE_TOP, max_name_column_width=48)
    return f"profile of one {label} step (top {PROFILE_TOP} by self time):\n{table}"


def minor_faults() -> int:
    """Minor page faults of this process so far (pages the kernel mapped in on first touch)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed_step(device, step, x) -> tuple[float, float, int]:
    """One ``step(x)`` timed alone (CUDA synchronised at both ends): (seconds, loss, minor page faults)."""
    sync(device)
    faults, start = minor_faults(), time.perf_counter()
    loss = float(step(x))
    sync(device)
    return time.perf_counter() - start, loss, minor_faults() - faults


RSS_AFTER_STEPS: list[tuple[int, int]] = []  # --rss-trace: this process's (RSS, peak RSS) after each step


def trace_rss(device: torch.device) -> None:
    """With ``--rss-trace`` on CPU: note the process's RSS and peak RSS (``VmRSS``, ``VmHWM``) now (a
    /proc read, microseconds: inside the timed loop, it does not move the step time)."""
    if RSS_TRACE and device.type == "cpu":
        RSS_AFTER_STEPS.append((proc_status_bytes("VmRSS") or 0, proc_status_bytes("VmHWM") or 0))


def timed(device, warmup_batches, timed_batches, step, label: str = "") -> tuple[float, float, list[float], float]:
    """Run ``step(batch) -> loss`` over the warm-up batches, then the timed ones; (warm-up s, s/step,
    losses, minor page faults per timed step).
    CUDA is synchronised before and after each region; a loss is read back only where the step itself
    does so (megaforge's ``train_step`` returns a float every step). With ``PROFILE_TOP`` one more
    step runs under the profiler afterwards (not timed) and its table is printed."""
    losses = []
    sync(device)
    start = time.perf_counter()
    for x in warmup_batches:
        losses.append(step(x))
        trace_rss(device)
    sync(device)
    warm = time.perf_counter() - start
    faults = minor_faults()
    start = time.perf_counter()
    for x in timed_batches:
        losses.append(step(x))
        trace_rss(device)
    sync(device)
    per_step = (time.perf_counter() - start) / len(timed_batches)
    faults = (minor_faults() - faults) / len(timed_batches)
    if PROFILE_TOP:
        PROFILES.append(profile_step(device, step, timed_batches[-1], label))
    return warm, per_step, [float(v) for v in losses], faults


PROFILES: list[str] = []  # the profile tables of this run, printed at the end


def megaforge_step(cfg: RunConfig, run_dir: str):
    """Build the run as ``toolkit.training.run._train`` does (one process: a world of size 1): (step
    function running ``Trainer.train_step``, runtime, parameters without positions, FLOPs per token)."""
    spec = get_spec(cfg.model.family)
    apply_reuse_host_memory(cfg.trainer.reuse_host_memory)  # as `megaforge train` does (this process is megaforge's)
    runtime = setup_runtime(cfg, pick_device(cfg.trainer.device))
    parts, pipeline, n_params = build_model_parts(cfg, runtime)
    optimizers = PartOptimizers([build_optimizer(part, cfg.optim) for part in parts])
    objective = spec.objective
    if cfg.trainer.compile and cfg.trainer.compile_scope == "layers":  # the paths of `megaforge train`
        compile_layers(parts)
    elif cfg.trainer.compile:
        objective = _compiled_objective(objective, torch.compile(parts[0]))
    fpt = flops_per_token(cfg.model, n_params)
    trainer = Trainer(cfg=cfg, model_parts=parts, optimizers=optimizers, objective=objective, train_dataset=None,
                      valid_dataset=None, runtime=runtime, run_dir=Path(run_dir), flops_per_token=fpt,
                      tokens_per_sample=spec.tokens_per_sample(cfg), pipeline=pipeline)
    for part in parts:
        part.train()
    assert trainer.num_microbatches == 1 and pipeline is None

    def step(x: torch.Tensor) -> float:
        loss, _grad_norm, _skipped = trainer.train_step(iter([{"tokens": x}]))  # the trainer's own step
        trainer.state.step += 1  # as Trainer.fit advances it (the LR schedule reads it)
        trainer.state.consumed_samples += cfg.trainer.global_batch_size
        return loss

    return step, runtime, n_params, fpt


def run_megaforge(cfg: RunConfig, batches, warmup: int, run_dir: str) -> Result:
    """Time ``Trainer.train_step`` of the run built as ``megaforge train`` builds it."""
    step, runtime, n_params, fpt = megaforge_step(cfg, run_dir)
    RSS_AFTER_STEPS.clear()
    warm, per_step, losses, faults = timed(runtime.device, batches[:warmup], batches[warmup:], step, "megaforge")
    runtime.close()
    return Result("megaforge", per_step, warm, 0, losses[0], losses[-1], n_params=n_params, fpt=fpt, faults=faults,
                  rss_trace=list(RSS_AFTER_STEPS))


def build_hf(cfg: RunConfig, padded_vocab: int, device: torch.device, activation: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    m = cfg.model
    hf_cfg = GPT2Config(vocab_size=padded_vocab, n_positions=m.max_position_embeddings or m.seq_length,
                        n_embd=m.hidden_size, n_layer=m.num_layers, n_head=m.num_attention_heads,
                        n_inner=m.ffn_hidden_size, activation_function=activation,
                        layer_norm_epsilon=m.layernorm_epsilon, initializer_range=m.init_method_std,
                        resid_pdrop=m.hidden_dropout, embd_pdrop=m.hidden_dropout, attn_pdrop=m.attention_dropout,
                        bos_token_id=min(50256, padded_vocab - 1), eos_token_id=min(50256, padded_vocab - 1),
                        use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(cfg.trainer.seed)
    with torch.device(device):
        model = GPT2LMHeadModel(hf_cfg)
    return model.float().train()


def hf_step(cfg: RunConfig, padded_vocab: int, activation: str):
    """A plain Hugging Face training step with the trainer's optimizer settings and precision: (step
    function, a note on the model)."""
    device = pick_device(cfg.trainer.device)
    model = build_hf(cfg, padded_vocab, device, activation)
    o = cfg.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.adam_beta1, o.adam_beta2),
                            eps=o.adam_eps, fused=True)
    fn = torch.compile(model) if cfg.trainer.compile else model
    params = [p for p in model.parameters() if p.requires_grad]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.trainer.precision)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext())
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.trainer.precision == "fp16")

    def step(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device, non_blocking=True)
        with autocast:
            logits = fn(input_ids=x[:, :-1], use_cache=False).logits
            loss = lm_cross_entropy(logits, x[:, 1:])
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, o.clip_grad)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    info = (f"huggingface: attention implementation {model.config._attn_implementation}, "
            f"parameters {next(model.parameters()).dtype}")
    return step, info


def hf_measurement(hf: HFProcess) -> Result:
    """The sequential Hugging Face measurement, made in its process (a failure becomes a row)."""
    try:
        reply = hf.ask(op="run")
    except HFError as e:
        return Result("huggingface", error=str(e)[:200])
    PROFILES.extend(reply["profiles"])
    return Result(**reply["result"])


def run_hf(cfg: RunConfig, batches, warmup: int, padded_vocab: int, activation: str) -> Result:
    """Time the Hugging Face step."""
    step, info = hf_step(cfg, padded_vocab, activation)
    RSS_AFTER_STEPS.clear()
    warm, per_step, losses, faults = timed(pick_device(cfg.trainer.device), batches[:warmup], batches[warmup:], step,
                                           "Hugging Face")
    return Result("huggingface", per_step, warm, 0, losses[0], losses[-1], info=info, faults=faults,
                  rss_trace=list(RSS_AFTER_STEPS))


def run_interleaved(cfg: RunConfig, hf: HFProcess, batches, warmup: int, run_dir: str) -> tuple[Result, Result]:
    """Both models in memory (Hugging Face's in its own process), their steps alternating on the same
    batches (which goes first alternates too), each step timed alone; s/step is each model's median. On
    a shared or noisy machine a slow spell then hits both, where one-model-after-the-other runs can be
    minutes apart. No peak memory."""
    device = pick_device(cfg.trainer.device)
    info = hf.ask(op="build")["info"]
    ours, runtime, n_params, fpt = megaforge_step(cfg, run_dir)

    def megaforge(i: int) -> tuple[float, float, int]:
        return timed_step(device, ours, batches[i])

    def huggingface(i: int) -> tuple[float, float, int]:
        reply = hf.ask(op="step", i=i)  # timed there, around the step alone
        return reply["s"], reply["loss"], reply["faults"]

    steps = {"huggingface": huggingface, "megaforge": megaforge}
    times: dict[str, list[float]] = {name: [] for name in steps}
    faults: dict[str, list[int]] = {name: [] for name in steps}
    losses: dict[str, list[float]] = {name: [] for name in steps}
    warm = dict.fromkeys(steps, 0.0)
    try:
        for i in range(len(batches)):
            for name in (list(steps) if i % 2 == 0 else list(steps)[::-1]):
                elapsed, loss, step_faults = steps[name](i)
                losses[name].append(loss)
                if i < warmup:
                    warm[name] += elapsed
                else:
                    times[name].append(elapsed)
                    faults[name].append(step_faults)
    finally:
        runtime.close()
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    mean_faults = {name: sum(f) / len(f) for name, f in faults.items()}
    return (Result("huggingface", median["huggingface"], warm["huggingface"], 0, losses["huggingface"][0],
                   losses["huggingface"][-1], info=info + "; interleaved with megaforge, median step",
                   faults=mean_faults["huggingface"]),
            Result("megaforge", median["megaforge"], warm["megaforge"], 0, losses["megaforge"][0],
                   losses["megaforge"][-1], n_params=n_params, fpt=fpt, faults=mean_faults["megaforge"]))


# ---------------------------------------------------------------------------- Hugging Face's process


class HFError(RuntimeError):
    """Hugging Face's process answered a request with an error (or exited)."""


class HFProcess:
    """Hugging Face's side of one row in a process of its own: this script again with ``--hf-worker
    MODE,PRECISION``, which rebuilds the row's config and batches from the same arguments and answers
    one line of JSON per request on its stdout (its own prints go to stderr). Process-wide settings
    then stay each model's own: megaforge's trainer sets glibc malloc's for its process
    (``trainer.reuse_host_memory``), Hugging Face keeps the defaults its users get
    (``--hf-reuse-host-memory`` gives it the same)."""

    def __init__(self, mode: str, precision: str):
        cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--hf-worker", f"{mode},{precision}",
               "--threads", str(torch.get_num_threads())]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise HFError(f"the Hugging Face process exited (code {self.proc.wait()}) on {request['op']}")
        reply = json.loads(line)
        if "error" in reply:
            raise HFError(reply["error"])
        return reply

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def hf_worker(args, mode: str, precision: str) -> None:
    """``--hf-worker``: serve one row's Hugging Face requests (``run``: the whole sequential measurement;
    ``build`` then ``step`` i: interleaved steps) until stdin closes."""
    channel, sys.stdout = sys.stdout, sys.stderr  # replies alone on the pipe
    if args.hf_reuse_host_memory:
        apply_reuse_host_memory(True)
    device = pick_device(args.device)
    step = None
    with tempfile.TemporaryDirectory(prefix="mf-bench-hf-") as tmp:
        cfg = run_config(args, precision, mode == "compiled", tmp)
        _, padded_vocab = model_vocab_sizes(cfg.model)
        activation = args.hf_activation or HF_ACTIVATION[cfg.model.activation]
        batches = make_batches(cfg, args.warmup + args.steps, device)
        for line in sys.stdin:
            request = json.loads(line)
            try:
                if request["op"] == "run":
                    result = measure("huggingface", device, run_hf, cfg, batches, args.warmup, padded_vocab,
                                     activation)
                    reply = {"result": asdict(result), "profiles": PROFILES}
                elif request["op"] == "build":
                    step, info = hf_step(cfg, padded_vocab, activation)
                    reply = {"info": info}
                else:  # step i
                    seconds, loss, faults = timed_step(device, step, batches[request["i"]])
                    reply = {"s": seconds, "loss": loss, "faults": faults}
            except Exception as e:  # noqa: BLE001 - the parent reports it
                reply = {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"}
            channel.write(json.dumps(reply) + "\n")
            channel.flush()


def interleaved_rows(cfg: RunConfig, hf: HFProcess, batches, warmup: int, run_dir: str) -> tuple[Result, Result]:
    """:func:`run_interleaved`; a failure of either model (e.g. out of memory) becomes a pair of rows,
    the failed model's with its error, the other's marked unmeasured, and the next row still runs."""
    try:
        return run_interleaved(cfg, hf, batches, warmup, run_dir)
    except Exception as e:  # noqa: BLE001 - reported as rows
        failed = "huggingface" if isinstance(e, HFError) else "megaforge"
        msg = str(e) if failed == "huggingface" else f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        other = "not measured: interleaved with the failed " + ("Hugging Face" if failed == "huggingface" else
                                                                "megaforge") + " step"
        rows = {failed: Result(failed, error=msg[:200])}
        rows.update({name: Result(name, error=other) for name in ("huggingface", "megaforge") if name != failed})
        return rows["huggingface"], rows["megaforge"]


def measure(name: str, device: torch.device, fn, *fn_args) -> Result:
    """``fn(*fn_args)``, one model's measurement, with its peak memory; a failure (e.g. out of memory)
    becomes a row."""
    mem = PeakMemory(device)
    mem.start()
    try:
        result = fn(*fn_args)
    except Exception as e:  # noqa: BLE001 - reported as a row, the next one still runs
        msg = (str(e).strip().splitlines() or [""])[0][:160]
        result = Result(name, error=f"{type(e).__name__}: {msg}")
    result.peak_bytes = mem.peak()
    release(device)
    return result


# ---------------------------------------------------------------------------- output


def header_lines(args, cfg: RunConfig, device: torch.device, padded_vocab: int) -> list[str]:
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel  # noqa: F401 - load the lazy modules before any measurement

    m, t = cfg.model, cfg.trainer
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU, {torch.get_num_threads()} threads, capability {torch.backends.cpu.get_cpu_capability()}")
    mem = ("torch.cuda.max_memory_allocated, reset before each model" if device.type == "cuda"
           else "growth of peak RSS (VmHWM) above the RSS before the model was built")
    return [
        f"recipe {args.recipe}: {m.num_layers} layers, {m.hidden_size} hidden, {m.num_attention_heads} heads, "
        f"vocab {m.vocab_size} (padded {padded_vocab}), seq {m.seq_length}, micro-batch {t.micro_batch_size} "
        f"(one micro-batch per step), dropout {m.hidden_dropout}/{m.attention_dropout}",
        f"device {where}; torch {torch.__version__}, transformers {transformers.__version__}",
        f"steps: {args.warmup} warm-up + {args.steps} timed per model and row; batches identical for both",
        "megaforge: Trainer.train_step (toolkit/training/trainer.py) on the run built as `megaforge train` does; "
        f"AdamW from toolkit.optim (optim.implementation={cfg.optim.implementation}); "
        "trainer.compile → torch.compile of the model (run.py)"
        + (f"; overrides: {' '.join(args.set)}" if args.set else ""),
        f"huggingface: GPT2LMHeadModel (sdpa, {args.hf_activation}), plain loop, AdamW "
        f"(fused, as the HF Trainer's default adamw_torch_fused), clip_grad_norm_ {cfg.optim.clip_grad}; "
        "in a process of its own, "
        + ("glibc malloc keeping freed memory (--hf-reuse-host-memory)" if args.hf_reuse_host_memory
           else "malloc's defaults")
        + f"; megaforge's process: trainer.reuse_host_memory={str(t.reuse_host_memory).lower()}",
        f"peak memory: {mem}",
    ]


TABLE_HEAD = ("| device | precision | mode | model | micro-batch × seq | tokens/s | MFU | peak memory | s/step "
              "| page faults/step | warm-up s | loss first → last |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def row(device: str, precision: str, mode: str, shape: str, r: Result, tokens: int, fpt: float, peak: float) -> str:
    label = {"huggingface": "Hugging Face `GPT2LMHeadModel`", "megaforge": "megaforge `Trainer.train_step`"}[r.model]
    if r.error:
        return f"| {device} | {precision} | {mode} | {label} | {shape} | failed: {r.error} | | | | | | |"
    tps = tokens / r.step_s
    return (f"| {device} | {precision} | {mode} | {label} | {shape} | {tps:,.1f} | {100 * fpt * tps / peak:.1f}% "
            f"| {f'{r.peak_bytes / GIB:.2f} GiB' if r.peak_bytes else 'n/a'} | {r.step_s:.3f} | {r.faults:,.0f} "
            f"| {r.warmup_s:.1f} "
            f"| {r.first_loss:.3f} → {r.last_loss:.3f} |")


def rss_trace_line(r: Result, label: str) -> str:
    name = {"huggingface": "Hugging Face", "megaforge": "megaforge"}[r.model]
    return f"{name}, {label}: " + " ".join(f"{rss / GIB:.2f} ({hwm / GIB:.2f})" for rss, hwm in r.rss_trace)


def ratio_row(device: str, precision: str, mode: str, shape: str, hf: Result, ours: Result) -> str:
    if hf.error or ours.error:
        return f"| {device} | {precision} | {mode} | **ratio megaforge / HF** | {shape} | n/a | | | | | | |"
    mem = f"{ours.peak_bytes / hf.peak_bytes:.2f}×" if hf.peak_bytes > 0 else ""
    return (f"| {device} | {precision} | {mode} | **ratio megaforge / HF** | {shape} | **{hf.step_s / ours.step_s:.2f}×** "
            f"| | {mem} | | | | |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--recipe", default="gpt2-124m", help="a GPT-2-shaped recipe name or YAML (default gpt2-124m)")
    p.add_argument("--layers", type=int, default=None, help="override model.num_layers")
    p.add_argument("--hidden", type=int, default=None, help="override model.hidden_size")
    p.add_argument("--heads", type=int, default=None, help="override model.num_attention_heads")
    p.add_argument("--vocab", type=int, default=None, help="override model.vocab_size (before padding)")
    p.add_argument("--seq", type=int, default=None, help="override model.seq_length")
    p.add_argument("--micro-batch", "--batch", dest="micro_batch", type=int, default=None,
                   help="samples per step (default: the recipe's trainer.micro_batch_size)")
    p.add_argument("--dropout", type=float, default=0.0, help="hidden and attention dropout of both models")
    p.add_argument("--steps", type=int, default=4, help="timed steps per model and row")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation happens here)")
    p.add_argument("--precisions", default=None, help="comma-separated fp32,bf16,fp16 (default: cpu fp32,bf16; cuda bf16)")
    p.add_argument("--modes", default=None, help="comma-separated eager,compiled (default eager)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (same as --modes compiled)")
    p.add_argument("--hf-activation", default=None,
                   help="GPT2Config.activation_function (default: GPT-2's gelu_new for gelu_tanh)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--interleave", action="store_true",
                   help="both models in memory, steps alternating, median step time (noisy machines; no peak memory)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a megaforge config override for its run (repeatable), e.g. model.fused_cross_entropy=true")
    p.add_argument("--profile", type=int, default=0, metavar="K",
                   help="after the timed steps, profile one more step of each model; print its top K ops")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak for MFU; default: data sheet on known GPUs, measured matmul on CPU")
    p.add_argument("--hf-reuse-host-memory", action="store_true",
                   help="give Hugging Face's process megaforge's trainer.reuse_host_memory setting (glibc malloc keeps "
                        "freed memory); default: glibc's defaults, as its users get them")
    p.add_argument("--rss-trace", action="store_true",
                   help="CPU, sequential runs: print each model's RSS and peak RSS after every step (heap growth over "
                        "a long run, e.g. with --steps 40 and trainer.reuse_host_memory)")
    p.add_argument("--hf-worker", default=None, help=argparse.SUPPRESS)  # MODE,PRECISION: Hugging Face's process
    args = p.parse_args()
    if args.compile and args.modes:
        p.error("give --compile or --modes, not both")
    modes = ["compiled"] if args.compile else (args.modes or "eager").split(",")
    if any(m not in ("eager", "compiled") for m in modes):
        p.error(f"--modes: eager and/or compiled, got {args.modes}")
    precisions = (args.precisions or ("bf16" if args.device == "cuda" else "fp32,bf16")).split(",")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.rss_trace and args.interleave:
        p.error("--rss-trace traces sequential runs (one model in memory at a time); leave out --interleave")
    if args.threads:
        torch.set_num_threads(args.threads)
    global PROFILE_TOP, RSS_TRACE
    PROFILE_TOP, RSS_TRACE = args.profile, args.rss_trace
    if args.hf_worker:
        hf_worker(args, *args.hf_worker.split(","))
        return

    shm = "/dev/shm" if args.device == "cuda" and os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="mf-bench-", dir=shm) as tmp:
        cfg0 = run_config(args, precisions[0], False, tmp)
        check_gpt2_shape(cfg0)
        device = pick_device(args.device)
        _, padded_vocab = model_vocab_sizes(cfg0.model)
        args.hf_activation = args.hf_activation or HF_ACTIVATION[cfg0.model.activation]
        for line in header_lines(args, cfg0, device, padded_vocab):
            print(line)
        print(flush=True)
        print(TABLE_HEAD, flush=True)
        tokens = cfg0.trainer.micro_batch_size * cfg0.model.seq_length
        shape = f"{cfg0.trainer.micro_batch_size} × {cfg0.model.seq_length}"
        notes, traces = [], []
        for mode in modes:
            for precision in precisions:
                cfg = run_config(args, precision, mode == "compiled", tmp)
                batches = make_batches(cfg, args.warmup + args.steps, device)
                peak = peak_flops(device, precision, args.peak_tflops)
                hf_process = HFProcess(mode, precision)
                try:
                    if args.interleave:
                        hf, ours = interleaved_rows(cfg, hf_process, batches, args.warmup, tmp)
                        release(device)
                    else:
                        hf = hf_measurement(hf_process)
                        hf_process.close()  # its memory back before megaforge is built
                        ours = measure("megaforge", device, run_megaforge, cfg, batches, args.warmup, tmp)
                finally:
                    hf_process.close()
                n, fpt = ours.n_params, ours.fpt
                if ours.error:  # the FLOPs from the model on meta
                    with torch.device("meta"):
                        n = get_spec(cfg.model.family).build(cfg.model).num_parameters(exclude_positions=True)
                    fpt = flops_per_token(cfg.model, n)
                label = mode + "".join(f" + {o}" for o in args.set)  # the megaforge overrides, if any
                label += " + HF reusing host memory" if args.hf_reuse_host_memory else ""
                for r in (hf, ours):
                    print(row(args.device, precision, label, shape, r, tokens, fpt, peak), flush=True)
                print(ratio_row(args.device, precision, label, shape, hf, ours), flush=True)
                notes += [r.info for r in (hf, ours) if r.info]
                traces += [rss_trace_line(r, f"{mode} {precision}") for r in (hf, ours) if r.rss_trace]
                notes.append(f"{mode} {precision}: MFU against {peak / 1e12:.3g} TFLOP/s; "
                             f"N = {n:,} parameters without positions, {fpt / 1e9:.3f} GFLOP/token")
        print()
        for line in dict.fromkeys(notes):
            print(line)
        if traces:
            print("\nRSS after each step, GiB, warm-up steps included (in brackets: the process's peak RSS so far):")
            for line in traces:
                print(line)
        for text in PROFILES:
            print(f"\n{text}")


if __name__ == "__main__":
    main()
