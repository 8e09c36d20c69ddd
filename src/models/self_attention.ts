/**
 * Self-attention with an adaption prompt, forward and backward, shared by every family (the layout
 * table says whether queries get RoPE and whether the adapter output goes through the output
 * projection). The adapter reuses the layer's own queries — PEFT recomputes them — and its keys and
 * values are the layer's k/v projections of the prompt, computed once per step (training) or once per
 * adapter version (decode).
 *
 * Forward, with `h` the normed input (N, C):
 *   q, k, v = h Wqᵀ, h Wkᵀ, h Wvᵀ (+ biases); RoPE on q, k (llama)
 *   attn = softmax(q kᵀ · scale + mask) v                          (saved with its log-sum-exp)
 *   adapter: adp = g · softmax(q kₐᵀ · scale) vₐ                 (in the attention dispatch where it fits)
 *   llama: o = (attn + adp) Woᵀ + bo (+ bo again when adapted, as PEFT's o_proj(adapter) adds it)
 *   gpt2:  o = attn Woᵀ + bo + adp
 *
 * Decode (one token per batch row, no training) has its own forward, {@link selfAttentionDecode}: the
 * norm folded into the q/k/v matrix-vector products (one dispatch for the three where the device's
 * storage-binding limit allows, see `decodeQkvForward`), RoPE and the cache append folded into that
 * dispatch too in replayed llama steps (`kvCacheAppendRope` after the products where q/k/v have biases
 * or the bindings do not fit), the adapter folded into the attention kernel, and the output projection
 * added straight into the residual stream.
 *
 * @module
 */

import type { Recorder } from "../gpu/recorder.ts";
import { createStacked, createTensor, type Tensor } from "../gpu/tensor.ts";
import { attentionBackward, attentionForward } from "../../kernels/attention.ts";
import { adapterAttentionBackward } from "../../kernels/adapter_attention.ts";
import { ropeBackwardInPlace, ropeInPlace } from "../../kernels/rope.ts";
import { addBiasRows, addInto } from "../../kernels/activation.ts";
import { copyElements } from "../../kernels/fill.ts";
import { kvCacheAppend } from "../../kernels/kv_cache.ts";
import { decodeAttentionForward } from "../../kernels/decode_attention.ts";
import { decodeLinearForward, decodeQkvForward, type MatvecPrologue } from "../../kernels/decode_matvec.ts";
import { gateView, promptView } from "../adapters/state.ts";
import type { AdapterState } from "../adapters/state.ts";
import type { Activations, LayerActivations } from "./activations.ts";
import type { Model } from "./model.ts";
import { attentionScale, linear, linearBackward, linearResidual } from "./ops.ts";
import type { LayerWeights } from "./weights.ts";

/** A KV cache for decoding: keys and values of every layer, (B, Smax, Hkv, D). */
export interface KvCache {
  /** Keys per layer. */
  readonly k: Tensor[];
  /** Values per layer. */
  readonly v: Tensor[];
  /** Positions per batch row (Smax). */
  readonly maxLen: number;
  /** Batch size. */
  readonly batch: number;
  /** HF attention mask of the cached positions (B, Smax) i32; the decoder writes it as tokens arrive. */
  readonly mask: Tensor;
  /**
   * Replayable decode: the decode state u32 (4) whose element 0 is the cache position of this step's
   * first token. When set, keys/values are appended there by a kernel that reads it (and sets the mask
   * to 1 there) instead of at `past` through a uniform, so the step's dispatches are the same every step.
   */
  readonly position?: Tensor;
}

/** Everything one layer's forward or backward needs. */
export interface LayerContext {
  /** The recorder. */
  readonly rec: Recorder;
  /** The model. */
  readonly model: Model;
  /** The activations of this batch shape. */
  readonly acts: Activations;
  /** Layer index. */
  readonly layer: number;
  /** This layer's weights. */
  readonly w: LayerWeights;
  /** This layer's saved activations. */
  readonly la: LayerActivations;
  /**
   * Where the layer writes its output (next layer's input); null when the backward runs the layer's forward
   * again (gradient checkpointing): it then stops once what its backward reads is written, before the
   * MLP's activation and output product.
   */
  readonly out: Tensor | null;
  /** The running adapter and this layer's slot in it, or null when the layer is not adapted. */
  readonly adapter: { readonly state: AdapterState; readonly slot: number } | null;
  /** Whether the batch has padding (else the mask is skipped). */
  readonly masked: boolean;
  /** Decode: the cache and how many positions it already holds. */
  readonly cache: { readonly kv: KvCache; readonly past: number } | null;
}

