#!/usr/bin/env python3
"""HuggingFace PEFT's side of the end-to-end benchmark (bench/e2e.ts is ours; bench/run_e2e.sh runs both).

Random-weight models of the real shapes (gpt2-124M, SmolLM2-135M, TinyLlama-1.1B; configs identical to
src/models/random.ts), PyTorch eager, PEFT 0.21 AdaptionPromptConfig with adapter_len 10 on all layers and
on the top 8 (model suffix `-top8`), in float32 with TF32 off and in bfloat16 (model and adapter in bf16).
Per case: training tokens/s (AdamW over the adapter parameters, B=4 T=512, median of >= 10 steps after
3 warm-up steps, each step timed between torch.cuda.synchronize calls), forward ms with and without the
adapter (torch.no_grad, logits computed as HF does), peak memory of training (max_memory_allocated
after a reset with the model loaded: weights included, as on our side), decode tokens/s of HF `generate`
at batch 1 (prompt 128, 128 new tokens forced with min_new_tokens, greedy, use_cache, adapter on;
prefill included) and time to first token (generate with one new token).

Rows `{model, dtype, metric, peft, unit, card}` go to --out (a JSON array), timings and versions to
--details-out. Every case and every phase is guarded: an out-of-memory error loses that phase only. A
time budget (--budget-s) skips phases that would not fit, top-8 placements last; the models are built on
the GPU (seconds).

Usage: python3 bench/peft_reference.py --models gpt2-124M,smollm2-135M,tinyllama-1.1B --dtypes f32,bf16 \
           --out peft.json --details-out peft-details.json --budget-s 210 [--gradient-checkpointing] [--train-only]
"""

import argparse
import gc
import json
import math
import statistics
import sys
import time
import traceback

import torch

# f32 means f32: no TF32 tensor cores in matmuls or convolutions (bf16 is unaffected)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.set_float32_matmul_precision("highest")

import peft  # noqa: E402
import transformers  # noqa: E402
from peft import AdaptionPromptConfig, get_peft_model  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

# Same shapes as src/models/random.ts (RAW_CONFIGS).
CONFIGS = {
    "gpt2-124M": (GPT2Config, GPT2LMHeadModel, dict(
        n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257, activation_function="gelu_new",
        layer_norm_epsilon=1e-5, tie_word_embeddings=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=50256, eos_token_id=50256)),
    "smollm2-135M": (LlamaConfig, LlamaForCausalLM, dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5, hidden_act="silu",
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)),
    "tinyllama-1.1B": (LlamaConfig, LlamaForCausalLM, dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
        vocab_size=32000, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5, hidden_act="silu",
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
}
UNITS = {"train_tok_s": "tok/s", "fwd_ms": "ms", "fwd_base_ms": "ms", "adapter_overhead": "x", "peak_gib": "GiB",
         "decode_tok_s": "tok/s", "ttft_ms": "ms"}
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def log(*a):
    print("[peft]", *a, file=sys.stderr, flush=True)


def build(name, dtype, adapter_layers, adapter_len, checkpointing=False):
    """The random model on the GPU in `dtype`, wrapped by PEFT with a fresh adaption prompt (with HF gradient
    checkpointing, non-reentrant, when asked: it acts in training mode only, and every dropout rate is 0)."""
    config_cls, model_cls, kw = CONFIGS[name]
    config = config_cls(**kw)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = model_cls(config)
    model = model.to(dtype=dtype).eval()  # eval: no dropout (all rates are 0 anyway)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    # a fresh adapter (gate zero) as on our side: the same work as a trained one
    return get_peft_model(model, AdaptionPromptConfig(adapter_len=adapter_len, adapter_layers=adapter_layers,
                                                      task_type="CAUSAL_LM"))


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000, out


