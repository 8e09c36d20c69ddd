/**
 * Hugging Face `config.json` → one typed, validated {@link ModelConfig}.
 *
 * The raw config is kept as read (`raw`); everything the model code needs is derived from it by one
 * normaliser per family (llama, mistral, gpt2), chosen through a registry keyed by `model_type`. Each
 * normaliser applies transformers' defaults for missing optional keys, accepts both the transformers 4
 * (`rope_theta` + `rope_scaling`) and transformers 5 (`rope_parameters`) RoPE layouts, and rejects values
 * it cannot honour with an error that names the field. {@link computeRopeInvFreq} reproduces transformers'
 * RoPE inverse frequencies (default, linear, dynamic NTK and llama3 scaling), by default with the same
 * float32 rounding steps PyTorch takes. {@link readGenerationConfig} reads `generation_config.json`.
 *
 * @module
 */

import { join } from "../_std.ts";
import { InvalidFileError, UnsupportedConfigError } from "../errors.ts";

/** The model families promptgate implements. */
export type ModelFamily = "llama" | "mistral" | "gpt2";

/** Normalisation layer kind. */
export type NormKind = "rmsnorm" | "layernorm";

/**
 * MLP activation. `gelu` is the exact (erf) GELU; `gelu_new` is the tanh approximation (transformers'
 * `gelu_new`, `gelu_pytorch_tanh` and `gelu_fast` all compute it); `silu` is also called `swish`.
 */
export type Activation = "silu" | "gelu" | "gelu_new" | "relu";

/** RoPE scaling kinds promptgate implements. */
export type RopeType = "default" | "linear" | "dynamic" | "llama3";

/** How rotary position embeddings are scaled. */
export interface RopeScaling {
  /** Scaling kind. */
  type: RopeType;
  /** Scaling factor (1 for `default`). */
  factor: number;
  /** llama3: frequencies with wavelength above `originalMaxPositionEmbeddings / lowFreqFactor` are divided by `factor`. */
  lowFreqFactor: number | null;
  /** llama3: frequencies with wavelength below `originalMaxPositionEmbeddings / highFreqFactor` are kept. */
  highFreqFactor: number | null;
  /** llama3: the context length the model was pretrained with. */
  originalMaxPositionEmbeddings: number | null;
}

/** The normalised model configuration every part of promptgate reads. */
export interface ModelConfig {
  /** Implementation family. */
  family: ModelFamily;
  /** `model_type` as written in config.json. */
  modelType: string;
  /** Vocabulary size (rows of the embedding matrix). */
  vocabSize: number;
  /** Model width. */
  hiddenSize: number;
  /** MLP inner width. */
  intermediateSize: number;
  /** Number of transformer blocks. */
  numLayers: number;
  /** Query heads. */
  numHeads: number;
  /** Key/value heads (equal to `numHeads` without grouped-query attention). */
  numKvHeads: number;
  /** Width of one head. */
  headDim: number;
  /** Longest sequence the position embeddings cover. */
  maxPositions: number;
  /** Epsilon of the normalisation layers. */
  normEps: number;
  /** Normalisation kind. */
  norm: NormKind;
  /** MLP activation. */
  activation: Activation;
  /** Whether the LM head reuses the token embedding matrix. */
  tieWordEmbeddings: boolean;
  /** Whether the attention projections have biases. */
  attentionBias: boolean;
  /** Whether the MLP projections have biases. */
  mlpBias: boolean;
  /** RoPE base θ; `null` for learned positions (gpt2). */
  ropeTheta: number | null;
  /** RoPE scaling; `null` for learned positions (gpt2). */
  rope: RopeScaling | null;
  /** Sliding attention window in tokens, or `null` for full causal attention. */
  slidingWindow: number | null;
  /** Whether attention scores are divided by sqrt(headDim) (always true except gpt2 with `scale_attn_weights: false`). */
  scaleAttnWeights: boolean;
  /** gpt2's `scale_attn_by_inverse_layer_idx`; always false (true is rejected). */
  scaleAttnByInverseLayerIdx: boolean;
  /** gpt2's `reorder_and_upcast_attn` (attention in float32; promptgate computes it in float32 anyway). */
  reorderAndUpcastAttn: boolean;
  /** Beginning-of-sequence token id. */
  bosTokenId: number | null;
  /** End-of-sequence token id(s); generation stops at any of them. */
  eosTokenId: number | number[] | null;
  /** Padding token id. */
  padTokenId: number | null;
  /** config.json exactly as read. */
  raw: Readonly<Record<string, unknown>>;
}