function attentionOptions(ctx: LayerContext) {
  const c = ctx.model.config;
  const T = ctx.acts.T;
  const past = ctx.cache?.past ?? 0;
  return {
    numHeads: c.numHeads,
    numKvHeads: c.numKvHeads,
    headDim: c.headDim,
    batch: ctx.acts.B,
    queryLen: T,
    keyLen: past + T,
    kvStride: ctx.cache ? ctx.cache.kv.maxLen : T,
    queryOffset: past,
    scale: attentionScale(c),
    causal: true,
    slidingWindow: c.slidingWindow,
  };
}

function adapterOptions(ctx: LayerContext, state: AdapterState) {
  const c = ctx.model.config;
  return {
    numHeads: c.numHeads,
    numKvHeads: c.numKvHeads,
    headDim: c.headDim,
    adapterLen: state.config.adapterLen,
    rows: ctx.acts.N,
    scale: 1 / Math.sqrt(c.headDim),
    gateKind: state.config.gate,
  };
}

/** The layer's adapter keys, values, gate and softmax settings, as the fused attention kernels take them. */
function adapterInputs(ctx: LayerContext, a: { state: AdapterState; slot: number }) {
  return {
    ka: a.state.ka[a.slot]!,
    va: a.state.va[a.slot]!,
    gate: gateView(a.state, a.state.params, a.slot),
    adapterLen: a.state.config.adapterLen,
    gateKind: a.state.config.gate,
    scale: 1 / Math.sqrt(ctx.model.config.headDim),
  };
}

/**
 * Records the adapter keys and values of every adapted layer: kₐ = prompt Wkᵀ + bk, vₐ = prompt Wvᵀ + bv —
 * one product per layer against its stacked k|v weights where both sides are stacked (a matrix-vector
 * dispatch for a prompt of ≤ 16 tokens), else two.
 *
 * @param rec The recorder.
 * @param model The model.
 * @param state The adapter.
 */
export function adapterKeyValuesForward(rec: Recorder, model: Model, state: AdapterState): void {
  state.slots.forEach((s, i) => {
    const w = model.weights.layers[s.layer]!;
    const prompt = promptView(state, state.params, i, model.config.hiddenSize);
    const kva = state.kva[i], kv = w.qkv?.kv;
    if (kva && kv) {
      linear(rec, kva, prompt, kv, false, true, kvGroups(state));
      return;
    }
    linear(rec, state.ka[i]!, prompt, w.k);
    linear(rec, state.va[i]!, prompt, w.v);
  });
}

/** Column groups of an adapter's keys and values side by side: `[Hkv*D, 2 Hkv*D]` (two blocks). */
function kvGroups(state: AdapterState): [number, number] {
  const width = state.ka[0]!.shape[1]!;
  return [width, 2 * width];
}

/**
 * Records the self-attention of one layer. `h` is the normed input; the result is written to
 * `la.x2 = x + o` (the residual add included).
 *
 * @param ctx The layer context.
 * @param h Normed input (N, C).
 */
export function selfAttentionForward(ctx: LayerContext, h: Tensor): void {
  const { rec, model, acts, la, w } = ctx;
  if (w.qkv && la.qkv) {
    // (N, C) -> q, k, v in one product against the stacked weights
    linear(rec, la.qkv, h, w.qkv.lin, false, true, w.qkv.groups);
  } else {
    linear(rec, la.q, h, w.q);
    linear(rec, la.k, h, w.k);
    linear(rec, la.v, h, w.v);
  }
  ropeQueriesKeys(ctx);
  let keys = la.k, values = la.v;
  if (ctx.cache) {
    appendToCache(ctx);
    keys = ctx.cache.kv.k[ctx.layer]!;
    values = ctx.cache.kv.v[ctx.layer]!;
  }
  const mask = ctx.masked ? (ctx.cache ? ctx.cache.kv.mask : acts.mask) : null;
  const adapter = ctx.adapter;
  const through = model.layout.adapterThroughOutProj;
  // the adapter attention rides in the attention dispatch where it fits (llama: adp = attn + adapter,
  // then one o_proj; gpt2: adp = adapter, added after c_proj)
  attentionForward(
    rec,
    la.attn,
    acts.training ? la.lse : null,
    la.q,
    keys,
    values,
    mask,
    attentionOptions(ctx),
    adapter
      ? {
        ...adapterInputs(ctx, adapter),
        out: acts.adp,
        withMain: through,
      }
      : undefined,
  );
  if (!adapter) {
    linearResidual(rec, la.x2, la.attn, w.o, la.x);
    return;
  }
  if (through) {
    // PEFT runs o_proj on the attention and on the adapter output apart: its bias counts twice
    linearResidual(rec, la.x2, acts.adp, w.o, la.x);
    if (w.o.b) addBiasRows(rec, la.x2, w.o.b);
  } else {
    linearResidual(rec, la.x2, la.attn, w.o, la.x);
    addInto(rec, la.x2, acts.adp);
  }
}

