/**
 * The whole decoder, recorded into one command buffer: embedding, every layer (through the family's
 * layer functions from the registry below), the final norm, and the head — logits for inference, or
 * the chunked LM-head cross-entropy with its gradient for training — then the backward from the top
 * layer down to the lowest adapted layer, never below (with gradient checkpointing, each layer's forward
 * runs again just before its backward).
 *
 * @module
 */

import type { Recorder } from "../gpu/recorder.ts";
import { createTensor, type Tensor, writeTensor } from "../gpu/tensor.ts";
import { embeddingForward, positionEmbeddingForward } from "../../kernels/embedding.ts";
import { layernormBackward, layernormForward, rmsnormBackward, rmsnormForward } from "../../kernels/norm.ts";
import {
  createCrossEntropyScratch,
  crossEntropyLmHead,
  type CrossEntropyScratch,
  logitsForward,
} from "../../kernels/cross_entropy.ts";
import { fill } from "../../kernels/fill.ts";
import { AdapterError, InvalidFileError } from "../errors.ts";
import type { ModelConfig } from "../io/hf_config.ts";
import { type AdapterState, slotOf } from "../adapters/state.ts";
import { type Activations, createActivations } from "./activations.ts";
import { gpt2LayerBackward, gpt2LayerDecode, gpt2LayerForward } from "./gpt2.ts";
import { llamaLayerBackward, llamaLayerDecode, llamaLayerForward } from "./llama.ts";
import { decodeMatvecApplies } from "../../kernels/decode_matvec.ts";
import type { Model } from "./model.ts";
import { adapterKeyValuesForward, type KvCache, type LayerContext } from "./self_attention.ts";

/** A family's layer forward, backward and decode step. */
interface LayerFunctions {
  forward(ctx: LayerContext): void;
  backward(ctx: LayerContext, needInput: boolean): void;
  decode(ctx: LayerContext, x: Tensor): void;
}

/** Registry: family → layer functions. */
const LAYER_FUNCTIONS: Record<ModelConfig["family"], LayerFunctions> = {
  llama: { forward: llamaLayerForward, backward: llamaLayerBackward, decode: llamaLayerDecode },
  mistral: { forward: llamaLayerForward, backward: llamaLayerBackward, decode: llamaLayerDecode },
  gpt2: { forward: gpt2LayerForward, backward: gpt2LayerBackward, decode: gpt2LayerDecode },
};

/**
 * Decode switch: `fused` (default) runs decode steps through the families' fused decode layers
 * (`llamaLayerDecode`, `gpt2LayerDecode`) whenever {@link decodeFusable} allows; false records them with
 * the general forward (benchmarks compare the two in one run; tests check they agree).
 */
export const decodeTuning: { fused: boolean } = { fused: true };

/**
 * Precision switch: `f16` (default) gives an f16 model f16 activations (the residual stream, q/k/v,
 * attention and MLP outputs, the KV cache; statistics and gradients stay f32); false keeps f32
 * activations under f16 weights (tests and benchmarks compare the two). f32 models always use f32.
 */
export const activationTuning: { f16: boolean } = { f16: true };

/**
 * The element type of a model's activations and KV cache.
 *
 * @param model The model.
 * @returns `"f16"` for an f16 model (unless {@link activationTuning} says otherwise), else `"f32"`.
 */
export function activationDtype(model: Model): "f32" | "f16" {
  return model.dtype === "f16" && activationTuning.f16 ? "f16" : "f32";
}

const fusableWeights = new WeakMap<Model, Map<number, boolean>>();

/**
 * Whether a forward can take the fused decode path: inference with a KV cache, one token per row, at
 * most 4 rows, and every layer weight in one binding that the fused matrix-vector kernels take.
 *
 * @param model The model.
 * @param acts The batch buffers.
 * @param opts The forward options.
 * @returns True when {@link recordForward} will run the fused decode layers.
 */