/** Decoding settings from `generation_config.json`; `null` where the file does not say. */
export interface GenerationConfig {
  /** Beginning-of-sequence token id. */
  bosTokenId: number | null;
  /** End-of-sequence token id(s). */
  eosTokenId: number | number[] | null;
  /** Padding token id. */
  padTokenId: number | null;
  /** Maximum total length (prompt + new tokens). */
  maxLength: number | null;
  /** Maximum number of new tokens. */
  maxNewTokens: number | null;
  /** Whether to sample (otherwise greedy). */
  doSample: boolean | null;
  /** Sampling temperature. */
  temperature: number | null;
  /** Nucleus sampling probability mass. */
  topP: number | null;
  /** Top-k sampling cut-off. */
  topK: number | null;
  /** Repetition penalty. */
  repetitionPenalty: number | null;
  /** generation_config.json exactly as read. */
  raw: Readonly<Record<string, unknown>>;
}

// ---------------------------------------------------------------------------------------------------
// Typed field access with errors that name the field
// ---------------------------------------------------------------------------------------------------

type Raw = Readonly<Record<string, unknown>>;

/** Reads fields of one JSON object (own properties only) and validates their types. */
class Fields {
  readonly raw: Raw;
  readonly where: string;

  constructor(raw: Raw, where: string) {
    this.raw = raw;
    this.where = where;
  }

  /** The value, or undefined when absent or null. */
  get(key: string): unknown {
    if (!Object.hasOwn(this.raw, key)) return undefined;
    const v = this.raw[key];
    return v === null ? undefined : v;
  }

  has(key: string): boolean {
    return this.get(key) !== undefined;
  }

  bad(key: string, expected: string): InvalidFileError {
    return new InvalidFileError(
      `${this.where} field "${key}" must be ${expected}, got ${JSON.stringify(this.raw[key])}. ` +
        `Fix the file or download the model again.`,
    );
  }

  /** A required integer ≥ min. */
  int(key: string, min = 1, fallback?: number): number {
    const v = this.get(key);
    if (v === undefined) {
      if (fallback !== undefined) return fallback;
      throw new InvalidFileError(
        `${this.where} has no "${key}"; it is required to build the model. Fix the file or download the model again.`,
      );
    }
    if (typeof v !== "number" || !Number.isSafeInteger(v) || v < min) {
      throw this.bad(key, min === 1 ? "a positive integer" : `an integer >= ${min}`);
    }
    return v;
  }

  /** An optional integer ≥ min, or null. */
  optInt(key: string, min = 0): number | null {
    return this.has(key) ? this.int(key, min) : null;
  }

  /** A finite number > 0 (or ≥ 0 when `allowZero`). */
  positive(key: string, fallback?: number, allowZero = false): number {
    const v = this.get(key);
    if (v === undefined) {
      if (fallback !== undefined) return fallback;
      throw new InvalidFileError(`${this.where} has no "${key}"; fix the file or download the model again.`);
    }
    if (typeof v !== "number" || !Number.isFinite(v) || v < 0 || (!allowZero && v === 0)) {
      throw this.bad(key, allowZero ? "a number >= 0" : "a number > 0");
    }
    return v;
  }

  optPositive(key: string): number | null {
    return this.has(key) ? this.positive(key) : null;
  }

  bool(key: string, fallback: boolean): boolean {
    const v = this.get(key);
    if (v === undefined) return fallback;
    if (typeof v !== "boolean") throw this.bad(key, "true or false");
    return v;
  }