/**
 * RoPE on this step's queries and keys (in place), for families that use it: one dispatch where the keys
 * follow the queries in one buffer (stacked q/k/v), else two.
 */
function ropeQueriesKeys(ctx: LayerContext): void {
  const { rec, model, acts, la } = ctx;
  if (!model.layout.rope) return;
  ropeBoth(rec, model, acts.positions, la.q, la.k, la.qkv !== null, ropeInPlace);
}

/** `rope` on q and then k, or on both at once when `stacked` (k follows q in their buffer). */
function ropeBoth(
  rec: Recorder,
  model: Model,
  positions: Tensor,
  q: Tensor,
  k: Tensor,
  stacked: boolean,
  rope: typeof ropeInPlace,
): void {
  const c = model.config;
  if (stacked) rope(rec, q, model.invFreq!, positions, c.numHeads, { x: k, numHeads: c.numKvHeads });
  else {
    rope(rec, q, model.invFreq!, positions, c.numHeads);
    rope(rec, k, model.invFreq!, positions, c.numKvHeads);
  }
}

/** Appends this step's keys/values (B, T, Hkv*D) to the cache rows [past, past + T) of each batch row. */
function appendToCache(ctx: LayerContext): void {
  const { rec, model, acts, la } = ctx;
  const { kv, past } = ctx.cache!;
  const width = model.config.numKvHeads * model.config.headDim;
  const keys = kv.k[ctx.layer]!, values = kv.v[ctx.layer]!;
  if (kv.position) {
    kvCacheAppend(rec, keys, values, kv.mask, la.k, la.v, kv.position, {
      batch: acts.B,
      tokens: acts.T,
      width,
      maxLen: kv.maxLen,
    });
    return;
  }
  for (let b = 0; b < acts.B; b++) {
    const dst = (b * kv.maxLen + past) * width;
    copyElements(rec, la.k, keys, acts.T * width, b * acts.T * width, dst);
    copyElements(rec, la.v, values, acts.T * width, b * acts.T * width, dst);
  }
}

/**
 * Records the self-attention of one layer for a decode step (one token per batch row, inference):
 * `x += SelfAttention(norm(x))` in place on the residual stream `x` (B, C), the norm applied inside the
 * q/k/v matrix-vector products (`prologue`; one dispatch for the three where the bindings fit), RoPE
 * and the cache append inside that dispatch too (replayed llama steps without q/k/v biases), the
 * adapter inside the attention kernel (llama: added before o_proj; gpt2: added into `x`), and o_proj
 * added into `x`. Needs `ctx.cache` and single-range q/k/v/o weights the fused kernels take (see
 * `decodeFusable` in transformer.ts).
 *
 * @param ctx The layer context (decode).
 * @param x Residual stream (B, C), updated in place.
 * @param prologue The layer's first norm, applied on the fly.
 */
export function selfAttentionDecode(ctx: LayerContext, x: Tensor, prologue: MatvecPrologue): void {
  const { rec, model, acts, la, w } = ctx;
  const c = model.config;
  const { kv } = ctx.cache!;
  if (model.layout.rope && kv.position) {
    // (B, C) -> rotated q (B, H*D), rotated k and v into the cache rows at state[0]: one dispatch where
    // there are no biases and the bindings fit, else the products and kvCacheAppendRope
    decodeQkvForward(rec, la.q, la.k, la.v, x, w.q.w, w.k.w, w.v.w, w.q.b, w.k.b, w.v.b, {
      prologue,
      rope: {
        invFreq: model.invFreq!,
        positions: acts.positions,
        state: kv.position,
        kCache: kv.k[ctx.layer]!,
        vCache: kv.v[ctx.layer]!,
        mask: kv.mask,
        numHeads: c.numHeads,
        numKvHeads: c.numKvHeads,
        maxLen: kv.maxLen,
        tokens: acts.T,
      },
    });
  } else {
    // (B, C) -> (B, H*D), (B, Hkv*D) x2: one dispatch where the bindings fit, else three
    decodeQkvForward(rec, la.q, la.k, la.v, x, w.q.w, w.k.w, w.v.w, w.q.b, w.k.b, w.v.b, { prologue });
    ropeQueriesKeys(ctx);
    appendToCache(ctx);
  }
  const adapter = ctx.adapter;
  const through = model.layout.adapterThroughOutProj;
  decodeAttentionForward(
    rec,
    la.attn,
    la.q,
    kv.k[ctx.layer]!,
    kv.v[ctx.layer]!,
    ctx.masked ? kv.mask : null,
    attentionOptions(ctx),
    adapter
      ? {
        ...adapterInputs(ctx, adapter),
        into: through ? null : x, // llama: attn + adapter through o_proj; gpt2: adapter into x
      }
      : null,
  );
  // (B, H*D) -> (B, C), added into the residual stream
  decodeLinearForward(rec, x, la.attn, w.o.w, w.o.b, { accumulate: true });
  if (adapter && through && w.o.b) addBiasRows(rec, x, w.o.b); // PEFT's o_proj(adapter) adds it again
}

