/**
 * Random-weight models of real shapes, for benchmarks and tests that need a model's size but not its
 * knowledge (the benchmark machine has no network, and TinyLlama in f32 is 4.4 GB of checkpoint). The
 * weights go through the same {@link loadWeights} as a checkpoint, from a {@link TensorSource} that
 * invents each tensor from its expected shape: projections and embeddings normal × 0.02 (HF's
 * `initializer_range`), norm scales 1, biases 0. Drawing a billion normals in JavaScript would take
 * longer than the benchmark, so every tensor is a window of one seeded pool of normals, starting at an
 * offset hashed from the tensor's name: different tensors differ, the same seed gives the same model.
 *
 * @module
 */

import { getGpu } from "../gpu/device.ts";
import { tensorFrom } from "../gpu/tensor.ts";
import { computeRopeInvFreq, type ModelConfig, normalizeConfig } from "../io/hf_config.ts";
import { UnsupportedConfigError } from "../errors.ts";
import { Random } from "../train/rng.ts";
import { type Layout, LAYOUTS } from "./layout.ts";
import type { Model } from "./model.ts";
import { loadWeights, type TensorSource } from "./weights.ts";

/** Models whose shapes {@link modelConfigFor} knows. */
export type RandomModelName = "gpt2-124M" | "smollm2-135M" | "tinyllama-1.1B";

/** Every {@link RandomModelName}, in size order. */
export const RANDOM_MODEL_NAMES: readonly RandomModelName[] = ["gpt2-124M", "smollm2-135M", "tinyllama-1.1B"];

/** HF `config.json` contents of the real models (shapes only; ids as the real files). */
const RAW_CONFIGS: Readonly<Record<RandomModelName, Record<string, unknown>>> = {
  "gpt2-124M": {
    model_type: "gpt2",
    n_embd: 768,
    n_layer: 12,
    n_head: 12,
    n_positions: 1024,
    vocab_size: 50257,
    activation_function: "gelu_new",
    layer_norm_epsilon: 1e-5,
    tie_word_embeddings: true,
    bos_token_id: 50256,
    eos_token_id: 50256,
  },
  "smollm2-135M": {
    model_type: "llama",
    hidden_size: 576,
    intermediate_size: 1536,
    num_hidden_layers: 30,
    num_attention_heads: 9,
    num_key_value_heads: 3,
    vocab_size: 49152,
    max_position_embeddings: 8192,
    rope_theta: 100000,
    rms_norm_eps: 1e-5,
    hidden_act: "silu",
    tie_word_embeddings: true,
    bos_token_id: 0,
    eos_token_id: 0,
  },
  "tinyllama-1.1B": {
    model_type: "llama",
    hidden_size: 2048,
    intermediate_size: 5632,
    num_hidden_layers: 22,
    num_attention_heads: 32,
    num_key_value_heads: 4,
    vocab_size: 32000,
    max_position_embeddings: 2048,
    rope_theta: 10000,
    rms_norm_eps: 1e-5,
    hidden_act: "silu",
    tie_word_embeddings: false,
    bos_token_id: 1,
    eos_token_id: 2,
  },
};

/**
 * The normalised config of a known model's shapes (gpt2-124M, SmolLM2-135M, TinyLlama-1.1B).
 *
 * @param name The model.
 * @returns Its config, as {@link normalizeConfig} makes it from the HF `config.json`.
 * @example TinyLlama's grouped-query attention
 * ```ts
 * import { modelConfigFor } from "./random.ts";
 * const c = modelConfigFor("tinyllama-1.1B");
 * console.log(c.numHeads, c.numKvHeads, c.headDim); // 32 4 64
 * ```
 */
export function modelConfigFor(name: RandomModelName): ModelConfig {
  const raw = RAW_CONFIGS[name];
  if (raw === undefined) {
    throw new UnsupportedConfigError(
      `no built-in config for model "${name}"; known: ${RANDOM_MODEL_NAMES.join(", ")}`,
    );
  }
  return normalizeConfig(structuredClone(raw), `built-in config of ${name}`);
}

/** Options of {@link createRandomModel}. */
export interface RandomModelOptions {
  /** Compute dtype, as in `loadModel` (default `f32`). */
  dtype?: "f32" | "f16";
  /** Seed of the weights (default 0). */
  seed?: number;
  /** Longest sequence the instance serves (default: the config's maximum, at most 4096). */
  maxSeqLen?: number;
}

/**
 * The tensor names and shapes a checkpoint of `config` holds, in the layout's storage order (gpt2
 * Conv1D weights `[in, out]`), mirroring what {@link loadWeights} asks for.
 *
 * @param config The config.
 * @param layout The family's layout.
 * @returns Shapes by checkpoint name.
 */