  optBool(key: string): boolean | null {
    return this.has(key) ? this.bool(key, false) : null;
  }

  str(key: string, fallback: string): string {
    const v = this.get(key);
    if (v === undefined) return fallback;
    if (typeof v !== "string") throw this.bad(key, "a string");
    return v;
  }

  /** A token id (integer ≥ 0) or null. */
  tokenId(key: string, fallback: number | null): number | null {
    if (!Object.hasOwn(this.raw, key)) return fallback;
    return this.optInt(key, 0);
  }

  /** An end-of-sequence id: an integer, a list of integers, or null. */
  tokenIds(key: string, fallback: number | null): number | number[] | null {
    if (!Object.hasOwn(this.raw, key)) return fallback;
    const v = this.get(key);
    if (v === undefined) return null;
    if (Array.isArray(v)) {
      if (!v.every((x) => typeof x === "number" && Number.isSafeInteger(x) && x >= 0)) {
        throw this.bad(key, "a token id or a list of token ids");
      }
      return [...v] as number[];
    }
    return this.int(key, 0);
  }

  /** A nested object, or null when absent. */
  object(key: string): Fields | null {
    const v = this.get(key);
    if (v === undefined) return null;
    if (typeof v !== "object" || Array.isArray(v)) throw this.bad(key, "an object");
    return new Fields(v as Raw, `${this.where} "${key}"`);
  }
}

const ACTIVATIONS: ReadonlyMap<string, Activation> = new Map([
  ["silu", "silu"],
  ["swish", "silu"],
  ["gelu", "gelu"],
  ["gelu_new", "gelu_new"],
  ["gelu_pytorch_tanh", "gelu_new"],
  ["gelu_fast", "gelu_new"],
  ["relu", "relu"],
]);

function activation(f: Fields, key: string, fallback: string): Activation {
  const name = f.str(key, fallback);
  const act = ACTIVATIONS.get(name);
  if (act === undefined) {
    throw new UnsupportedConfigError(
      `${f.where} field "${key}" is "${name}", an activation promptgate does not implement; supported: ` +
        `${[...ACTIVATIONS.keys()].join(", ")}.`,
    );
  }
  return act;
}

const ROPE_TYPES: readonly RopeType[] = ["default", "linear", "dynamic", "llama3"];

/**
 * Read RoPE settings from either layout:
 * transformers 5 writes `rope_parameters: {rope_theta, rope_type, factor, ...}`; transformers 4 wrote
 * `rope_theta` plus `rope_scaling: {type | rope_type, factor, ...} | null`.
 */
function readRope(f: Fields, maxPositions: number): { theta: number; rope: RopeScaling } {
  const v5 = f.object("rope_parameters");
  let params: Fields | null;
  let theta: number;
  if (v5 !== null) {
    if (!v5.has("rope_type") && !v5.has("type") && !v5.has("rope_theta")) {
      throw new UnsupportedConfigError(
        `${f.where} "rope_parameters" has no rope_type or rope_theta (per-layer-type RoPE settings?); ` +
          `promptgate supports one RoPE setting for all layers.`,
      );
    }
    params = v5;
    theta = v5.has("rope_theta") ? v5.positive("rope_theta") : f.positive("rope_theta", 10000);
  } else {
    params = f.object("rope_scaling");
    theta = f.positive("rope_theta", 10000);
  }
  const typeKey = params?.has("rope_type") ? "rope_type" : "type";
  const type = params?.str(typeKey, "default") ?? "default";
  if (!(ROPE_TYPES as readonly string[]).includes(type)) {
    throw new UnsupportedConfigError(
      `${f.where} asks for RoPE scaling "${type}", which promptgate does not implement; supported: ` +
        `${ROPE_TYPES.join(", ")}. Use a model without that rope_scaling, or remove it from config.json ` +
        `(the model then only works up to its original context length).`,
    );
  }
  if (
    params !== null && params.has("partial_rotary_factor") && params.positive("partial_rotary_factor") !== 1
  ) {
    throw new UnsupportedConfigError(
      `${params.where} "partial_rotary_factor" is ${
        params.get("partial_rotary_factor")
      }; promptgate applies ` +
        `RoPE to the whole head only.`,
    );
  }
  const rope: RopeScaling = {
    type: type as RopeType,
    factor: 1,
    lowFreqFactor: null,
    highFreqFactor: null,
    originalMaxPositionEmbeddings: null,
  };
  if (type === "default" || params === null) return { theta, rope };
  rope.factor = params.positive("factor");
  if (type === "llama3") {
    rope.lowFreqFactor = params.positive("low_freq_factor");
    rope.highFreqFactor = params.positive("high_freq_factor");
    rope.originalMaxPositionEmbeddings = params.int("original_max_position_embeddings", 1, maxPositions);
    if (rope.highFreqFactor <= rope.lowFreqFactor) {
      throw new InvalidFileError(
        `${params.where} needs high_freq_factor > low_freq_factor for llama3 RoPE, got ${rope.highFreqFactor} ` +
          `and ${rope.lowFreqFactor}. Fix the file or download the model again.`,
      );
    }
  }
  return { theta, rope };
}

