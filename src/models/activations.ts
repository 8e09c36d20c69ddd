/**
 * The activation buffers of one batch shape `(B, T)`, allocated once and reused by every forward,
 * training step and decode step of that shape. Layers at or above `saveFrom` (the lowest adapted
 * layer, when training) keep what their backward needs; layers below share two ping-pong buffers and
 * keep nothing, so backward never runs — and memory is never spent — below the lowest adapter.
 *
 * @module
 */

import type { Gpu } from "../gpu/device.ts";
import { createTensor, type Tensor } from "../gpu/tensor.ts";
import type { ModelConfig } from "../io/hf_config.ts";
import { checkActivationsFit } from "./memory.ts";

/** What one layer keeps for its backward (B, T, H, D legend; N = B*T). */
export interface LayerActivations {
  /** Layer input, the residual stream (N, C). */
  readonly x: Tensor;
  /** 1/std of the first norm (N). */
  readonly rstd1: Tensor;
  /** Mean of the first norm (N), LayerNorm only. */
  readonly mean1: Tensor;
  /** Queries after RoPE (N, H*D). */
  readonly q: Tensor;
  /** Keys after RoPE (N, Hkv*D). */
  readonly k: Tensor;
  /** Values (N, Hkv*D). */
  readonly v: Tensor;
  /** Main attention output, before the adapter is added (N, H*D). */
  readonly attn: Tensor;
  /** Log-sum-exp of the attention rows (B, H, T). */
  readonly lse: Tensor;
  /** Residual stream after attention (N, C). */
  readonly x2: Tensor;
  /** 1/std of the second norm (N). */
  readonly rstd2: Tensor;
  /** Mean of the second norm (N), LayerNorm only. */
  readonly mean2: Tensor;
  /** MLP gate pre-activation (N, I), llama only. */
  readonly g: Tensor;
  /** MLP up projection (llama) or c_fc output before gelu (gpt2) (N, I). */
  readonly u: Tensor;
}

/** A layer activation the f16 stash keeps (the large ones; statistics stay f32). */
export type StashedActivation = "x" | "q" | "k" | "v" | "attn" | "x2" | "g" | "u";

/** Every {@link StashedActivation}, in the order they are cast. */
export const STASHED: readonly StashedActivation[] = ["x", "q", "k", "v", "attn", "x2", "g", "u"];

/** One saved layer's f16 copies of its large activations (`g` absent for gpt2). */
export type LayerStash = Partial<Record<StashedActivation, Tensor>>;

/** All buffers of one batch shape. */
export interface Activations {
  /** Batch size. */
  readonly B: number;
  /** Sequence length. */
  readonly T: number;
  /** Rows, B*T. */
  readonly N: number;
  /** Whether layers from `saveFrom` up keep activations and backward buffers exist. */
  readonly training: boolean;
  /** Lowest layer whose activations are kept (numLayers when not training). */
  readonly saveFrom: number;
  /** Token ids (N) i32. */
  readonly ids: Tensor;
  /** Positions (N) i32. */
  readonly positions: Tensor;
  /** HF attention mask (B, T) i32. */
  readonly mask: Tensor;
  /** Labels shifted by one, -100 ignored (N) i32. */
  readonly labels: Tensor;
  /** Per layer activations (saved layers own theirs; the others share scratch). */
  readonly layers: LayerActivations[];
  /** Per layer f16 stash (`stashF16`: the saved layers), else null. */
  readonly stash: (LayerStash | null)[];
  /** Output of the last layer (N, C). */
  readonly xFinal: Tensor;
  /** After the final norm (N, C). */
  readonly hFinal: Tensor;
  /** Final norm statistics (N). */
  readonly rstdF: Tensor;
  /** Final norm mean (N), LayerNorm only. */
  readonly meanF: Tensor;
  /** Mean loss (1). */
  readonly loss: Tensor;
  /** Normed hidden state scratch (N, C). */
  readonly h: Tensor;
  /** Attention plus adapter output (N, H*D). */
  readonly adp: Tensor;
  /** MLP activation scratch (N, I). */
  readonly a: Tensor;
  /** Gradient buffers (training only; tiny placeholders otherwise). */
  readonly grad: {
    readonly res: Tensor;
    readonly h: Tensor;
    readonly attn: Tensor;
    readonly q: Tensor;
    readonly k: Tensor;
    readonly v: Tensor;
    readonly g: Tensor;
    readonly u: Tensor;
    readonly a: Tensor;
  };
}

/**
 * Allocates the buffers of a batch shape.
 *
 * @param gpu The GPU.
 * @param config The model config.
 * @param B Batch size.
 * @param T Sequence length.
 * @param training Whether to keep activations for backward.
 * @param saveFrom Lowest layer to keep (the lowest adapted layer).
 * @param stashF16 Keep the saved layers' large activations in f16 between forward and backward.
 * @returns The buffers.
 */
