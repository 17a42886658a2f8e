"""The ``megaforge`` command: parses arguments and dispatches; the logic lives in the package.

User errors (:class:`~toolkit.errors.MegaforgeError`) print one line and exit with code 2. The
package reports through module loggers (``logging.getLogger(__name__)``); the command installs the
one handler that prints them (:func:`setup_logging`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from toolkit.errors import ConfigError, MegaforgeError


def _cmd_recipes(args) -> int:
    from toolkit.recipes import recipe_table

    rows = recipe_table()
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:>{widths[3]}}  {r[4]}")
    return 0


def _cmd_train(args) -> int:
    from toolkit.config import load_config
    from toolkit.training.run import train

    cfg = load_config(args.recipe, args.overrides + (["trainer.dry_run=true"] if getattr(args, "dry_run", False) else []))
    if cfg.trainer.dry_run:  # the parallel plans on meta for a simulated world (toolkit.training.dry_run)
        from toolkit.training.dry_run import dry_run

        return 0 if dry_run(cfg).ok else 1
    if args.command == "finetune" and cfg.task.type == "none":
        from toolkit.errors import ConfigError

        raise ConfigError(f"{args.recipe} has no task section (task.type=none); finetune needs a recipe with "
                          "task.type set (see `megaforge recipes`), or use `megaforge train` to pretrain")
    result = train(cfg)
    if result.metrics_path is not None:
        print(f"run directory: {result.run_dir}")
        print(f"metrics:       {result.metrics_path}")
        if result.plot_path:
            print(f"loss plot:     {result.plot_path}")
        print(f"checkpoints:   {result.run_dir / 'checkpoints'}")
    if result.preempted:
        from toolkit.errors import PREEMPTED_EXIT_CODE

        return PREEMPTED_EXIT_CODE  # saved after a stop signal: run the same command to continue
    return 0


DEVICES = ("auto", "cpu", "cuda")


def _device(name: str) -> str:
    """``--device`` → ``cpu`` or ``cuda`` (``auto``: a GPU when one is visible)."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but no CUDA device is visible; use --device cpu (or auto)")
    return name


def _cmd_evaluate(args) -> int:
    import json

    from toolkit.training.predict import evaluate_run

    result = evaluate_run(args.run_dir, split=args.split, data=args.data, device=_device(args.device),
                          batch_size=args.batch_size, perplexity=args.perplexity, stride=args.stride)
    print(json.dumps({k: v for k, v in result.items() if k not in ("per_type",)}, indent=2))
    return 0


def _cmd_predict(args) -> int:
    from toolkit.training.predict import predict_run

    out = predict_run(args.run_dir, args.input, args.output, device=_device(args.device), batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, seed=args.seed)
    print(f"written: {out}")
    return 0


def _cmd_chat(args) -> int:
    from toolkit.data.tasks.sft import chat_template
    from toolkit.training.generative import chat_replies, load_lm_run

    model, cfg, tokenizer, _ = load_lm_run(args.run_dir, device=_device(args.device))
    if sys.stdin.isatty():
        print("one user turn per line; end with Ctrl-D", file=sys.stderr)
    turns = (line.rstrip("\n") for line in sys.stdin if line.strip())
    for reply in chat_replies(model, tokenizer, turns, template=chat_template(cfg, tokenizer), system=args.system,
                              max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed):
        print(reply, flush=True)
    return 0


def _cmd_lm_eval(args) -> int:
    import json

    try:
        from toolkit.training.lm_eval_adapter import run_lm_eval
    except ImportError as e:
        raise ConfigError(f"megaforge lm-eval needs EleutherAI's lm-eval ({e}); pip install 'megaforge[eval]'") from None
    results = run_lm_eval(args.run_dir, tasks=args.tasks.split(","), include_path=args.include_path,
                          device=_device(args.device), batch_size=args.batch_size, num_fewshot=args.num_fewshot,
                          limit=args.limit)
    print(json.dumps(results, indent=2, default=str))
    return 0