function checkHeads(
  f: Fields,
  c: { hiddenSize: number; numHeads: number; numKvHeads: number },
  headDimGiven: boolean,
) {
  if (!headDimGiven && c.hiddenSize % c.numHeads !== 0) {
    throw new InvalidFileError(
      `${f.where}: hidden size ${c.hiddenSize} is not divisible by the number of attention heads ${c.numHeads}; ` +
        `fix the file or download the model again.`,
    );
  }
  if (c.numHeads % c.numKvHeads !== 0) {
    throw new InvalidFileError(
      `${f.where}: num_attention_heads ${c.numHeads} is not divisible by num_key_value_heads ${c.numKvHeads}; ` +
        `fix the file or download the model again.`,
    );
  }
}

// ---------------------------------------------------------------------------------------------------
// One normaliser per family
// ---------------------------------------------------------------------------------------------------

/** Llama (and the parts of Mistral that are the same): transformers' LlamaConfig defaults. */
function normalizeLlama(f: Fields, family: ModelFamily = "llama"): ModelConfig {
  const hiddenSize = f.int("hidden_size");
  const numHeads = f.int("num_attention_heads");
  const numKvHeads = f.int("num_key_value_heads", 1, numHeads);
  const headDimGiven = f.has("head_dim");
  const headDim = headDimGiven ? f.int("head_dim") : hiddenSize / numHeads;
  checkHeads(f, { hiddenSize, numHeads, numKvHeads }, headDimGiven);
  if (headDim % 2 !== 0) {
    throw new InvalidFileError(`${f.where}: head_dim ${headDim} must be even for rotary embeddings.`);
  }
  const maxPositions = f.int("max_position_embeddings", 1, family === "mistral" ? 4096 * 32 : 2048);
  const { theta, rope } = readRope(f, maxPositions);
  return {
    family,
    modelType: f.str("model_type", family),
    vocabSize: f.int("vocab_size"),
    hiddenSize,
    intermediateSize: f.int("intermediate_size"),
    numLayers: f.int("num_hidden_layers"),
    numHeads,
    numKvHeads,
    headDim,
    maxPositions,
    normEps: f.positive("rms_norm_eps", 1e-6),
    norm: "rmsnorm",
    activation: activation(f, "hidden_act", "silu"),
    tieWordEmbeddings: f.bool("tie_word_embeddings", false),
    // MistralConfig has no bias options: its projections never have biases.
    attentionBias: family === "mistral" ? false : f.bool("attention_bias", false),
    mlpBias: family === "mistral" ? false : f.bool("mlp_bias", false),
    ropeTheta: theta,
    rope,
    slidingWindow: null,
    scaleAttnWeights: true,
    scaleAttnByInverseLayerIdx: false,
    reorderAndUpcastAttn: false,
    bosTokenId: f.tokenId("bos_token_id", 1),
    eosTokenId: f.tokenIds("eos_token_id", 2),
    padTokenId: f.tokenId("pad_token_id", null),
    raw: f.raw,
  };
}

