#!/usr/bin/env python3
"""PEFT's half of the interop proof (bench/peft_interop.ts is ours): adapters travel both ways in PEFT's format.

Per case (a base model folder, an adapter folder saved by promptgate, and ours.json with the batch and our
logits with that adapter):

1. ours -> PEFT: loads the base model with transformers, wraps it with `PeftModel.from_pretrained(base,
   adapter)`, checks that the loaded adapter tensors equal the file's exactly, computes the logits of the
   same batch and compares them with ours: max relative error (normwise, max|ours - peft| / max|peft|, over
   real (unpadded) positions) must be <= 1e-5.
2. PEFT -> ours: trains a fresh PEFT adapter (same adapter_len / adapter_layers) for 5 AdamW steps on the
   batch, saves it with `save_pretrained` to <case>/peft_adapter and writes its logits to <case>/peft.json,
   for `bench/peft_interop.ts check` to load and compare.

It writes <case>/python_result.json and exits non-zero if a comparison fails. float32 on the CPU by default
(as the golden fixtures were made); --device cuda runs with TF32 off.

Usage:
  python3 bench/peft_interop.py --dir /tmp/interop            # every <dir>/<case>/ours.json
  python3 bench/peft_interop.py --model M --adapter A --ours ours.json [--peft-out DIR]
"""

import argparse
import glob
import json
import os
import sys

import torch

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.set_float32_matmul_precision("highest")

from peft import AdaptionPromptConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils.save_and_load import get_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

TRAIN_STEPS = 5


def load_base(model_dir, device):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()


def rel_error(ours, theirs, mask):
    """max|ours - theirs| / max|theirs| over the rows whose attention mask is 1."""
    V = theirs.shape[-1]
    keep = mask.reshape(-1).bool()
    a = ours.reshape(-1, V)[keep].double()
    e = theirs.reshape(-1, V)[keep].double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def run_one(model_dir, adapter_dir, ours_path, out_dir, device):
    with open(ours_path) as f:
        ours = json.load(f)
    tol = float(ours.get("tolerance", 1e-5))
    ids = torch.tensor(ours["inputIds"], dtype=torch.long, device=device)
    mask = torch.tensor(ours["attentionMask"], dtype=torch.long, device=device)
    labels = torch.tensor(ours["labels"], dtype=torch.long, device=device)
    shape = ours["shape"]
    our_logits = torch.tensor(ours["logits"], dtype=torch.float32).reshape(shape)
    result = {"case": ours.get("case", os.path.basename(out_dir)), "tolerance": tol}

    # 1. ours -> PEFT
    pm = PeftModel.from_pretrained(load_base(model_dir, device), adapter_dir).eval()
    saved = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(pm)
    result["weights_loaded_exactly"] = sorted(saved) == sorted(loaded) and all(
        torch.equal(saved[k].to(loaded[k].device, loaded[k].dtype), loaded[k]) for k in saved)
    with torch.no_grad():
        peft_logits = pm(input_ids=ids, attention_mask=mask).logits.float().cpu()
    err = rel_error(our_logits, peft_logits, mask.cpu())
    result["ours_in_peft_rel_error"] = err
    result["ours_in_peft_pass"] = bool(err <= tol and result["weights_loaded_exactly"])
    print(f"[{result['case']}] ours -> PEFT: max relative error {err:.3e} (tolerance {tol:g}), "
          f"weights loaded exactly: {result['weights_loaded_exactly']}", flush=True)
    del pm

    # 2. PEFT -> ours
    if out_dir:
        torch.manual_seed(7)
        pm = get_peft_model(load_base(model_dir, device), AdaptionPromptConfig(
            adapter_len=ours["adapterLen"], adapter_layers=ours["adapterLayers"], task_type="CAUSAL_LM"))
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        losses = []
        for _ in range(TRAIN_STEPS):
            opt.zero_grad()
            loss = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
            losses.append(loss.item())
            loss.backward()
            opt.step()
        pm.eval()
        pm.save_pretrained(os.path.join(out_dir, "peft_adapter"))
        with torch.no_grad():
            logits = pm(input_ids=ids, attention_mask=mask).logits.float().cpu()
        with open(os.path.join(out_dir, "peft.json"), "w") as f:
            json.dump({"shape": list(logits.shape), "logits": logits.reshape(-1).tolist(), "losses": losses}, f)
        result["peft_losses"] = losses
        print(f"[{result['case']}] PEFT trained {TRAIN_STEPS} steps (loss {losses[0]:.5f} -> {losses[-1]:.5f}), "
              f"saved {os.path.join(out_dir, 'peft_adapter')}", flush=True)
        with open(os.path.join(out_dir, "python_result.json"), "w") as f:
            json.dump(result, f, indent=1)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", help="run every <dir>/<case>/ours.json written by `peft_interop.ts prepare`")
    ap.add_argument("--model", help="base model folder")
    ap.add_argument("--adapter", help="adapter folder saved by promptgate")
    ap.add_argument("--ours", help="ours.json with inputIds, attentionMask, labels, shape, logits")
    ap.add_argument("--peft-out", help="where to save PEFT's adapter, peft.json and python_result.json")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    jobs = []
    if args.dir:
        for path in sorted(glob.glob(os.path.join(args.dir, "*", "ours.json"))):
            with open(path) as f:
                o = json.load(f)
            jobs.append((o["model"], o["adapter"], path, os.path.dirname(path)))
        if not jobs:
            sys.exit(f"no */ours.json under {args.dir}: run `deno run -A bench/peft_interop.ts prepare {args.dir}` first")
    elif args.model and args.adapter and args.ours:
        jobs.append((args.model, args.adapter, args.ours, args.peft_out))
    else:
        ap.error("give --dir, or --model, --adapter and --ours")
    ok = True
    for model_dir, adapter_dir, ours_path, out_dir in jobs:
        try:
            r = run_one(model_dir, adapter_dir, ours_path, out_dir, args.device)
            ok &= r["ours_in_peft_pass"]
        except Exception as e:  # noqa: BLE001 - report and go on with the next case
            ok = False
            print(f"[{ours_path}] failed: {type(e).__name__}: {e}", flush=True)
            import traceback
            traceback.print_exc()
    print("ours -> PEFT:", "all pass" if ok else "FAILURES", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
