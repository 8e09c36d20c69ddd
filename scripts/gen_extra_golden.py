"""Extra transformers references beyond shared/golden: a mistral model whose sliding window (4) is
shorter than the sequence (12), so the window is applied; base logits only, float32 on CPU.
Run on the GPU machine: python3 scripts/gen_extra_golden.py tests/fixtures/extra"""
import json, os, sys, torch
from safetensors.torch import save_file
from transformers import MistralConfig, MistralForCausalLM

out = sys.argv[1]
torch.manual_seed(21)
c = MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, sliding_window=4,
                  tie_word_embeddings=False)
c._attn_implementation = "eager"
m = MistralForCausalLM(c)
with torch.no_grad():
    for n, p in m.named_parameters():
        if p.dim() >= 2: p.normal_(0, 0.08)
        elif n.endswith("weight"): p.copy_(1 + 0.1 * torch.randn_like(p))
m = m.float().eval()
d = os.path.join(out, "mistral_window")
os.makedirs(d, exist_ok=True)
m.save_pretrained(os.path.join(d, "model"), safe_serialization=True)
g = torch.Generator().manual_seed(22)
ids = torch.randint(0, 256, (2, 12), generator=g)
with torch.no_grad():
    logits = m(input_ids=ids).logits
    # the same model without a window, to prove the window changes the result
    m.config.sliding_window = None
    full = MistralForCausalLM(m.config); full.load_state_dict(m.state_dict()); full.eval()
    nowin = full(input_ids=ids).logits
save_file({"input_ids": ids.int().contiguous(), "logits": logits.contiguous(), "no_window_logits": nowin.contiguous()},
          os.path.join(d, "golden.safetensors"))
print("mistral_window max|window - no window|", (logits - nowin).abs().max().item())