/** Mistral: Llama plus a sliding attention window (MistralConfig defaults: 4096; null disables it). */
function normalizeMistral(f: Fields): ModelConfig {
  const config = normalizeLlama(f, "mistral");
  config.slidingWindow = Object.hasOwn(f.raw, "sliding_window") ? f.optInt("sliding_window", 1) : 4096;
  return config;
}

/** GPT-2: learned positions, LayerNorm, fused c_attn with biases; GPT2Config defaults. */
function normalizeGpt2(f: Fields): ModelConfig {
  if (f.bool("scale_attn_by_inverse_layer_idx", false)) {
    throw new UnsupportedConfigError(
      `${f.where} sets "scale_attn_by_inverse_layer_idx": true (attention scaled by 1/(layer+1)), which ` +
        `promptgate does not implement. Use a GPT-2 model without it.`,
    );
  }
  if (f.bool("add_cross_attention", false)) {
    throw new UnsupportedConfigError(
      `${f.where} sets "add_cross_attention": true (an encoder-decoder GPT-2), which promptgate does not ` +
        `implement; use a decoder-only GPT-2.`,
    );
  }
  const hiddenSize = f.int("n_embd");
  const numHeads = f.int("n_head");
  checkHeads(f, { hiddenSize, numHeads, numKvHeads: numHeads }, false);
  return {
    family: "gpt2",
    modelType: f.str("model_type", "gpt2"),
    vocabSize: f.int("vocab_size"),
    hiddenSize,
    intermediateSize: f.has("n_inner") ? f.int("n_inner") : 4 * hiddenSize,
    numLayers: f.int("n_layer"),
    numHeads,
    numKvHeads: numHeads,
    headDim: hiddenSize / numHeads,
    maxPositions: f.int("n_positions"),
    normEps: f.positive("layer_norm_epsilon", 1e-5),
    norm: "layernorm",
    activation: activation(f, "activation_function", "gelu_new"),
    tieWordEmbeddings: f.bool("tie_word_embeddings", true),
    attentionBias: true,
    mlpBias: true,
    ropeTheta: null,
    rope: null,
    slidingWindow: null,
    scaleAttnWeights: f.bool("scale_attn_weights", true),
    scaleAttnByInverseLayerIdx: false,
    reorderAndUpcastAttn: f.bool("reorder_and_upcast_attn", false),
    bosTokenId: f.tokenId("bos_token_id", 50256),
    eosTokenId: f.tokenIds("eos_token_id", 50256),
    padTokenId: f.tokenId("pad_token_id", null),
    raw: f.raw,
  };
}

/** `model_type` → normaliser. A Map, so a `model_type` such as "constructor" cannot hit Object.prototype. */
const NORMALISERS: ReadonlyMap<string, (f: Fields) => ModelConfig> = new Map<
  string,
  (f: Fields) => ModelConfig
>([
  ["llama", (f) => normalizeLlama(f, "llama")],
  ["mistral", normalizeMistral],
  ["gpt2", normalizeGpt2],
]);

/** The `model_type` values {@link normalizeConfig} accepts. */
export const SUPPORTED_MODEL_TYPES: readonly string[] = Object.freeze([...NORMALISERS.keys()]);

/**
 * Turn a parsed HF `config.json` into a validated {@link ModelConfig}.
 *
 * @param raw The parsed JSON (any value: it is validated).
 * @param source Where it came from, for error messages (default `"config.json"`).
 * @returns The normalised config; `raw` keeps the input.
 * @throws {UnsupportedConfigError} For a `model_type`, activation or RoPE scaling promptgate does not implement.
 * @throws {InvalidFileError} For missing or mistyped fields, or inconsistent head counts.
 *
 * @example Normalise a tiny llama config
 * ```ts
 * import { normalizeConfig } from "./hf_config.ts";
 * const config = normalizeConfig({
 *   model_type: "llama", vocab_size: 256, hidden_size: 64, intermediate_size: 128,
 *   num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2,
 * });
 * console.log(config.headDim, config.numKvHeads, config.ropeTheta); // 16 2 10000
 * ```
 */