export function decodeFusable(model: Model, acts: Activations, opts: ForwardOptions): boolean {
  if (!decodeTuning.fused || acts.training || !opts.cache || acts.T !== 1) return false;
  let byRows = fusableWeights.get(model);
  if (!byRows) fusableWeights.set(model, byRows = new Map());
  let ok = byRows.get(acts.B);
  if (ok === undefined) {
    ok = model.weights.layers.every((w) =>
      [w.q, w.k, w.v, w.o, w.up, w.down, ...(w.gate ? [w.gate] : [])].every((lin) =>
        lin.ranges.length === 1 && decodeMatvecApplies(acts.B, lin.w.shape[1]!, lin.w)
      )
    );
    byRows.set(acts.B, ok);
  }
  return ok;
}

/** A batch as users pass it: token ids per row, optional HF attention mask and labels. */
export interface Batch {
  /** Token ids, B rows of T. */
  inputIds: number[][];
  /** 1 = real token, 0 = padding (default all ones). */
  attentionMask?: number[][];
  /** Labels for HF causal-LM loss (-100 = ignored); shifted by one inside. */
  labels?: number[][];
}

/** A batch checked and flattened for upload. */
export interface PreparedBatch {
  /** Batch size. */
  readonly B: number;
  /** Sequence length. */
  readonly T: number;
  /** Ids (B*T). */
  readonly ids: Int32Array;
  /** Mask (B*T). */
  readonly mask: Int32Array;
  /** Whether any mask entry is 0. */
  readonly masked: boolean;
  /** Shifted labels (B*T), or null. */
  readonly labels: Int32Array | null;
  /** Positions (B*T), starting at `past`. */
  readonly positions: Int32Array;
}

/**
 * Checks a batch against the model and flattens it.
 *
 * @param model The model.
 * @param batch The batch.
 * @param past Positions already in the KV cache (decode).
 * @returns The prepared batch.
 */
export function prepareBatch(model: Model, batch: Batch, past = 0): PreparedBatch {
  const rows = batch.inputIds;
  const B = rows.length;
  const T = rows[0]?.length ?? 0;
  if (B === 0 || T === 0) {
    throw new InvalidFileError("the batch is empty: pass at least one row with one token");
  }
  const V = model.config.vocabSize;
  const ids = new Int32Array(B * T), mask = new Int32Array(B * T).fill(1), positions = new Int32Array(B * T);
  let masked = false;
  rows.forEach((row, b) => {
    if (row.length !== T) {
      throw new InvalidFileError(
        `batch rows differ in length (${row.length} vs ${T}): pad them to one length`,
      );
    }
    row.forEach((id, t) => {
      if (!Number.isInteger(id) || id < 0 || id >= V) {
        throw new InvalidFileError(
          `token id ${id} at row ${b}, position ${t} is outside the vocabulary [0, ${V})`,
        );
      }
      ids[b * T + t] = id;
      positions[b * T + t] = past + t;
      const m = batch.attentionMask?.[b]?.[t] ?? 1;
      mask[b * T + t] = m ? 1 : 0;
      if (!m) masked = true;
    });
  });
  if (past + T > model.maxSeqLen) {
    throw new InvalidFileError(
      `a sequence of ${past + T} tokens is longer than this model instance allows (${model.maxSeqLen}); ` +
        "truncate the input or load the model with a larger maxSeqLen",
    );
  }
  let labels: Int32Array | null = null;
  if (batch.labels) {
    labels = new Int32Array(B * T).fill(-100);
    for (let b = 0; b < B; b++) {
      const row = batch.labels[b];
      if (!row || row.length !== T) throw new InvalidFileError(`labels row ${b} must have ${T} entries`);
      for (let t = 0; t + 1 < T; t++) {
        const y = row[t + 1]!;
        if (y !== -100 && (!Number.isInteger(y) || y < 0 || y >= V)) {
          throw new InvalidFileError(
            `label ${y} at row ${b}, position ${t + 1} is outside [0, ${V}) and not -100`,
          );
        }
        labels[b * T + t] = y;
      }
    }
  }
  return { B, T, ids, mask, masked, labels, positions };
}

