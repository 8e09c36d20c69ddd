/**
 * Random-weight models of real shapes, for benchmarks and tests that need a model's size but not its
 * knowledge (the benchmark machine has no network, and TinyLlama in f32 is 4.4 GB of checkpoint):
 * projections and embeddings normal × 0.02 (HF's `initializer_range`), norm scales 1, biases 0, in the
 * tensors `loadWeights` makes of a checkpoint. Drawing (and converting to f16) a billion normals
 * in JavaScript would take longer than the benchmark, so every tensor is a window of one seeded tape of
 * normals, starting at an offset hashed from the tensor's name: different tensors differ, the same seed
 * gives the same model. {@link randomTensorSource} serves the same tensors as a checkpoint would, for
 * `loadWeights` itself.
 *
 * @module
 */

import { checkBufferFits, getGpu, type Gpu } from "../gpu/device.ts";
import { splitRows, type Tensor, tensorFrom } from "../gpu/tensor.ts";
import { f32ArrayToF16 } from "../io/dtype.ts";
import { type ModelConfig, normalizeConfig } from "../io/hf_config.ts";
import { UnsupportedConfigError } from "../errors.ts";
import { Random } from "../train/rng.ts";
import { type Layout, LAYOUTS } from "./layout.ts";
import { assembleModel, type Model, resolveModelOptions } from "./model.ts";
// loadWeights: named in docs only
import type {
  LayerWeights,
  Linear,
  loadWeights as _loadWeights,
  Norm,
  TensorSource,
  Weights,
} from "./weights.ts";
import { uploadProjections } from "./weights.ts";

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
 * Conv1D weights `[in, out]`), mirroring what `loadWeights` asks for.
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

/** FNV-1a of a string, mixed with the seed. */
function nameHash(name: string, seed: number): number {
  let h = (0x811c9dc5 ^ seed) >>> 0;
  for (let i = 0; i < name.length; i++) h = Math.imul(h ^ name.charCodeAt(i), 0x01000193) >>> 0;
  return h;
}

/**
 * A tape of normals × 0.02: a seeded pool repeated to `length + POOL_SIZE` values, so that every tensor
 * is a zero-copy window `tape[offset, offset + n)` with `offset` hashed from its name (a multiple of 4,
 * which keeps f16 windows 4-byte aligned for `writeBuffer`).
 */
class Tape {
  readonly f32: Float32Array;
  #f16: Uint16Array | null = null;
  readonly seed: number;

  constructor(length: number, seed: number) {
    this.seed = seed;
    const rng = new Random(seed);
    const pool = new Float32Array(POOL_SIZE);
    for (let i = 0; i < POOL_SIZE; i++) pool[i] = 0.02 * rng.normal();
    this.f32 = new Float32Array(length + POOL_SIZE);
    for (let i = 0; i < this.f32.length; i += POOL_SIZE) {
      this.f32.set(i + POOL_SIZE <= this.f32.length ? pool : pool.subarray(0, this.f32.length - i), i);
    }
  }

  /** f16 bits of the tape, converted once. */
  get f16(): Uint16Array {
    return this.#f16 ??= f32ArrayToF16(this.f32);
  }

  offset(name: string): number {
    return (nameHash(name, this.seed) % POOL_SIZE) & ~3;
  }
}

function largestTensor(shapes: Map<string, number[]>): number {
  let n = 0;
  for (const shape of shapes.values()) n = Math.max(n, shape.reduce((a, b) => a * b, 1));
  return n;
}

/**
 * A {@link TensorSource} that invents every tensor a checkpoint of `config` would hold (what
 * `loadWeights` would read from a real one).
 *
 * @param config The config.
 * @param layout The family's layout.
 * @param seed The seed.
 * @returns The source: weights normal × 0.02, norm scales 1, biases 0.
 */
export function randomTensorSource(config: ModelConfig, layout: Layout, seed = 0): TensorSource {
  const shapes = checkpointShapes(config, layout);
  const tape = new Tape(largestTensor(shapes), seed);
  return {
    has: (name) => shapes.has(name),
    shape: (name) => [...(shapes.get(name) ?? [])],
    readF32(name) {
      const shape = shapes.get(name);
      if (!shape) return Promise.reject(new UnsupportedConfigError(`internal: no random tensor "${name}"`));
      const n = shape.reduce((a, b) => a * b, 1);
      if (shape.length === 1) {
        return Promise.resolve(new Float32Array(n).fill(name.endsWith(".bias") ? 0 : 1));
      }
      const at = tape.offset(name);
      return Promise.resolve(tape.f32.slice(at, at + n));
    },
  };
}

/**
 * Random weights straight onto the GPU, in the shapes `loadWeights` gives a checkpoint of
 * `config` (projections `[out, in]`, gpt2's `c_attn` as three `[C, C]` parts, norms and biases and
 * gpt2's positions in f32): the same tensors as `loadWeights(randomTensorSource(...))`, but each an
 * upload of a window of one tape, already in the compute dtype — no per-tensor copy or f16 conversion
 * on the host, which for TinyLlama would take longer than its benchmark.
 *
 * @param gpu The GPU.
 * @param config The config.
 * @param layout The family's layout.
 * @param dtype Compute dtype of projections and embeddings.
 * @param seed The seed.
 * @returns The weights.
 */
