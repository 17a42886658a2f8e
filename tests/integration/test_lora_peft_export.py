"""LoRA (``peft.method: lora``) end to end on tiny models, in process: training touches only the
adapters (and a task head), checkpoints hold only those and resume exactly, and both exports load in
``transformers``/``peft`` with megaforge's logits — ``--to peft`` through ``PeftModel.from_pretrained``
(Llama-style, GPT-2-style with its fused ``c_attn``, and a BERT tagger whose head is in
``modules_to_save``), ``--to hf`` as the merged model. Bad input is one line, exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import cli_main

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

QUICK = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.seq_length=32",
         "trainer.micro_batch_size=4", "trainer.global_batch_size=4", "optim.lr=1e-2", "optim.lr_warmup_steps=0",
         "optim.lr_decay_style=constant",
         "trainer.eval_interval=0", "trainer.num_threads=1", "logging.plot=false", "logging.progress_bar=false",
         "logging.wandb.enabled=false", "peft.method=lora", "peft.rank=4", "peft.alpha=8"]


def _sft_file(tmp_path):
    lines = [{"prompt": f"Q{i}: what is {i} plus one?", "completion": f" {i + 1}"} for i in range(16)]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _saved_names(step):
    from toolkit.checkpoint.reshard import saved_tensor_shapes

    return set(saved_tensor_shapes(step))


def _ours(run, ids):
    from toolkit.checkpoint import load_megaforge_model

    model, cfg, _ = load_megaforge_model(run)
    with torch.no_grad():
        out = model(ids)
    return out[..., : cfg.model.vocab_size]


def _check_peft_export(run, tmp_path, ids, auto_class, **kw):
    """--to peft loads with peft (unmerged and merged) and --to hf (merged) in transformers: our logits."""
    ours = _ours(run, ids)
    out = cli_main("convert", str(run), str(tmp_path / "adapter"), "--to", "peft")
    assert out.returncode == 0, out.stderr[-2000:]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    base = auto_class.from_pretrained(config["base_model_name_or_path"], **kw).float().eval()
    with torch.no_grad():
        plain = base(ids).logits
        model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
        unmerged = model(ids).logits
        merged = model.merge_and_unload()(ids).logits
    assert not torch.allclose(plain, ours, atol=1e-3)  # the adapters changed the model
    torch.testing.assert_close(unmerged, ours, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(merged, ours, atol=1e-5, rtol=1e-4)
    out = cli_main("convert", str(run), str(tmp_path / "merged"), "--to", "hf")
    assert out.returncode == 0, out.stderr[-2000:]
    with torch.no_grad():
        hf_merged = auto_class.from_pretrained(str(tmp_path / "merged"), **kw).float().eval()(ids).logits
    torch.testing.assert_close(hf_merged, ours, atol=1e-5, rtol=1e-4)
    return config


def test_llama_lora_trains_adapters_only_resumes_exactly_and_exports_to_peft(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGAFORGE_CACHE", str(tmp_path / "cache"))
    data = _sft_file(tmp_path)
    common = ["llama-tiny", "task.type=sft", f"task.train_file={data}", *QUICK, "model.ffn_hidden_size=96",
              "model.num_query_groups=2",
              "peft.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"]
    # a base: 2 pretraining-free steps of a full fine-tune, exported to HF (what a user downloads)
    base_run = tmp_path / "base_run"
    out = cli_main("finetune", *common, "peft.method=none", "trainer.max_steps=1", f"trainer.run_dir={base_run}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert cli_main("convert", str(base_run), str(tmp_path / "base_hf"), "--to", "hf").returncode == 0
    start = [*common, f"checkpoint.init_from={tmp_path / 'base_hf'}"]

    straight = tmp_path / "straight"
    out = cli_main("finetune", *start, "trainer.max_steps=4", "checkpoint.save_interval=2",
                   f"trainer.run_dir={straight}")
    assert out.returncode == 0, out.stderr[-2000:]
    names = _saved_names(straight / "checkpoints" / "step_4")
    model_keys = {n for n in names if n.startswith("model.")}
    assert model_keys and all(".lora_A." in n or ".lora_B." in n for n in model_keys), sorted(model_keys)[:4]
    assert len(model_keys) == 2 * 7 * 2  # A and B of 7 linears in 2 layers
    assert not [n for n in names if n.startswith("optim.") and ".lora_" not in n and n.startswith("optim.state")]
    # resume: 2 steps, stop, 2 more == 4 straight (the base reloaded from init_from, the adapters from step_2)
    resumed = tmp_path / "resumed"
    for steps in (2, 4):
        out = cli_main("finetune", *start, f"trainer.max_steps={steps}", "checkpoint.save_interval=2",
                       f"trainer.run_dir={resumed}")
        assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed from" in out.stdout
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_ours(resumed, ids), _ours(straight, ids), atol=0, rtol=0)
    from toolkit.checkpoint import load_megaforge_model

    model, cfg, _ = load_megaforge_model(straight)
    assert cfg.peft.base_model_name_or_path == str((tmp_path / "base_hf").resolve())
    base_model, _, _ = load_megaforge_model(base_run)
    frozen = {n: p for n, p in model.named_parameters() if ".lora_" not in n}
    for n, p in base_model.named_parameters():  # the base never moved
        torch.testing.assert_close(frozen[n], p, atol=0, rtol=0)
    config = _check_peft_export(straight, tmp_path, ids, transformers.AutoModelForCausalLM)
    assert config["base_model_name_or_path"] == str((tmp_path / "base_hf").resolve())
    assert config["task_type"] == "CAUSAL_LM" and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"])


def test_gpt2_lora_on_fused_c_attn_exports_exactly(tmp_path):
    run = tmp_path / "run"
    out = cli_main("finetune", "gpt-tiny", "task.type=sft", f"task.train_file={_sft_file(tmp_path)}", *QUICK,
                   "peft.target_modules=[c_attn,c_proj,c_fc]", "trainer.max_steps=3", f"trainer.run_dir={run}")
    assert out.returncode == 0, out.stderr[-2000:]
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    config = _check_peft_export(run, tmp_path, ids, transformers.AutoModelForCausalLM)
    assert config["rank_pattern"] == {"c_attn": 12} and config["alpha_pattern"] == {"c_attn": 24}
    assert config["fan_in_fan_out"] is True
    assert config["base_model_name_or_path"] == str((tmp_path / "adapter" / "base").resolve())  # written beside


def test_bert_token_classification_lora_keeps_head_trainable_and_exports(tmp_path):
    conll = "".join(f"{w} {t}\n" for w, t in [("aspirin", "B-DRUG"), ("helps", "O"), ("pain", "B-PROB"),
                                                ("today", "O")]) + "\n"
    (tmp_path / "train.conll").write_text(conll * 8)
    run = tmp_path / "run"
    out = cli_main("finetune", "bert-tiny", "task.type=token_classification",
                   f"task.train_file={tmp_path / 'train.conll'}", *QUICK, "peft.target_modules=[query,value]",
                   "task.stride=8",
                   "trainer.max_steps=3", f"trainer.run_dir={run}")
    assert out.returncode == 0, out.stderr[-2000:]
    names = {n for n in _saved_names(run / "checkpoints" / "step_3") if n.startswith("model.")}
    assert {"model.classifier.weight", "model.classifier.bias"} <= names
    assert all(".lora_" in n or n.startswith("model.classifier.") for n in names)
    ids = torch.randint(5, 200, (2, 10), generator=torch.Generator().manual_seed(2))
    config = _check_peft_export(run, tmp_path, ids, transformers.AutoModelForTokenClassification)
    assert config["task_type"] == "TOKEN_CLS" and config["modules_to_save"] == ["classifier"]
    assert config["target_modules"] == ["query", "value"]


def test_lora_bad_input_is_one_line_exit_2(tmp_path):
    data = _sft_file(tmp_path)
    out = cli_main("finetune", "gpt-tiny", "task.type=sft", f"task.train_file={data}", *QUICK,
                   "peft.target_modules=[qkv_proj]", "trainer.max_steps=1", f"trainer.run_dir={tmp_path / 'r'}")
    assert out.returncode == 2 and "'qkv_proj' names no linear LoRA can adapt" in out.stderr
    assert "q_proj" in out.stderr and "Traceback" not in out.stderr
    run = tmp_path / "plain"
    out = cli_main("finetune", "gpt-tiny", "task.type=sft", f"task.train_file={data}", *QUICK, "peft.method=none",
                   "trainer.max_steps=1", f"trainer.run_dir={run}")
    assert out.returncode == 0, out.stderr[-2000:]
    out = cli_main("convert", str(run), str(tmp_path / "adapter"), "--to", "peft")
    assert out.returncode == 2 and "trained without adapters (peft.method=none)" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "adapter").exists()


def test_t5_seq2seq_lora_exports_to_peft_with_our_logits(tmp_path, monkeypatch):
    """T5 (encoder–decoder): LoRA on q and v of every attention (self and cross), 3 steps of seq2seq;
    the PEFT adapter on the exported base, unmerged and merged, and the merged HF export give
    megaforge's logits for the same encoder and decoder ids."""
    monkeypatch.setenv("MEGAFORGE_CACHE", str(tmp_path / "cache"))
    rows = [{"input": f"summarize: note {i} lists drug {i % 5}", "target": f"drugs: d{i % 5}"} for i in range(16)]
    (tmp_path / "s2s.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    run = tmp_path / "run"
    out = cli_main("finetune", "t5-tiny-clinical", f"task.train_file={tmp_path / 's2s.jsonl'}", "task.valid_file=",
                   "task.test_file=", "model.num_layers=2", "model.num_decoder_layers=2", "model.hidden_size=64",
                   "model.ffn_hidden_size=128", "model.kv_channels=16", "model.seq_length=32",
                   "model.decoder_seq_length=16", "trainer.micro_batch_size=4", "trainer.global_batch_size=4",
                   "optim.lr=1e-2", "optim.lr_warmup_steps=0", "trainer.max_steps=3", "trainer.eval_interval=0",
                   "checkpoint.save_interval=0", "trainer.num_threads=1", "logging.plot=false",
                   "logging.progress_bar=false", "logging.wandb.enabled=false", "peft.method=lora", "peft.rank=4",
                   "peft.alpha=8", "peft.target_modules=[q,v]", f"trainer.run_dir={run}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert all(".lora_" in n for n in _saved_names(run / "checkpoints" / "step_3") if n.startswith("model."))
    from toolkit.checkpoint import load_megaforge_model

    model, cfg, _ = load_megaforge_model(run)
    enc = torch.randint(3, cfg.model.vocab_size, (2, 12))
    dec = torch.cat([torch.zeros(2, 1, dtype=torch.long), torch.randint(3, cfg.model.vocab_size, (2, 6))], dim=1)
    with torch.no_grad():
        ours = model(enc, dec)[..., : cfg.model.vocab_size]
    out = cli_main("convert", str(run), str(tmp_path / "adapter"), "--to", "peft")
    assert out.returncode == 0, out.stderr[-2000:]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM" and sorted(config["target_modules"]) == ["q", "v"]
    base = transformers.AutoModelForSeq2SeqLM.from_pretrained(config["base_model_name_or_path"]).float().eval()
    with torch.no_grad():
        plain = base(input_ids=enc, decoder_input_ids=dec).logits
        tuned = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
        unmerged = tuned(input_ids=enc, decoder_input_ids=dec).logits
        merged = tuned.merge_and_unload()(input_ids=enc, decoder_input_ids=dec).logits
    assert not torch.allclose(plain, ours, atol=1e-3)  # the adapters changed the model
    torch.testing.assert_close(unmerged, ours, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(merged, ours, atol=1e-5, rtol=1e-4)
    out = cli_main("convert", str(run), str(tmp_path / "merged"), "--to", "hf")
    assert out.returncode == 0, out.stderr[-2000:]
    with torch.no_grad():
        hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "merged")).float().eval()
        torch.testing.assert_close(hf(input_ids=enc, decoder_input_ids=dec).logits, ours, atol=1e-5, rtol=1e-4)
