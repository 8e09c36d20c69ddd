/**
 * The `Model`: a base model's config and GPU weights, its adapters, and the per-shape buffers that
 * forwards, training steps and decodes reuse. Users get one from `loadModel` and pass it to the
 * functional API; its fields are readable but managed by promptgate.
 *
 * @module
 */

import type { Gpu } from "../gpu/device.ts";
import { type Tensor, tensorFrom } from "../gpu/tensor.ts";
import { computeRopeInvFreq, type ModelConfig } from "../io/hf_config.ts";
import { UnsupportedConfigError } from "../errors.ts";
import type { AdapterState } from "../adapters/state.ts";
import { type Layout, LAYOUTS } from "./layout.ts";
import type { Weights } from "./weights.ts";
import type { Activations } from "./activations.ts";

/** A loaded model with its adapters. */
export interface Model {
  /** The GPU it lives on. */
  readonly gpu: Gpu;
  /** Normalised config. */
  readonly config: ModelConfig;
  /** The family's layout table. */
  readonly layout: Layout;
  /** Compute dtype of the weights. */
  readonly dtype: "f32" | "f16";
  /** Base weights (frozen). */
  readonly weights: Weights;
  /** RoPE inverse frequencies (D/2) for llama-like models, else null. */
  readonly invFreq: Tensor | null;
  /** Longest sequence (prompt + generated) this model instance serves. */
  readonly maxSeqLen: number;
  /** Where it was loaded from (folder or hub id). */
  readonly source: string;
  /** The local folder holding its files (the hub cache snapshot for a hub id; "" for a random model). */
  readonly folder: string;
  /** Adapters by name. */
  readonly adapters: Map<string, AdapterState>;
  /** The active adapter's name, or null. */
  active: string | null;
  /** Whether adapters are disabled (the base model runs). */
  disabled: boolean;
  /**
   * Gradient checkpointing for training (HF's `gradient_checkpointing`), default false: the adapted
   * layers keep only their input between a step's forward and backward, and the backward runs each
   * layer's forward again, so training takes less memory (TinyLlama-1.1B at 4 × 512 tokens in f32: 8.0 →
   * 5.1 GiB on an H100) for 10-30% more time a step. The gradients are bit-identical. Set it before the
   * first training step of a batch shape: each setting keeps its own buffers.
   *
   * @example Train with less memory
   * ```ts ignore
   * const model = await loadModel("TinyLlama/TinyLlama-1.1B-Chat-v1.0");
   * model.gradientCheckpointing = true;
   * ```
   */
  gradientCheckpointing: boolean;
  /** Activation buffers by batch shape and mode. */
  readonly activations: Map<string, Activations>;
}

/**
 * The adapter that runs now: the active one unless adapters are disabled.
 *
 * @param model The model.
 * @returns The adapter state or null.
 */
export function runningAdapter(model: Model): AdapterState | null {
  if (model.disabled || model.active === null) return null;
  return model.adapters.get(model.active) ?? null;
}

/**
 * Checks the dtype and maximum sequence length asked for a model against the GPU and the config.
 *
 * @param gpu The GPU.
 * @param config The model config.
 * @param options `dtype` (default f32) and `maxSeqLen` (default: the config's maximum, at most 4096).
 * @returns The settled dtype and maximum sequence length.
 */
export function resolveModelOptions(
  gpu: Gpu,
  config: ModelConfig,
  options: { dtype?: "f32" | "f16"; maxSeqLen?: number },
): { dtype: "f32" | "f16"; maxSeqLen: number } {
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
  return { dtype, maxSeqLen };
}

/**
 * Assembles a model with no adapter from its weights (loaded or random).
 *
 * @param parts GPU, config, dtype, weights, maximum sequence length, source and folder.
 * @returns The model.
 */
export function assembleModel(parts: {
  gpu: Gpu;
  config: ModelConfig;
  dtype: "f32" | "f16";
  weights: Weights;
  maxSeqLen: number;
  source: string;
  folder: string;
}): Model {
  const layout = LAYOUTS[parts.config.family];
  const invFreq = layout.rope
    ? tensorFrom(parts.gpu, Float32Array.from(computeRopeInvFreq(parts.config)), undefined, "rope inv_freq")
    : null;
  return {
    ...parts,
    layout,
    invFreq,
    adapters: new Map(),
    active: null,
    disabled: false,
    gradientCheckpointing: false,
    activations: new Map(),
  };
}
