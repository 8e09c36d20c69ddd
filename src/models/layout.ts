/**
 * Layout tables: where each family keeps its modules in a HuggingFace checkpoint, how its query states
 * are formed, and where PEFT attaches the adaption prompt — the role PEFT's
 * `TRANSFORMERS_MODEL_CONFIG` plays. Architecture differences live here as data, not as branches on
 * `model_type` through the code.
 *
 * | family  | q / k / v / o                       | adapter output            | positions | norm    | MLP    |
 * | ------- | ----------------------------------- | ------------------------- | --------- | ------- | ------ |
 * | llama   | self_attn.{q,k,v,o}_proj (Linear)   | through o_proj, then add  | RoPE      | RMSNorm | SwiGLU |
 * | mistral | as llama (+ sliding window)         | through o_proj, then add  | RoPE      | RMSNorm | SwiGLU |
 * | gpt2    | attn.c_attn split in 3, attn.c_proj | added after c_proj        | learned   | LayerNorm | gelu_new |
 *
 * @module
 */

import type { ModelConfig } from "../io/hf_config.ts";

/** Where a family's weights and PEFT's adapter live. */
export interface Layout {
  /** Family name. */
  readonly family: ModelConfig["family"];
  /** Checkpoint name of the token embedding. */
  readonly embed: string;
  /** Checkpoint name of the learned position embedding (gpt2), or null. */
  readonly positionEmbed: string | null;
  /** Prefix of layer `i`'s weights. */
  readonly layerPrefix: (i: number) => string;
  /** Final norm module. */
  readonly finalNorm: string;
  /** LM head weight (absent when tied). */
  readonly lmHead: string;
  /** Module names inside a layer. */
  readonly modules: {
    readonly norm1: string;
    readonly norm2: string;
    /** q/k/v as separate Linear modules, or one fused Conv1D to split (gpt2). */
    readonly qkv: { readonly q: string; readonly k: string; readonly v: string } | { readonly fused: string };
    readonly o: string;
    readonly mlp: { readonly gate: string; readonly up: string; readonly down: string } | {
      readonly fc: string;
      readonly proj: string;
    };
  };
  /** Whether 2-D weights are HF `Linear` ([out, in]) or gpt2 `Conv1D` ([in, out]). */
  readonly weightOrder: "out_in" | "in_out";
  /** Queries get rotary position embedding (llama, mistral) or not (gpt2). */
  readonly rope: boolean;
  /** PEFT sends the adapter output through the output projection (llama) or adds it after (gpt2). */
  readonly adapterThroughOutProj: boolean;
  /** PEFT's module path of the adapted attention in layer `i`, e.g. `model.layers.2.self_attn`. */
  readonly peftAttention: (i: number) => string;
  /** PEFT's `target_modules` value for this family. */
  readonly peftTargetModules: string;
}

const llamaLike = (family: "llama" | "mistral"): Layout => ({
  family,
  embed: "model.embed_tokens.weight",
  positionEmbed: null,
  layerPrefix: (i) => `model.layers.${i}.`,
  finalNorm: "model.norm",
  lmHead: "lm_head.weight",
  modules: {
    norm1: "input_layernorm",
    norm2: "post_attention_layernorm",
    qkv: { q: "self_attn.q_proj", k: "self_attn.k_proj", v: "self_attn.v_proj" },
    o: "self_attn.o_proj",
    mlp: { gate: "mlp.gate_proj", up: "mlp.up_proj", down: "mlp.down_proj" },
  },
  weightOrder: "out_in",
  rope: true,
  adapterThroughOutProj: true,
  peftAttention: (i) => `model.layers.${i}.self_attn`,
  peftTargetModules: "self_attn",
});

/** The layout table, keyed by family. */
export const LAYOUTS: Readonly<Record<ModelConfig["family"], Layout>> = {
  llama: llamaLike("llama"),
  mistral: llamaLike("mistral"),
  gpt2: {
    family: "gpt2",
    embed: "transformer.wte.weight",
    positionEmbed: "transformer.wpe.weight",
    layerPrefix: (i) => `transformer.h.${i}.`,
    finalNorm: "transformer.ln_f",
    lmHead: "lm_head.weight",
    modules: {
      norm1: "ln_1",
      norm2: "ln_2",
      qkv: { fused: "attn.c_attn" },
      o: "attn.c_proj",
      mlp: { fc: "mlp.c_fc", proj: "mlp.c_proj" },
    },
    weightOrder: "in_out",
    rope: false,
    adapterThroughOutProj: false,
    peftAttention: (i) => `transformer.h.${i}.attn`,
    peftTargetModules: "attn",
  },
};