export function normalizeConfig(raw: unknown, source = "config.json"): ModelConfig {
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) {
    throw new InvalidFileError(`${source} must hold a JSON object; download the model again.`);
  }
  const f = new Fields(raw as Raw, source);
  const modelType = f.get("model_type");
  if (typeof modelType !== "string") {
    throw new InvalidFileError(
      `${source} has no "model_type" string, so the architecture is unknown; supported model types: ` +
        `${SUPPORTED_MODEL_TYPES.join(", ")}.`,
    );
  }
  const normalise = NORMALISERS.get(modelType);
  if (normalise === undefined) {
    throw new UnsupportedConfigError(
      `${source} has model_type "${modelType}", which promptgate does not support; supported model types: ` +
        `${SUPPORTED_MODEL_TYPES.join(", ")}.`,
    );
  }
  return normalise(f);
}

async function readJsonObject(path: string, what: string): Promise<Raw | null> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return null;
    throw new InvalidFileError(`could not read ${what} ${path}: ${(error as Error).message}.`, {
      cause: error,
    });
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (error) {
    throw new InvalidFileError(
      `${path} is not valid JSON (${(error as Error).message}); fix it or download the model again.`,
      { cause: error },
    );
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new InvalidFileError(`${path} must hold a JSON object; fix it or download the model again.`);
  }
  return value as Raw;
}

/**
 * Read and normalise `config.json` from a model folder.
 *
 * @param folder The model folder.
 * @returns The normalised config.
 * @throws {InvalidFileError} When config.json is missing, not JSON, or invalid.
 * @throws {UnsupportedConfigError} When the architecture or one of its options is not supported.
 */
export async function loadModelConfig(folder: string): Promise<ModelConfig> {
  const path = join(folder, "config.json");
  const raw = await readJsonObject(path, "model config");
  if (raw === null) {
    throw new InvalidFileError(
      `no config.json in ${folder}; pass a Hugging Face model folder (config.json, *.safetensors, tokenizer.json).`,
    );
  }
  return normalizeConfig(raw, path);
}

/**
 * Read `generation_config.json` from a model folder, if there is one.
 *
 * @param folder The model folder.
 * @returns The decoding settings, or `null` when the folder has no generation_config.json.
 * @throws {InvalidFileError} When the file exists but is not valid JSON or has mistyped fields.
 */
export async function readGenerationConfig(folder: string): Promise<GenerationConfig | null> {
  const path = join(folder, "generation_config.json");
  const raw = await readJsonObject(path, "generation config");
  if (raw === null) return null;
  const f = new Fields(raw, path);
  return {
    bosTokenId: f.tokenId("bos_token_id", null),
    eosTokenId: f.tokenIds("eos_token_id", null),
    padTokenId: f.tokenId("pad_token_id", null),
    maxLength: f.optInt("max_length", 1),
    maxNewTokens: f.optInt("max_new_tokens", 1),
    doSample: f.optBool("do_sample"),
    temperature: f.has("temperature") ? f.positive("temperature", undefined, true) : null,
    topP: f.optPositive("top_p"),
    topK: f.optInt("top_k", 0),
    repetitionPenalty: f.optPositive("repetition_penalty"),
    raw,
  };
}

// ---------------------------------------------------------------------------------------------------
// RoPE inverse frequencies
// ---------------------------------------------------------------------------------------------------

/** Options for {@link computeRopeInvFreq}. */
export interface RopeInvFreqOptions {
  /**
   * Current sequence length, for `dynamic` (NTK) scaling only: transformers recomputes the frequencies
   * once a sequence grows past `maxPositions`. Shorter lengths give the unscaled frequencies.
   */
  seqLen?: number;
  /**
   * `"float32"` (default) rounds every step to float32 as PyTorch does, so results match transformers'
   * `inv_freq` buffer to within PyTorch's own `pow` rounding; `"float64"` computes exactly in double.
   */
  precision?: "float32" | "float64";
}