export function randomWeights(
  gpu: Gpu,
  config: ModelConfig,
  layout: Layout,
  dtype: "f32" | "f16",
  seed = 0,
): Weights {
  const C = config.hiddenSize, I = config.intermediateSize, D = config.headDim;
  const H = config.numHeads, Hkv = config.numKvHeads;
  const tape = new Tape(largestTensor(checkpointShapes(config, layout)), seed);
  let bytes = 0;
  const count = (t: Tensor): Tensor => {
    bytes += t.byteLength;
    return t;
  };
  const matrix = (name: string, rows: number, cols: number, keepF32 = false): Tensor => {
    const at = tape.offset(name), n = rows * cols;
    const f16 = dtype === "f16" && !keepF32;
    checkBufferFits(gpu, n * (f16 ? 2 : 4), name);
    const data = f16 ? tape.f16.subarray(at, at + n) : tape.f32.subarray(at, at + n);
    return count(tensorFrom(gpu, data, [rows, cols], name));
  };
  const vector = (name: string, n: number, value: number): Tensor =>
    count(tensorFrom(gpu, new Float32Array(n).fill(value), [n], name));
  const linear = (name: string, out: number, inp: number, bias: boolean): Linear => {
    const w = matrix(`${name}.weight`, out, inp);
    return { w, b: bias ? vector(`${name}.bias`, out, 0) : null, ranges: splitRows(gpu, w) };
  };
  const norm = (name: string): Norm => ({
    weight: vector(`${name}.weight`, C, 1),
    bias: config.norm === "layernorm" ? vector(`${name}.bias`, C, 0) : null,
  });
  /** A projection `[rows, C]` from the tape window of its name, as `uploadProjections` takes it. */
  const tapePart = ({ name, rows, bias }: { name: string; rows: number; bias: boolean }) => {
    const at = tape.offset(`${name}.weight`), n = rows * C;
    checkBufferFits(gpu, n * (dtype === "f16" ? 2 : 4), name);
    const data = dtype === "f16" ? tape.f16.subarray(at, at + n) : tape.f32.subarray(at, at + n);
    return { data, rows, bias: bias ? new Float32Array(rows) : null, label: `${name}.weight` };
  };
  const embed = linear(layout.embed.replace(/\.weight$/, ""), config.vocabSize, C, false);
  const positions = layout.positionEmbed ? matrix(layout.positionEmbed, config.maxPositions, C, true) : null;
  const m = layout.modules;
  const layers: LayerWeights[] = [];
  for (let i = 0; i < config.numLayers; i++) {
    const p = layout.layerPrefix(i);
    // q, k, v: tape windows of the same names as before, stacked in one buffer where possible
    const parts = "fused" in m.qkv
      ? (["q", "k", "v"] as const).map((part) => ({
        name: `${p}${(m.qkv as { fused: string }).fused}.${part}`,
        rows: C,
        bias: true,
      }))
      : [[m.qkv.q, H * D], [m.qkv.k, Hkv * D], [m.qkv.v, Hkv * D]].map(([module, rows]) => ({
        name: `${p}${module}`,
        rows: rows as number,
        bias: config.attentionBias,
      }));
    const projections = uploadProjections(gpu, parts.map(tapePart), C, `${p}qkv`);
    bytes += projections.bytes;
    const qkv = projections.linears;
    const o = linear(`${p}${m.o}`, C, H * D, config.attentionBias || config.family === "gpt2");
    let mlp: Pick<LayerWeights, "gate" | "up" | "gateUp" | "down">;
    if ("gate" in m.mlp) {
      // gate and up: tape windows of their own names, stacked in one buffer where possible
      const gu = uploadProjections(
        gpu,
        [m.mlp.gate, m.mlp.up].map((module) =>
          tapePart({ name: `${p}${module}`, rows: I, bias: config.mlpBias })
        ),
        C,
        `${p}gate_up`,
      );
      bytes += gu.bytes;
      mlp = {
        gate: gu.linears[0]!,
        up: gu.linears[1]!,
        gateUp: gu.stacked,
        down: linear(`${p}${m.mlp.down}`, C, I, config.mlpBias),
      };
    } else {
      mlp = {
        gate: null,
        up: linear(`${p}${m.mlp.fc}`, I, C, true),
        gateUp: null,
        down: linear(`${p}${m.mlp.proj}`, C, I, true),
      };
    }
    layers.push({
      norm1: norm(`${p}${m.norm1}`),
      q: qkv[0]!,
      k: qkv[1]!,
      v: qkv[2]!,
      qkv: projections.stacked,
      o,
      norm2: norm(`${p}${m.norm2}`),
      ...mlp,
    });
  }
  const finalNorm = norm(layout.finalNorm);
  const lmHead = config.tieWordEmbeddings
    ? embed
    : linear(layout.lmHead.replace(/\.weight$/, ""), config.vocabSize, C, false);
  return { embed, positions, layers, finalNorm, lmHead, bytes };
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
  const { dtype, maxSeqLen } = resolveModelOptions(gpu, config, options);
  const seed = options.seed ?? 0;
  const layout = LAYOUTS[config.family];
  const weights = randomWeights(gpu, config, layout, dtype, seed);
  return assembleModel({
    gpu,
    config,
    dtype,
    weights,
    maxSeqLen,
    source: `random:${config.modelType}:${seed}`,
    folder: "",
  });
}
