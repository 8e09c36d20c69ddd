/**
 * The activation buffers of one batch shape `(B, T)`, allocated once and reused by every forward,
 * training step and decode step of that shape. Layers at or above `saveFrom` (the lowest adapted
 * layer, when training) keep what their backward needs; layers below share two ping-pong buffers and
 * keep nothing, so backward never runs — and memory is never spent — below the lowest adapter.
 * With gradient checkpointing (`checkpoint`) the saved layers keep only their input `x` and share one
 * set of everything else: the backward runs each layer's forward again into that set before its
 * backward (HF's `gradient_checkpointing`, one layer at a time).
 * An f16 model's activations are f16 (`dtype`): the kernels load them into f32, compute in f32 and round
 * once at the store; statistics, the loss and all gradients stay f32.
 *
 * @module
 */

import type { Gpu } from "../gpu/device.ts";
import { createStacked, createTensor, type DType, type Tensor } from "../gpu/tensor.ts";
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
  /** q, k and v as one stack (their buffer, in that order) for one product, or null when apart. */
  readonly qkv: Tensor | null;
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
  /** llama: gate and up as one stack (their buffer, in that order) for one product, or null when apart. */
  readonly gu: Tensor | null;
}

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
  /**
   * Gradient checkpointing: the saved layers keep only `x` and share the rest of one layer set, which the
   * backward fills again by re-running each layer's forward (false when not training).
   */
  readonly checkpoint: boolean;
  /**
   * Element type of the activations (residual stream, normed inputs, q/k/v, attention and MLP outputs,
   * final hidden state); statistics, ids, the loss and every gradient stay f32.
   */
  readonly dtype: "f32" | "f16";
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
    /** d q, d k, d v as one stack, or null when apart. */
    readonly qkv: Tensor | null;
    readonly g: Tensor;
    readonly u: Tensor;
    /** d gate, d up as one stack (llama), or null when apart. */
    readonly gu: Tensor | null;
  };
}

const mlpScratch = new WeakMap<Activations, Tensor>();

/**
 * The f32 (N, I) buffer of `d a`, the gradient of an MLP's activation output, for a backward whose down
 * product cannot take the activation's backward in its epilogue (weights split in row ranges, or
 * `epilogueTuning.fuse` off): created on first use, so the usual fused path never allocates it.
 *
 * @param gpu The GPU.
 * @param acts The training activations.
 * @returns The buffer.
 */