/**
 * The RoPE inverse frequencies θ_i (one per pair of head dimensions), as transformers computes them.
 *
 * - default: `1 / theta^(2i/d)` (`_compute_default_rope_parameters`);
 * - linear: the default divided by `factor` (`_compute_linear_scaling_rope_parameters`);
 * - dynamic: with `L = max(seqLen, maxPositions)`, base `theta · (factor·L/maxPositions − (factor−1))^(d/(d−2))`
 *   (`_compute_dynamic_ntk_parameters`);
 * - llama3: low frequencies divided by `factor`, high ones kept, a smooth blend between
 *   (`_compute_llama3_parameters`).
 *
 * @param config A normalised config with RoPE (llama, mistral).
 * @param options Sequence length (dynamic scaling) and arithmetic precision.
 * @returns `headDim / 2` inverse frequencies.
 * @throws {UnsupportedConfigError} For a model without RoPE (gpt2).
 *
 * @example Default RoPE for head_dim 8
 * ```ts
 * import { computeRopeInvFreq, normalizeConfig } from "./hf_config.ts";
 * const config = normalizeConfig({
 *   model_type: "llama", vocab_size: 32, hidden_size: 16, intermediate_size: 32,
 *   num_hidden_layers: 1, num_attention_heads: 2,
 * });
 * console.log(computeRopeInvFreq(config, { precision: "float64" })); // [1, 0.1, 0.01, 0.001]
 * ```
 */
export function computeRopeInvFreq(config: ModelConfig, options: RopeInvFreqOptions = {}): Float64Array {
  const { rope, ropeTheta } = config;
  if (rope === null || ropeTheta === null) {
    throw new UnsupportedConfigError(
      `${config.modelType} uses learned position embeddings, not RoPE; there are no inverse frequencies.`,
    );
  }
  // r() rounds to float32 where PyTorch holds a float32 tensor; identity in float64 mode.
  const r = options.precision === "float64" ? (x: number) => x : Math.fround;
  const dim = config.headDim;
  let base = ropeTheta;
  if (rope.type === "dynamic") {
    const maxPos = config.maxPositions;
    const seqLen = Math.max(options.seqLen ?? maxPos, maxPos);
    base = base * ((rope.factor * seqLen) / maxPos - (rope.factor - 1)) ** (dim / (dim - 2));
  }
  // PyTorch evaluates `base ** tensor` in float32, so the base itself is rounded first.
  const b = r(base);
  const out = new Float64Array(dim / 2);
  for (let i = 0; i < out.length; i++) out[i] = r(1 / r(b ** r((2 * i) / dim)));
  if (rope.type === "linear") {
    for (let i = 0; i < out.length; i++) out[i] = r(out[i]! / r(rope.factor));
  } else if (rope.type === "llama3") {
    const factor = rope.factor;
    const low = rope.lowFreqFactor!;
    const high = rope.highFreqFactor!;
    const oldContext = rope.originalMaxPositionEmbeddings!;
    // Python scalars meet float32 tensors here, so PyTorch rounds them to float32 too.
    const lowFreqWavelen = r(oldContext / low);
    const highFreqWavelen = r(oldContext / high);
    const twoPi = r(2 * Math.PI);
    for (let i = 0; i < out.length; i++) {
      const inv = out[i]!;
      const wavelen = r(twoPi / inv);
      if (wavelen > lowFreqWavelen) {
        out[i] = r(inv / r(factor));
      } else if (wavelen >= highFreqWavelen) {
        // Medium frequency: blend the scaled and unscaled values.
        const smooth = r(r(r(r(oldContext) / wavelen) - r(low)) / r(high - low));
        out[i] = r(r(r(r(1 - smooth) * inv) / r(factor)) + r(smooth * inv));
      }
    }
  }
  return out;
}