export function createActivations(
  gpu: Gpu,
  config: ModelConfig,
  B: number,
  T: number,
  training: boolean,
  saveFrom: number,
  stashF16 = false,
): Activations {
  // say what fits before allocating anything
  checkActivationsFit(gpu, config, B, T, training, saveFrom);
  const N = B * T;
  const C = config.hiddenSize, H = config.numHeads, Hkv = config.numKvHeads, D = config.headDim;
  const I = config.intermediateSize;
  const t = (shape: number[], label: string, dtype: "f32" | "i32" = "f32") =>
    createTensor(gpu, shape, dtype, label);
  const layerSet = (label: string, x: Tensor): LayerActivations => ({
    x,
    rstd1: t([N], `${label}.rstd1`),
    mean1: t([N], `${label}.mean1`),
    q: t([N, H * D], `${label}.q`),
    k: t([N, Hkv * D], `${label}.k`),
    v: t([N, Hkv * D], `${label}.v`),
    attn: t([N, H * D], `${label}.attn`),
    lse: t([B, H, T], `${label}.lse`),
    x2: t([N, C], `${label}.x2`),
    rstd2: t([N], `${label}.rstd2`),
    mean2: t([N], `${label}.mean2`),
    g: t([config.family === "gpt2" ? 1 : N, I], `${label}.g`),
    u: t([N, I], `${label}.u`),
  });
  const L = config.numLayers;
  const from = training ? saveFrom : L;
  const ping = [t([N, C], "resid.ping"), t([N, C], "resid.pong")];
  let shared: LayerActivations | null = null;
  const layers: LayerActivations[] = [];
  const stash: (LayerStash | null)[] = [];
  const stashing = training && stashF16;
  for (let l = 0; l < L; l++) {
    if (l >= from && !stashing) {
      layers.push(layerSet(`layer${l}`, t([N, C], `layer${l}.x`)));
      stash.push(null);
    } else {
      shared ??= layerSet("shared", ping[0]!);
      if (l < from) {
        layers.push({ ...shared, x: ping[l % 2]! });
        stash.push(null);
        continue;
      }
      // saved, stashed: the shared working set, own statistics, f16 copies of the rest
      layers.push({
        ...shared,
        x: ping[l % 2]!,
        rstd1: t([N], `layer${l}.rstd1`),
        mean1: t([N], `layer${l}.mean1`),
        lse: t([B, H, T], `layer${l}.lse`),
        rstd2: t([N], `layer${l}.rstd2`),
        mean2: t([N], `layer${l}.mean2`),
      });
      const kept: LayerStash = {};
      for (const key of STASHED) {
        if (key === "g" && config.family === "gpt2") continue;
        kept[key] = createTensor(gpu, [...shared[key].shape], "f16", `layer${l}.${key} (f16)`);
      }
      stash.push(kept);
    }
  }
  const g = (shape: number[], label: string) => training ? t(shape, label) : t([1], label);
  return {
    B,
    T,
    N,
    training,
    saveFrom: from,
    stash,
    ids: t([N], "ids", "i32"),
    positions: t([N], "positions", "i32"),
    mask: t([B, T], "mask", "i32"),
    labels: t([N], "labels", "i32"),
    layers,
    xFinal: t([N, C], "xFinal"),
    hFinal: t([N, C], "hFinal"),
    rstdF: t([N], "rstdF"),
    meanF: t([N], "meanF"),
    loss: t([1], "loss"),
    h: t([N, C], "h"),
    adp: t([N, Math.max(H * D, C)], "adp"),
    a: t([N, I], "a"),
    grad: {
      res: g([N, C], "d.res"),
      h: g([N, C], "d.h"),
      attn: g([N, Math.max(H * D, C)], "d.attn"),
      q: g([N, H * D], "d.q"),
      k: g([N, Hkv * D], "d.k"),
      v: g([N, Hkv * D], "d.v"),
      g: g([N, I], "d.g"),
      u: g([N, I], "d.u"),
      a: g([N, I], "d.a"),
    },
  };
}

/**
 * Destroys every buffer of an activation set.
 *
 * @param acts The activations.
 */
export function destroyActivations(acts: Activations): void {
  const seen = new Set<GPUBuffer>();
  const visit = (v: unknown): void => {
    if (v && typeof v === "object") {
      if ("buffer" in v && (v as Tensor).buffer instanceof GPUBuffer) {
        const b = (v as Tensor).buffer;
        if (!seen.has(b)) {
          seen.add(b);
          b.destroy();
        }
        return;
      }
      for (const x of Object.values(v)) visit(x);
    }
  };
  visit(acts);
}