/**
 * The activation buffers for a batch shape, created on first use and cached on the model.
 *
 * @param model The model.
 * @param B Batch size.
 * @param T Sequence length.
 * @param training Whether backward will run.
 * @returns The buffers.
 */
export function activationsFor(model: Model, B: number, T: number, training: boolean): Activations {
  const lowest = model.config.numLayers - maxAdapterLayers(model);
  const dtype = activationDtype(model);
  const ckpt = training && model.gradientCheckpointing;
  const key = `${B}x${T}:${dtype}:${training ? `train${lowest}${ckpt ? ":ckpt" : ""}` : "infer"}`;
  let acts = model.activations.get(key);
  if (!acts) {
    acts = createActivations(model.gpu, model.config, B, T, training, lowest, dtype, ckpt);
    model.activations.set(key, acts);
  }
  return acts;
}

function maxAdapterLayers(model: Model): number {
  let n = 1;
  for (const a of model.adapters.values()) n = Math.max(n, a.config.adapterLayers);
  return n;
}

/**
 * Uploads a prepared batch into the activation buffers (queued writes, no wait).
 *
 * @param model The model.
 * @param acts The buffers.
 * @param batch The batch.
 */
export function uploadBatch(model: Model, acts: Activations, batch: PreparedBatch): void {
  writeTensor(model.gpu, acts.ids, batch.ids);
  writeTensor(model.gpu, acts.positions, batch.positions);
  writeTensor(model.gpu, acts.mask, batch.mask);
  if (batch.labels) writeTensor(model.gpu, acts.labels, batch.labels);
}

/** What the forward produces at its top: logits, and/or the loss (with d hidden for training). */
export interface Head {
  /** Write logits (N, V) here. */
  logits?: Tensor;
  /** Compute the mean loss into `acts.loss` (labels must be uploaded). */
  loss?: boolean;
  /** Also write d loss / d hidden into `acts.grad.h` for the backward. */
  lossGradient?: boolean;
}

/** Options of {@link recordForward}. */
export interface ForwardOptions {
  /** The running adapter or null. */
  adapter: AdapterState | null;
  /** Whether the batch has padding. */
  masked: boolean;
  /** What to compute at the top. */
  head: Head;
  /** Decode: the KV cache and positions already in it. */
  cache?: { kv: KvCache; past: number } | null;
  /** Recompute the adapter keys/values (training: every step; decode: when the prompt changed). */
  adapterKeyValues?: boolean;
}

const ceScratch = new WeakMap<Activations, CrossEntropyScratch>();

function layerContext(
  rec: Recorder,
  model: Model,
  acts: Activations,
  l: number,
  opts: ForwardOptions,
): LayerContext {
  const adapter = opts.adapter;
  const slot = adapter ? slotOf(adapter, l) : -1;
  return {
    rec,
    model,
    acts,
    layer: l,
    w: model.weights.layers[l]!,
    la: acts.layers[l]!,
    out: l + 1 < model.config.numLayers ? acts.layers[l + 1]!.x : acts.xFinal,
    adapter: adapter && slot >= 0 ? { state: adapter, slot } : null,
    masked: opts.masked,
    cache: opts.cache ?? null,
  };
}

/**
 * Records the forward of the whole model for the batch already uploaded into `acts`.
 *
 * @param rec The recorder.
 * @param model The model.
 * @param acts The buffers.
 * @param opts Adapter, mask, head and cache.
 */