export function mlpGradScratch(gpu: Gpu, acts: Activations): Tensor {
  let t = mlpScratch.get(acts);
  if (!t) {
    t = createTensor(gpu, [acts.N, acts.a.shape[1]!], "f32", "d.a");
    mlpScratch.set(acts, t);
  }
  return t;
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
 * @param dtype Element type of the activations (f16 needs shader-f16; statistics and gradients stay f32).
 * @param checkpoint Gradient checkpointing (training only): saved layers keep only their input.
 * @returns The buffers.
 */
export function createActivations(
  gpu: Gpu,
  config: ModelConfig,
  B: number,
  T: number,
  training: boolean,
  saveFrom: number,
  dtype: "f32" | "f16" = "f32",
  checkpoint = false,
): Activations {
  // say what fits before allocating anything
  checkActivationsFit(gpu, config, B, T, training, saveFrom, dtype, checkpoint);
  const N = B * T;
  const C = config.hiddenSize, H = config.numHeads, Hkv = config.numKvHeads, D = config.headDim;
  const I = config.intermediateSize;
  // t: f32 or i32 (statistics, ids, loss, gradients); a: an activation in `dtype`
  const t = (shape: number[], label: string, type: "f32" | "i32" = "f32") =>
    createTensor(gpu, shape, type, label);
  const a = (shape: number[], label: string) => createTensor(gpu, shape, dtype, label);
  // parts in one buffer where their offsets and the whole can be bound (one product writes them all, one
  // reads their gradients): q, k and v; a llama MLP's gate and up
  const stackOrApart = (shapes: number[][], type: DType, label: string, names: string[]) => {
    const s = createStacked(gpu, shapes, type, label, names);
    return {
      parts: s ? s.parts : shapes.map((shape, i) => createTensor(gpu, shape, type, names[i])),
      whole: s?.whole,
    };
  };
  const qkvSet = (type: DType, label: string) => {
    const names = ["q", "k", "v"].map((n) => `${label}.${n}`);
    const s = stackOrApart([[N, H * D], [N, Hkv * D], [N, Hkv * D]], type, `${label}.qkv`, names);
    const [q, k, v] = s.parts;
    return { q: q!, k: k!, v: v!, qkv: s.whole ?? null };
  };
  const guSet = (type: DType, label: string, gu: (shape: number[], name: string) => Tensor) => {
    if (config.family === "gpt2") {
      return { g: gu([1, I], `${label}.g`), u: gu([N, I], `${label}.u`), gu: null };
    }
    const s = stackOrApart([[N, I], [N, I]], type, `${label}.gu`, [`${label}.g`, `${label}.u`]);
    return { g: s.parts[0]!, u: s.parts[1]!, gu: s.whole ?? null };
  };
  const layerSet = (label: string, x: Tensor): LayerActivations => ({
    x,
    rstd1: t([N], `${label}.rstd1`),
    mean1: t([N], `${label}.mean1`),
    ...qkvSet(dtype, label),
    attn: a([N, H * D], `${label}.attn`),
    lse: t([B, H, T], `${label}.lse`),
    x2: a([N, C], `${label}.x2`),
    rstd2: t([N], `${label}.rstd2`),
    mean2: t([N], `${label}.mean2`),
    ...guSet(dtype, label, a),
  });
  const L = config.numLayers;
  const from = training ? saveFrom : L;
  const ckpt = training && checkpoint;
  const ping = [a([N, C], "resid.ping"), a([N, C], "resid.pong")];
  let shared: LayerActivations | null = null;
  const layers: LayerActivations[] = [];
  for (let l = 0; l < L; l++) {
    if (l >= from && !ckpt) layers.push(layerSet(`layer${l}`, a([N, C], `layer${l}.x`)));
    else {
      shared ??= layerSet("shared", ping[0]!);
      layers.push({ ...shared, x: l >= from ? a([N, C], `layer${l}.x`) : ping[l % 2]! });
    }
  }
  const g = (shape: number[], label: string) => training ? t(shape, label) : t([1], label);
  return {
    B,
    T,
    N,
    training,
    saveFrom: from,
    checkpoint: ckpt,
    dtype,
    ids: t([N], "ids", "i32"),
    positions: t([N], "positions", "i32"),
    mask: t([B, T], "mask", "i32"),
    labels: t([N], "labels", "i32"),
    layers,
    xFinal: a([N, C], "xFinal"),
    hFinal: a([N, C], "hFinal"),
    rstdF: t([N], "rstdF"),
    meanF: t([N], "meanF"),
    loss: t([1], "loss"),
    h: a([N, C], "h"),
    adp: a([N, Math.max(H * D, C)], "adp"),
    a: a([N, I], "a"),
    grad: {
      res: g([N, C], "d.res"),
      h: g([N, C], "d.h"),
      attn: g([N, Math.max(H * D, C)], "d.attn"),
      ...(training
        ? qkvSet("f32", "d")
        : { q: t([1], "d.q"), k: t([1], "d.k"), v: t([1], "d.v"), qkv: null }),
      ...(training ? guSet("f32", "d", g) : { g: t([1], "d.g"), u: t([1], "d.u"), gu: null }),
    },
  };
}

/**
 * Destroys every buffer of an activation set (with its {@link mlpGradScratch}, if one was made).
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
  mlpScratch.get(acts)?.buffer.destroy();
  mlpScratch.delete(acts);
}