def _cmd_generate(args) -> int:
    from toolkit.checkpoint import load_megaforge_model
    from toolkit.generation import generate_text

    model, cfg, tokenizer = load_megaforge_model(args.run_dir, device=_device(args.device))
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed)
    if args.chat:  # the prompt is a user turn; the reply is printed alone
        from toolkit.data.tasks.sft import chat_template
        from toolkit.generation import generate_chat

        if tokenizer is None:
            raise ConfigError(f"{args.run_dir} has no tokenizer; --chat renders the conversation with it")
        print(generate_chat(model, tokenizer, [{"role": "user", "content": args.prompt}],
                            template=chat_template(cfg, tokenizer), **sampling))
        return 0
    text = generate_text(model, tokenizer, args.prompt, **sampling)
    print(args.prompt + text)
    return 0


def _cmd_preprocess(args) -> int:
    from toolkit.data.preprocess import preprocess, set_tokenizer_threads

    if args.workers is not None:
        if args.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {args.workers}")
        set_tokenizer_threads(args.workers)  # Hugging Face tokenizers: N threads in this process
    stats = preprocess(args.input, args.output_prefix, args.tokenizer, json_key=args.json_key, fmt=args.format,
                       workers=args.workers or 1, output_format=args.output_format)
    print(f"wrote {args.output_prefix}.bin/.idx ({stats['format']} format): {stats['documents']} documents, "
          f"{stats['tokens']} tokens in {stats['seconds']:.1f}s")
    return 0


def _cmd_tokenizer_train(args) -> int:
    from toolkit.tokenization import train_from_spec

    out = train_from_spec(args.spec, args.output)
    print(f"tokenizer written to {out}")
    return 0


def _cmd_convert(args) -> int:
    from toolkit.convert import convert

    out = convert(args.src, args.out, to=args.to, verify=args.verify, dtype=args.dtype,
                  max_shard_size=args.max_shard_size, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                  tolerance=args.tolerance, tensor_parallel=args.tensor_parallel,
                  pipeline_parallel=args.pipeline_parallel, virtual_pipeline=args.virtual_pipeline)
    print(f"written: {out}")
    return 0


def _cmd_publish(args) -> int:
    from toolkit.hub import CardOptions, publish

    card = CardOptions(license=args.license, language=tuple(args.language), tags=tuple(args.tag),
                       datasets=tuple(args.dataset), base_model=args.base_model)
    publish(args.folder, args.repo_id, private=args.private, revision=args.revision, dry_run=args.dry_run,
            overwrite_card=args.overwrite_card, card_options=card, include=tuple(args.include),
            commit_message=args.message)
    return 0


def _cmd_plan(args) -> int:
    from toolkit.planning.report import plan_report

    print(plan_report(args.recipe, args.overrides, gpus=args.gpus, gpu=args.gpu, gpu_memory=args.gpu_memory,
                      gpu_flops=args.gpu_flops, intra_node_gbps=args.intra_node_gbps,
                      inter_node_gbps=args.inter_node_gbps, gpus_per_node=args.gpus_per_node,
                      efficiency=args.efficiency, headroom=args.headroom, top=args.top, explain_row=args.explain,
                      as_json=args.json))
    return 0