/**
 * Records the backward of one layer's self-attention. On entry `acts.grad.res` holds d x2; on exit
 * `acts.grad.h` holds d h (the normed input) unless `needInput` is false — the lowest adapted layer
 * skips everything that only feeds layers below it. Adapter gradients are written into the adapter's
 * flat gradient buffer.
 *
 * @param ctx The layer context.
 * @param needInput Whether the gradient to the layer input is needed.
 */
export function selfAttentionBackward(ctx: LayerContext, needInput: boolean): void {
  const { rec, model, acts, la, w } = ctx;
  const c = model.config;
  const d = acts.grad;
  linearBackward(rec, d.attn, d.res, w.o); // d attn (+ adapter when through o_proj)
  const adapter = ctx.adapter;
  if (needInput) {
    attentionBackward(
      rec,
      d.q,
      d.k,
      d.v,
      d.attn,
      la.attn,
      la.lse,
      la.q,
      la.k,
      la.v,
      ctx.masked ? acts.mask : null,
      {
        ...attentionOptions(ctx),
      },
    );
  }
  if (adapter) {
    const { state, slot } = adapter;
    const grads = state.grads!;
    const dOut = model.layout.adapterThroughOutProj ? d.attn : d.res;
    const scratch = adapterGradScratch(ctx, state);
    adapterAttentionBackward(
      rec,
      d.q,
      scratch.dka,
      scratch.dva,
      gateView(state, grads, slot),
      dOut,
      la.q,
      state.ka[slot]!,
      state.va[slot]!,
      gateView(state, state.params, slot),
      { ...adapterOptions(ctx, state), accumulate: needInput },
    );
    const dPrompt = promptView(state, grads, slot, c.hiddenSize);
    const kv = w.qkv?.kv;
    if (scratch.dkva && kv) {
      linearBackward(rec, dPrompt, scratch.dkva, kv, false, kvGroups(state));
    } else {
      linearBackward(rec, dPrompt, scratch.dka, w.k);
      linearBackward(rec, dPrompt, scratch.dva, w.v, true);
    }
  }
  if (!needInput) return;
  if (model.layout.rope) {
    ropeBoth(rec, model, acts.positions, d.q, d.k, d.qkv !== null, ropeBackwardInPlace);
  }
  if (w.qkv && d.qkv) {
    linearBackward(rec, d.h, d.qkv, w.qkv.lin, false, w.qkv.groups);
    return;
  }
  linearBackward(rec, d.h, d.q, w.q);
  linearBackward(rec, d.h, d.k, w.k, true);
  linearBackward(rec, d.h, d.v, w.v, true);
}

/** The gradients of an adapter's keys and values, side by side in `dkva` where the adapter stacks them. */
interface KeyValueGrads {
  dka: Tensor;
  dva: Tensor;
  dkva: Tensor | null;
}

const gradScratch = new WeakMap<AdapterState, KeyValueGrads>();

/**
 * The (L, Hkv*D) gradients of the adapter keys/values, one pair per adapter (layers run one at a time), in
 * one buffer when the adapter keeps its keys and values so (one product then gives the prompt's gradient).
 */
function adapterGradScratch(ctx: LayerContext, state: AdapterState): KeyValueGrads {
  let s = gradScratch.get(state);
  if (!s) {
    const shape = state.ka[0]!.shape;
    const label = `adapter ${state.name}`;
    const both = state.kva[0]
      ? createStacked(ctx.model.gpu, [shape, shape], "f32", `${label} dkva`, [`${label} dka`, `${label} dva`])
      : null;
    s = both ? { dka: both.parts[0]!, dva: both.parts[1]!, dkva: both.whole } : {
      dka: createTensor(ctx.model.gpu, shape, "f32", `${label} dka`),
      dva: createTensor(ctx.model.gpu, shape, "f32", `${label} dva`),
      dkva: null,
    };
    gradScratch.set(state, s);
  }
  return s;
}