def run_case(name, dtype_name, placement, layers, args, deadline, add, details):
    dtype = DTYPES[dtype_name]
    d = details.setdefault(f"{placement}|{dtype_name}", {"adapter_layers": layers})
    t0 = time.perf_counter()
    pm = build(name, dtype, layers, args.adapter_len, args.gradient_checkpointing)
    torch.cuda.synchronize()
    d["build_s"] = round(time.perf_counter() - t0, 2)
    base_config = pm.get_base_model().config
    d["attn_implementation"] = getattr(base_config, "_attn_implementation", None)
    d["adapter_params"] = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    vocab = base_config.vocab_size
    gen = torch.Generator(device="cuda").manual_seed(1234)
    ids = torch.randint(0, vocab, (args.batch, args.seq), device="cuda", generator=gen)
    prompt = torch.randint(0, vocab, (1, args.prompt), device="cuda", generator=gen)

    def phase(what, min_s, fn):
        if deadline - time.time() < min_s:
            d.setdefault("errors", []).append(f"{what} skipped: out of time")
            return
        p0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - OOM or anything else loses this phase only
            d.setdefault("errors", []).append(f"{what}: {type(e).__name__}: {e}"[:500])
            log(f"{placement} {dtype_name} {what} failed:\n{traceback.format_exc()}")
        finally:
            gc.collect()
            torch.cuda.empty_cache()
        d[f"{what}_s"] = round(time.perf_counter() - p0, 2)

    def train():
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = pm(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            return loss

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(args.warmup):
            step()
        times = []
        first = None
        for i in range(args.steps):
            ms, loss = timed(step)
            times.append(ms)
            if i == 0:
                first = loss.item()
            if deadline - time.time() < 5 and len(times) >= 3:
                break
        peak = torch.cuda.max_memory_allocated() / 2**30
        last = loss.item()
        if not math.isfinite(last):
            raise RuntimeError(f"training loss is {last}")
        step_ms = statistics.median(times)
        add(placement, dtype_name, "train_tok_s", args.batch * args.seq / (step_ms / 1000))
        add(placement, dtype_name, "peak_gib", peak)
        d.update(step_ms=step_ms, steps=len(times), step_times_ms=[round(t, 3) for t in times], losses=[first, last])
        log(f"{placement} {dtype_name}: train {step_ms:.2f} ms/step, peak {peak:.2f} GiB")
        opt.zero_grad(set_to_none=True)
        del opt

    def forward():
        def fwd():
            with torch.no_grad():
                return pm(input_ids=ids, use_cache=False).logits

        def fwd_base():
            with pm.disable_adapter(), torch.no_grad():
                return pm(input_ids=ids, use_cache=False).logits

        res = {}
        for key, fn in (("fwd", fwd), ("fwd_base", fwd_base)):
            for _ in range(2):
                timed(fn)
            res[key] = statistics.median(timed(fn)[0] for _ in range(args.fwd_reps))
        add(placement, dtype_name, "fwd_ms", res["fwd"])
        add(placement, dtype_name, "fwd_base_ms", res["fwd_base"])
        add(placement, dtype_name, "adapter_overhead", res["fwd"] / res["fwd_base"])
        d.update(fwd_ms=res["fwd"], fwd_base_ms=res["fwd_base"])

    def decode():
        mask = torch.ones_like(prompt)

        def gen(n):
            with torch.no_grad():
                return pm.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, use_cache=True, pad_token_id=0)

        gen(16)  # warm-up
        ttft = [timed(lambda: gen(1))[0] for _ in range(3)]
        rates = []
        for i in range(args.decode_runs):
            if i > 0 and deadline - time.time() < 15:
                break
            ms, out = timed(lambda: gen(args.new))
            new = out.shape[1] - prompt.shape[1]
            if new != args.new:
                raise RuntimeError(f"generate gave {new} of {args.new} tokens")
            rates.append(new / (ms / 1000))
        add(placement, dtype_name, "ttft_ms", statistics.median(ttft))
        add(placement, dtype_name, "decode_tok_s", max(rates))
        d.update(ttft_ms=ttft, decode_tok_s=rates)
        log(f"{placement} {dtype_name}: decode {max(rates):.1f} tok/s, ttft {statistics.median(ttft):.1f} ms")

    phase("train", 5, train)
    if not args.train_only:
        phase("forward", 3, forward)
        phase("decode", 8, decode)
    del pm
    gc.collect()
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="gpt2-124M,smollm2-135M,tinyllama-1.1B")
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--out", required=True)
    ap.add_argument("--details-out")
    ap.add_argument("--budget-s", type=float, default=210)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--adapter-len", type=int, default=10)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--fwd-reps", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--decode-runs", type=int, default=1)
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="train with HF gradient checkpointing (non-reentrant)")
    ap.add_argument("--train-only", action="store_true", help="measure training only (no forward, no decode)")
    args = ap.parse_args()
    start = time.time()
    end = start + args.budget_s
    card = torch.cuda.get_device_name(0)
    rows = []
    details = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                            "peft": peft.__version__, "cuda": torch.version.cuda},
               "card": card, "tf32": False, "settings": vars(args), "cases": {}}
    log(f"{card}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")

    def add(model, dtype, metric, value):
        rows.append({"model": model, "dtype": dtype, "metric": metric, "peft": float(f"{value:.5g}"),
                     "unit": UNITS[metric], "card": card})

    def save():
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
        if args.details_out:
            with open(args.details_out, "w") as f:
                json.dump(details, f, indent=1, default=str)

    models = [m for m in args.models.split(",") if m]
    dtypes = [d for d in args.dtypes.split(",") if d]
    cases = []
    for m in models:
        if m not in CONFIGS:
            log(f"unknown model {m}; known: {', '.join(CONFIGS)}")
            continue
        layers = CONFIGS[m][2].get("num_hidden_layers", CONFIGS[m][2].get("n_layer"))
        for dt in dtypes:
            if dt not in DTYPES:
                log(f"unknown dtype {dt}; use f32 or bf16")
                continue
            cases.append((0, m, dt, m, layers))
            if args.top < layers:
                cases.append((1, m, dt, f"{m}-top{args.top}", args.top))
    # all-layer placements first: if the budget runs out, the top-8 rows are the ones lost
    cases.sort(key=lambda c: c[0])
    for i, (_, m, dt, placement, layers) in enumerate(cases):
        left = end - time.time()
        if left < 10:
            log(f"{placement} {dt}: skipped, {left:.0f} s of budget left")
            details["cases"].setdefault(f"{placement}|{dt}", {})["errors"] = ["skipped: out of time"]
            continue
        log(f"{placement} {dt}: {left:.0f} s of budget left for {len(cases) - i} cases")
        try:
            run_case(m, dt, placement, layers, args, end, add, details["cases"])
        except Exception as e:  # noqa: BLE001 - a failed build (e.g. OOM) loses this case only
            details["cases"].setdefault(f"{placement}|{dt}", {}).setdefault("errors", []).append(
                f"{type(e).__name__}: {e}"[:500])
            log(f"{placement} {dt} failed:\n{traceback.format_exc()}")
            gc.collect()
            torch.cuda.empty_cache()
        save()
    details["total_s"] = round(time.time() - start, 1)
    save()
    log(f"done in {time.time() - start:.0f} s: {len(rows)} rows -> {args.out}")


if __name__ == "__main__":
    main()