export function recordForward(rec: Recorder, model: Model, acts: Activations, opts: ForwardOptions): void {
  const c = model.config;
  const w = model.weights;
  if (opts.adapter && (opts.adapterKeyValues ?? true)) adapterKeyValuesForward(rec, model, opts.adapter);
  const x0 = acts.layers[0]!.x;
  for (const { rowStart, tensor } of w.embed.ranges) {
    embeddingForward(rec, x0, acts.ids, tensor, { rowStart });
  }
  if (w.positions) positionEmbeddingForward(rec, x0, w.positions, acts.positions);
  const fns = LAYER_FUNCTIONS[c.family];
  // decode: every layer in place on the residual stream x0; otherwise layer l writes layer l+1's input
  const decode = decodeFusable(model, acts, opts);
  for (let l = 0; l < c.numLayers; l++) {
    if (decode) fns.decode(layerContext(rec, model, acts, l, opts), x0);
    else fns.forward(layerContext(rec, model, acts, l, opts));
  }
  const xTop = decode ? x0 : acts.xFinal;
  const fn = w.finalNorm;
  if (fn.bias) {
    layernormForward(rec, acts.hFinal, acts.meanF, acts.rstdF, xTop, fn.weight, fn.bias, c.normEps);
  } else rmsnormForward(rec, acts.hFinal, acts.rstdF, xTop, fn.weight, c.normEps);
  const head = opts.head;
  if (head.logits) logitsForward(rec, head.logits, acts.hFinal, w.lmHead.ranges);
  if (head.loss || head.lossGradient) {
    let scratch = ceScratch.get(acts);
    if (!scratch) {
      scratch = createCrossEntropyScratch(model.gpu, acts.N, c.vocabSize, c.hiddenSize);
      ceScratch.set(acts, scratch);
    }
    crossEntropyLmHead(rec, {
      loss: acts.loss,
      dHidden: head.lossGradient ? acts.grad.h : null,
      hidden: acts.hFinal,
      weight: w.lmHead.ranges,
      labels: acts.labels,
      scratch,
    });
  }
}

/**
 * Records the backward from the loss (after a forward with `head: { lossGradient: true }`)
 * down to the lowest adapted layer, writing the adapter's gradients into its flat gradient buffer. That
 * forward must be this step's, recorded just before: with gradient checkpointing the top layer's
 * activations are read from it as it left them.
 *
 * @param rec The recorder.
 * @param model The model.
 * @param acts The buffers (training).
 * @param adapter The adapter being trained.
 * @param masked Whether the batch has padding.
 */
export function recordBackward(
  rec: Recorder,
  model: Model,
  acts: Activations,
  adapter: AdapterState,
  masked: boolean,
): void {
  if (!acts.training) throw new AdapterError("internal: backward needs training activations");
  const c = model.config;
  const w = model.weights;
  if (!adapter.grads) {
    adapter.grads = createTensor(model.gpu, [adapter.size], "f32", `adapter ${adapter.name} grads`);
  }
  fill(rec, adapter.grads, 0);
  const d = acts.grad;
  const fn = w.finalNorm;
  if (fn.bias) layernormBackward(rec, d.res, d.h, acts.xFinal, fn.weight, acts.meanF, acts.rstdF);
  else rmsnormBackward(rec, d.res, d.h, acts.xFinal, fn.weight, acts.rstdF);
  const lowest = adapter.slots[0]!.layer;
  if (lowest < acts.saveFrom) {
    throw new AdapterError(
      "internal: activations were created for fewer adapted layers than this adapter has",
    );
  }
  const fns = LAYER_FUNCTIONS[c.family];
  const opts: ForwardOptions = { adapter, masked, head: {} };
  for (let l = c.numLayers - 1; l >= lowest; l--) {
    const ctx = layerContext(rec, model, acts, l, opts);
    // checkpointing: the shared set still holds the top layer's forward; every other layer runs again,
    // as far as its backward reads (out: null)
    if (acts.checkpoint && l < c.numLayers - 1) fns.forward({ ...ctx, out: null });
    fns.backward(ctx, l > lowest);
  }
}