class _ConsoleFilter(logging.Filter):
    """Below WARNING only (stdout); warnings and errors go to stderr."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def setup_logging(verbosity: int = 0) -> None:
    """Print the package's log records: INFO (DEBUG with ``-v``, nothing below WARNING with
    ``--quiet``) on stdout, warnings and errors on stderr. Under ``torchrun`` only rank 0 prints
    below WARNING; other ranks print warnings and errors prefixed with their rank."""
    rank = int(os.environ.get("RANK", "0"))
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    if rank != 0:
        level = max(level, logging.WARNING)
    root = logging.getLogger("toolkit")
    for handler in [h for h in root.handlers if getattr(h, "megaforge_console", False)]:
        root.removeHandler(handler)
    fmt = logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(message)s")
    out, err = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    out.addFilter(_ConsoleFilter())
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(fmt)
        handler.megaforge_console = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False  # printed once here, whatever the root logger has


def build_parser() -> argparse.ArgumentParser:
    verbosity = argparse.ArgumentParser(add_help=False)  # accepted before or after the command
    verbosity.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1,
                           default=argparse.SUPPRESS, help="also print debug messages")
    verbosity.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1,
                           default=argparse.SUPPRESS, help="print only warnings, errors and results")
    p = argparse.ArgumentParser(prog="megaforge", description="Train transformer language models at any scale.",
                                parents=[verbosity])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[verbosity], **kwargs)

    s = command("recipes", help="list the registered recipes")
    s.set_defaults(func=_cmd_recipes)

    s = command("train", help="train from a recipe name or YAML file, with KEY=VALUE overrides")
    s.add_argument("recipe", help="registered recipe name (see `megaforge recipes`) or path to a YAML file")
    s.add_argument("overrides", nargs="*", help="config overrides, e.g. trainer.max_steps=30 trainer.run_dir=runs/x")
    s.add_argument("--dry-run", action="store_true",
                   help="build on meta, apply the TP/PP/FSDP plans for a simulated world (trainer.dry_run_world_size, "
                        "default tp × pp) and print what a few ranks hold; trains nothing")
    s.set_defaults(func=_cmd_train)

    s = command("finetune", help="fine-tune for a task (a recipe with a task section), with KEY=VALUE overrides")
    s.add_argument("recipe", help="fine-tuning recipe name (see `megaforge recipes`) or path to a YAML file")
    s.add_argument("overrides", nargs="*", help="config overrides, e.g. checkpoint.init_from=runs/bert-tiny")
    s.set_defaults(func=_cmd_train)

    s = command("evaluate", help="task metrics of a fine-tuned run on a split (RUN_DIR/eval_<split>.json), or the "
                                 "perplexity of a decoder run on --data")
    s.add_argument("run_dir", help="run directory of a fine-tuning run, or of a GPT/Llama run with --perplexity")
    s.add_argument("--split", default="valid", choices=["train", "valid", "test"], help="split (default valid)")
    s.add_argument("--data", default=None, help="evaluate on this file instead of the run's task.<split>_file; "
                                                "with --perplexity: a .jsonl ('text'), .txt or indexed dataset prefix")
    s.add_argument("--perplexity", action="store_true",
                   help="loss and perplexity of a decoder run on --data (always, for a pretraining run); "
                        "writes RUN_DIR/eval_perplexity.json")
    s.add_argument("--stride", type=int, default=None,
                   help="--perplexity: tokens between window starts (default model.seq_length, no overlap)")
    s.add_argument("--batch-size", type=int, default=32, help="examples (or windows) per forward pass (default 32)")
    s.add_argument("--device", default="auto", choices=DEVICES, help="auto (a GPU when one is visible), cpu or cuda")
    s.set_defaults(func=_cmd_evaluate)

    s = command("predict", help="run a fine-tuned model over text: entities with character offsets (jsonl or BRAT); "
                                "a decoder run: a completion per jsonl prompt")
    s.add_argument("run_dir", help="run directory of a fine-tuning run, or of a GPT/Llama run")
    s.add_argument("--input", required=True, help=".txt file, .jsonl file with a 'text' key, or a folder of .txt files; "
                                                  "a decoder run: jsonl with 'prompt' or 'messages' per line")
    s.add_argument("--output", required=True, help="output .jsonl file, or a folder for BRAT .txt/.ann files")
    s.add_argument("--batch-size", type=int, default=32, help="inputs per batch (default 32)")
    s.add_argument("--max-new-tokens", type=int, default=128, help="generative runs: tokens to generate (default 128)")
    s.add_argument("--temperature", type=float, default=0.0, help="generative runs: 0 = greedy (default 0)")
    s.add_argument("--top-k", type=int, default=None, help="generative runs: sample from the k most likely tokens")
    s.add_argument("--top-p", type=float, default=None, help="generative runs: nucleus sampling mass")
    s.add_argument("--seed", type=int, default=0, help="generative runs: sampling seed (default 0)")
    s.add_argument("--device", default="auto", choices=DEVICES, help="auto (a GPU when one is visible), cpu or cuda")
    s.set_defaults(func=_cmd_predict)

    s = command("chat", help="multi-turn chat with a decoder run: one user turn per stdin line, replies on stdout")
    s.add_argument("run_dir", help="run directory of a GPT/Llama run (sft, or pretraining)")
    s.add_argument("--system", default=None, help="system message opening the conversation")
    s.add_argument("--max-new-tokens", type=int, default=128, help="tokens per reply at most (default 128)")
    s.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default 0)")
    s.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    s.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    s.add_argument("--device", default="auto", choices=DEVICES, help="auto (a GPU when one is visible), cpu or cuda")
    s.set_defaults(func=_cmd_chat)

    s = command("lm-eval", help="score a decoder run on lm-evaluation-harness tasks (needs megaforge[eval])")
    s.add_argument("run_dir", help="run directory of a GPT/Llama run")
    s.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    s.add_argument("--include-path", default=None, help="folder of extra task YAML files (local tasks)")
    s.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    s.add_argument("--limit", type=int, default=None, help="score only the first N documents of each task")
    s.add_argument("--batch-size", type=int, default=8, help="requests per forward pass (default 8)")
    s.add_argument("--device", default="auto", choices=DEVICES, help="auto (a GPU when one is visible), cpu or cuda")
    s.set_defaults(func=_cmd_lm_eval)

    s = command("generate", help="continue a prompt with a trained run's latest checkpoint")
    s.add_argument("run_dir", help="run directory (trainer.run_dir of the training run)")
    s.add_argument("--prompt", required=True, help="text to continue")
    s.add_argument("--chat", action="store_true",
                   help="the prompt is a user message: render it with the run's chat template and print the reply")
    s.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate (default 50)")
    s.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default 0.8)")
    s.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    s.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    s.add_argument("--device", default="auto", choices=DEVICES, help="auto (a GPU when one is visible), cpu or cuda")
    s.set_defaults(func=_cmd_generate)

    s = command("preprocess", help="tokenize jsonl/text into an indexed dataset (PREFIX.bin/.idx)")
    s.add_argument("--input", required=True, nargs="+",
                   help="input file(s) (.jsonl, .txt, .parquet, MIMIC .csv; .gz too) or a datasets save_to_disk folder")
    s.add_argument("--output-prefix", required=True, help="output path without extension")
    s.add_argument("--tokenizer", default="english-bpe", help="tokenizer file/folder or shipped name")
    s.add_argument("--json-key", default="text", help="jsonl field holding the text (default text)")
    s.add_argument("--format", default="auto",
                   help="input format: auto, jsonl, text, parquet, hf_datasets (a save_to_disk folder), mimic3 "
                        "(NOTEEVENTS.csv) or mimic4 (note CSVs)")
    s.add_argument("--workers", type=int, default=None,
                   help="CPU cores to tokenize on: threads of a Hugging Face tokenizer (default: all cores), "
                        "else worker processes (default 1); the output is the same for any N")
    s.add_argument("--output-format", default="megaforge", choices=["megaforge", "megatron"],
                   help="index format: megaforge (default) or megatron (Megatron-LM/NeMo/GPT-NeoX MMIDIDX .bin/.idx)")
    s.set_defaults(func=_cmd_preprocess)

    s = command("tokenizer", help="tokenizer tools")
    tsub = s.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    t = tsub.add_parser("train", help="train a tokenizer from a YAML spec (see tokenizers/)")
    t.add_argument("spec", help="path to a tokenizer spec YAML")
    t.add_argument("--output", default=None, help="output folder (default: the spec's name under tokenizers/)")
    t.set_defaults(func=_cmd_tokenizer_train)

    s = command("convert", help="convert checkpoints: megaforge ↔ Hugging Face, megaforge ↔ NeMo, Megatron-LM → "
                                "megaforge or Hugging Face")
    s.add_argument("src", help="megaforge run dir or step_N folder, Hugging Face folder or Hub id, "
                               "Megatron-LM checkpoint folder (legacy or megatron-core), NeMo 1.x .nemo file or "
                               "NeMo 2.0 folder (detected automatically)")
    s.add_argument("out", help="output folder (--to nemo: the .nemo file)")
    s.add_argument("--to", required=True, choices=["hf", "megaforge", "nemo", "peft"],
                   help="output format (nemo: a NeMo 1.x .nemo archive of a megaforge GPT run; peft: the adapter "
                        "folder of a LoRA run; hf on a LoRA run: the merged model)")
    s.add_argument("--verify", action="store_true",
                   help="compare logits of both sides on a probe batch (and tokenizer ids); exit 1 above tolerance")
    s.add_argument("--max-shard-size", default="2GB", help="split safetensors above this size (default 2GB)")
    s.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="weight dtype written (default: as stored for --to hf, fp32 for --to megaforge)")
    s.add_argument("--tokenizer", default=None,
                   help="tokenizer to bundle with an import or a Megatron-LM → Hugging Face conversion (file, "
                        "folder or shipped name)")
    s.add_argument("--vocab-size", type=int, default=None,
                   help="true vocabulary size of a Megatron-LM or NeMo checkpoint (padding rows are dropped)")
    s.add_argument("--tolerance", type=float, default=1e-4, help="max |logit difference| for --verify (default 1e-4)")
    s.add_argument("--tensor-parallel", type=int, default=1,
                   help="--to megaforge: lay the checkpoint out for this tensor-parallel size (vocabulary padding, "
                        "recorded layout); a megaforge source is resharded offline (default 1)")
    s.add_argument("--pipeline-parallel", type=int, default=1,
                   help="--to megaforge: the pipeline-parallel size recorded for the result (default 1)")
    s.add_argument("--virtual-pipeline", type=int, default=None,
                   help="--to megaforge: virtual pipeline stages per rank recorded for the result")
    s.set_defaults(func=_cmd_convert)

    s = command("publish", help="upload a Hugging Face export (convert --to hf) to the Hub with a model card")
    s.add_argument("folder", help="Hugging Face folder written by `megaforge convert RUN FOLDER --to hf`")
    s.add_argument("repo_id", help="Hub repository, NAMESPACE/NAME (created if missing)")
    s.add_argument("--private", action="store_true", help="create the repository private (refused if it exists public)")
    s.add_argument("--revision", default=None, help="branch to commit to, created if missing (default main)")
    s.add_argument("--dry-run", action="store_true", help="list the files and print the card; send and write nothing")
    s.add_argument("--overwrite-card", action="store_true",
                   help="regenerate README.md even if the folder has one (default: keep an existing README.md)")
    s.add_argument("--license", default=None, help="card license id, e.g. apache-2.0 (default: none written)")
    s.add_argument("--language", action="append", default=[], help="card language code, repeatable (default en "
                                                                   "for the shipped corpora)")
    s.add_argument("--tag", action="append", default=[], help="extra card tag, repeatable")
    s.add_argument("--dataset", action="append", default=[], help="Hub dataset id trained on, repeatable")
    s.add_argument("--base-model", default=None,
                   help="Hub id fine-tuned from (default: checkpoint.init_from if a Hub id)")
    s.add_argument("--include", action="append", default=[],
                   help="glob of an extra file to upload (e.g. LICENSE); training data is refused regardless")
    s.add_argument("--message", default=None, help="commit message")
    s.set_defaults(func=_cmd_publish)

    s = command("plan", help="memory per GPU and step time of every parallel layout of a recipe on N GPUs")
    s.add_argument("recipe", help="registered recipe name (see `megaforge recipes`) or path to a YAML file")
    s.add_argument("overrides", nargs="*", help="config overrides, e.g. trainer.global_batch_size=1024")
    s.add_argument("--gpus", type=int, required=True, help="GPUs in the job (whole nodes beyond one)")
    s.add_argument("--gpu", default="a100-80gb",
                   help="GPU type: a100-40gb, a100-80gb, h100, h100-pcie, h200, l40s, a10g, v100, mi300x "
                        "(default a100-80gb)")
    s.add_argument("--gpu-memory", type=float, default=None, help="override: device memory, GiB")
    s.add_argument("--gpu-flops", type=float, default=None,
                   help="override: dense peak TFLOP/s for the recipe's trainer.precision")
    s.add_argument("--intra-node-gbps", type=float, default=None, help="override: per-GPU GB/s inside a node")
    s.add_argument("--inter-node-gbps", type=float, default=None, help="override: per-GPU GB/s between nodes")
    s.add_argument("--gpus-per-node", type=int, default=None, help="override: GPUs per node")
    s.add_argument("--efficiency", type=float, default=0.6,
                   help="fraction of dense peak the matmuls reach (default 0.6)")
    s.add_argument("--headroom", type=float, default=0.1,
                   help="fraction of memory kept free for the CUDA context and allocator (default 0.1)")
    s.add_argument("--top", type=int, default=10, help="rows to print (default 10)")
    s.add_argument("--explain", type=int, nargs="?", const=1, default=None, metavar="N",
                   help="print the arithmetic of row N (default 1) instead of the table")
    s.add_argument("--json", action="store_true", help="print the best --top layouts as JSON")
    s.set_defaults(func=_cmd_plan)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(getattr(args, "verbosity", 0))
    try:
        return args.func(args)
    except MegaforgeError as e:
        print(f"megaforge: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("megaforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