export function checkpointShapes(config: ModelConfig, layout: Layout): Map<string, number[]> {
  const shapes = new Map<string, number[]>();
  const C = config.hiddenSize, I = config.intermediateSize, D = config.headDim;
  const H = config.numHeads, Hkv = config.numKvHeads;
  const linear = (module: string, out: number, inp: number, bias: boolean) => {
    shapes.set(`${module}.weight`, layout.weightOrder === "out_in" ? [out, inp] : [inp, out]);
    if (bias) shapes.set(`${module}.bias`, [out]);
  };
  const norm = (module: string) => {
    shapes.set(`${module}.weight`, [C]);
    if (config.norm === "layernorm") shapes.set(`${module}.bias`, [C]);
  };
  shapes.set(layout.embed, [config.vocabSize, C]);
  if (layout.positionEmbed) shapes.set(layout.positionEmbed, [config.maxPositions, C]);
  const m = layout.modules;
  for (let i = 0; i < config.numLayers; i++) {
    const p = layout.layerPrefix(i);
    norm(`${p}${m.norm1}`);
    norm(`${p}${m.norm2}`);
    if ("fused" in m.qkv) {
      linear(`${p}${m.qkv.fused}`, 3 * C, C, true);
    } else {
      linear(`${p}${m.qkv.q}`, H * D, C, config.attentionBias);
      linear(`${p}${m.qkv.k}`, Hkv * D, C, config.attentionBias);
      linear(`${p}${m.qkv.v}`, Hkv * D, C, config.attentionBias);
    }
    linear(`${p}${m.o}`, C, H * D, config.attentionBias || config.family === "gpt2");
    if ("gate" in m.mlp) {
      linear(`${p}${m.mlp.gate}`, I, C, config.mlpBias);
      linear(`${p}${m.mlp.up}`, I, C, config.mlpBias);
      linear(`${p}${m.mlp.down}`, C, I, config.mlpBias);
    } else {
      linear(`${p}${m.mlp.fc}`, I, C, true);
      linear(`${p}${m.mlp.proj}`, C, I, true);
    }
  }
  norm(layout.finalNorm);
  if (!config.tieWordEmbeddings) shapes.set(layout.lmHead, [config.vocabSize, C]);
  return shapes;
}

/** Normals in the pool: odd, so no row length of a real model divides it and rows do not repeat. */
const POOL_SIZE = (1 << 20) + 7;

/** FNV-1a of a string, mixed with the seed: the pool offset of a tensor. */
function nameHash(name: string, seed: number): number {
  let h = (0x811c9dc5 ^ seed) >>> 0;
  for (let i = 0; i < name.length; i++) h = Math.imul(h ^ name.charCodeAt(i), 0x01000193) >>> 0;
  return h;
}

/**
 * A {@link TensorSource} that invents every tensor a checkpoint of `config` would hold.
 *
 * @param config The config.
 * @param layout The family's layout.
 * @param seed The seed.
 * @returns The source: weights normal × 0.02, norm scales 1, biases 0.
 */
export function randomTensorSource(config: ModelConfig, layout: Layout, seed = 0): TensorSource {
  const shapes = checkpointShapes(config, layout);
  const rng = new Random(seed);
  const pool = new Float32Array(POOL_SIZE);
  for (let i = 0; i < POOL_SIZE; i++) pool[i] = 0.02 * rng.normal();
  const isNormScale = (name: string) => shapes.get(name)!.length === 1 && !name.endsWith(".bias");
  return {
    has: (name) => shapes.has(name),
    shape: (name) => [...(shapes.get(name) ?? [])],
    readF32(name) {
      const shape = shapes.get(name);
      if (!shape) return Promise.reject(new UnsupportedConfigError(`internal: no random tensor "${name}"`));
      const n = shape.reduce((a, b) => a * b, 1);
      const out = new Float32Array(n);
      if (shape.length === 1) {
        if (isNormScale(name)) out.fill(1);
        return Promise.resolve(out);
      }
      let start = nameHash(name, seed) % POOL_SIZE;
      for (let i = 0; i < n;) {
        const take = Math.min(n - i, POOL_SIZE - start);
        out.set(pool.subarray(start, start + take), i);
        i += take;
        start = 0;
      }
      return Promise.resolve(out);
    },
  };
}

/**
 * Builds a model of `config`'s shapes with random weights, the same {@link Model} `loadModel` returns
 * (no adapter, source `random:<model_type>:<seed>`).
 *
 * @param config The normalised config (e.g. from {@link modelConfigFor}).
 * @param options dtype, seed, maximum sequence length.
 * @returns The model on the GPU.
 * @example A random SmolLM2-135M in f16 for a benchmark
 * ```ts ignore
 * import { createRandomModel, modelConfigFor } from "./random.ts";
 * const model = await createRandomModel(modelConfigFor("smollm2-135M"), { dtype: "f16", maxSeqLen: 1024 });
 * ```
 */
export async function createRandomModel(
  config: ModelConfig,
  options: RandomModelOptions = {},
): Promise<Model> {
  const gpu = await getGpu();
  const dtype = options.dtype ?? "f32";
  if (dtype !== "f32" && dtype !== "f16") {
    throw new UnsupportedConfigError(`dtype must be f32 or f16, got ${dtype}`);
  }
  if (dtype === "f16" && !gpu.hasF16) {
    throw new UnsupportedConfigError(
      `dtype f16 needs the WebGPU feature shader-f16, which ${gpu.info.description} does not offer; use dtype f32`,
    );
  }
  const maxSeqLen = options.maxSeqLen ?? Math.min(config.maxPositions, 4096);
  if (!Number.isInteger(maxSeqLen) || maxSeqLen < 1) {
    throw new UnsupportedConfigError(`maxSeqLen must be a positive integer, got ${maxSeqLen}`);
  }
  if (config.family === "gpt2" && maxSeqLen > config.maxPositions) {
    throw new UnsupportedConfigError(
      `maxSeqLen ${maxSeqLen} exceeds gpt2's ${config.maxPositions} learned positions (n_positions)`,
    );
  }
  const seed = options.seed ?? 0;
  const layout = LAYOUTS[config.family];
  const weights = await loadWeights(gpu, config, layout, randomTensorSource(config, layout, seed), dtype);
  const invFreq = layout.rope
    ? tensorFrom(gpu, Float32Array.from(computeRopeInvFreq(config)), undefined, "rope inv_freq")
    : null;
  return {
    gpu,
    config,
    layout,
    dtype,
    weights,
    invFreq,
    maxSeqLen,
    source: `random:${config.modelType}:${seed}`,
    adapters: new Map(),
    active: null,
    disabled: false,
    activations: new Map(),
  };
}
