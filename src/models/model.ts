/**
 * The `Model`: a base model's config and GPU weights, its adapters, and the per-shape buffers that
 * forwards, training steps and decodes reuse. Users get one from `loadModel` and pass it to the
 * functional API; its fields are readable but managed by promptgate.
 *
 * @module
 */

import type { Gpu } from "../gpu/device.ts";
import type { Tensor } from "../gpu/tensor.ts";
import type { ModelConfig } from "../io/hf_config.ts";
import type { AdapterState } from "../adapters/state.ts";
import type { Layout } from "./layout.ts";
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
