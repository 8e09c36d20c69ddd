/**
 * The pure building blocks of an adaption prompt, usable on your own GPU tensors: the query states a
 * layer's adapter attends with, the adapter keys/values derived from a prompt, and the gated adapter
 * attention itself. Each records dispatches into a `Recorder` (submit it when done) and returns its
 * output tensor; none reads back.
 *
 * @module
 */

import type { Recorder } from "../gpu/recorder.ts";
import type { Tensor } from "../gpu/tensor.ts";
import { ropeInPlace } from "../../kernels/rope.ts";
import { adapterAttentionForward } from "../../kernels/adapter_attention.ts";
import type { Model } from "../models/model.ts";
import { linear } from "../models/ops.ts";
import type { GateKind } from "./config.ts";

/**
 * Query states of layer `layer` for normed hidden states — `h Wqᵀ (+ b)`, with RoPE for llama-like
 * layouts (what PEFT's `compute_query_states` returns, laid out `(B, T, H, D)`).
 *
 * @param rec The recorder.
 * @param model The model.
 * @param layer Layer index.
 * @param hidden Normed hidden states (N, C).
 * @param positions Positions (N) i32.
 * @param out Output (N, H*D).
 * @returns `out`.
 * @example Queries of layer 0
 * ```ts ignore
 * const rec = new Recorder(model.gpu);
 * computeQueryStates(rec, model, 0, hidden, positions, q);
 * rec.submit();
 * ```
 */
export function computeQueryStates(
  rec: Recorder,
  model: Model,
  layer: number,
  hidden: Tensor,
  positions: Tensor,
  out: Tensor,
): Tensor {
  linear(rec, out, hidden, model.weights.layers[layer]!.q);
  if (model.layout.rope) ropeInPlace(rec, out, model.invFreq!, positions, model.config.numHeads);
  return out;
}

/**
 * Adapter keys and values of a prompt in layer `layer`: the layer's k/v projections of the prompt,
 * without RoPE (PEFT's semantics).
 *
 * @param rec The recorder.
 * @param model The model.
 * @param layer Layer index.
 * @param prompt The adaption prompt (L, C).
 * @param ka Output keys (L, Hkv*D).
 * @param va Output values (L, Hkv*D).
 * @returns `{ ka, va }`.
 */
export function adapterKeyValues(
  rec: Recorder,
  model: Model,
  layer: number,
  prompt: Tensor,
  ka: Tensor,
  va: Tensor,
): { ka: Tensor; va: Tensor } {
  const w = model.weights.layers[layer]!;
  linear(rec, ka, prompt, w.k);
  linear(rec, va, prompt, w.v);
  return { ka, va };
}

/** Sizes for {@link gatedAdapterScores}. */
export interface AdaptedAttentionShape {
  /** Query heads H. */
  numHeads: number;
  /** Key/value heads Hkv. */
  numKvHeads: number;
  /** Head size D. */
  headDim: number;
  /** Adapter tokens L. */
  adapterLen: number;
  /** Rows N = B*T. */
  rows: number;
  /** Gate form (default scalar). */
  gateKind?: GateKind;
  /** Add into `out` instead of overwriting it. */
  accumulate?: boolean;
}

/**
 * The gated adapter attention: `out = g · softmax(q kₐᵀ / √D) vₐ`, the softmax in f32 over the L
 * adapter tokens only (no causal or padding mask), GQA without repeating kv heads.
 *
 * @param rec The recorder.
 * @param out Output (N, H*D).
 * @param q Query states (N, H*D).
 * @param ka Adapter keys (L, Hkv*D).
 * @param va Adapter values (L, Hkv*D).
 * @param gate Gate: 1 value (scalar) or H values.
 * @param shape Sizes and gate form.
 * @returns `out`.
 */
export function gatedAdapterScores(
  rec: Recorder,
  out: Tensor,
  q: Tensor,
  ka: Tensor,
  va: Tensor,
  gate: Tensor,
  shape: AdaptedAttentionShape,
): Tensor {
  adapterAttentionForward(rec, out, q, ka, va, gate, {
    numHeads: shape.numHeads,
    numKvHeads: shape.numKvHeads,
    headDim: shape.headDim,
    adapterLen: shape.adapterLen,
    rows: shape.rows,
    scale: 1 / Math.sqrt(shape.headDim),
    gateKind: shape.gateKind ?? "scalar",
    accumulate: shape.accumulate ?? false,
  });
  return out;
}

/** Another name for {@link gatedAdapterScores}, as the design calls it. */
export const adaptedAttention: typeof gatedAdapterScores = gatedAdapterScores;
