/**
 * An adapter's tensors on the GPU. All trainable tensors of one adapter — each adapted layer's prompt
 * `(L, C)` and gate (`1` or `H` values) — live in ONE flat f32 buffer, each segment starting on a
 * 256-byte boundary so it can be bound on its own; gradients and AdamW moments use the same layout.
 * One flat buffer makes AdamW and the gradient norm a single dispatch over all adapter tensors.
 *
 * The adapter keys/values `(L, Hkv*D)` of each layer are derived from the prompt; they are cached with
 * the `version` they were computed at, so decode reuses them until the prompt changes.
 *
 * @module
 */

import type { Gpu } from "../gpu/device.ts";
import { createStacked, createTensor, Tensor } from "../gpu/tensor.ts";
import type { ModelConfig } from "../io/hf_config.ts";
import type { AdapterConfig } from "./config.ts";

/** Floats per alignment unit (256 bytes). */
const ALIGN = 64;

/** Where one layer's tensors sit in the flat buffers. */
export interface AdapterLayerSlot {
  /** Model layer index. */
  readonly layer: number;
  /** Element offset of the prompt `(L, C)`. */
  readonly promptOffset: number;
  /** Element offset of the gate (`1` or `H`). */
  readonly gateOffset: number;
}

/** One adapter on the GPU. */
export interface AdapterState {
  /** Adapter name (`default`, ...). */
  readonly name: string;
  /** Its configuration. */
  readonly config: AdapterConfig;
  /** Adapted layers, bottom first. */
  readonly slots: readonly AdapterLayerSlot[];
  /** Gate values per layer: 1 (scalar) or H. */
  readonly gateSize: number;
  /** Total floats of the flat buffers. */
  readonly size: number;
  /** Parameters (flat). */
  readonly params: Tensor;
  /** Gradients (flat), created on first use. */
  grads: Tensor | null;
  /** AdamW first moments (flat), created by an optimizer. */
  m: Tensor | null;
  /** AdamW second moments (flat), created by an optimizer. */
  v: Tensor | null;
  /** Bumped whenever params change, so cached keys/values are recomputed. */
  version: number;
  /** Adapter keys per adapted layer `(L, Hkv*D)`. */
  readonly ka: Tensor[];
  /** Adapter values per adapted layer `(L, Hkv*D)`. */
  readonly va: Tensor[];
  /**
   * Per adapted layer, its keys and values as one `(2 L Hkv*D)` tensor (`ka` then `va`, which are views of
   * it), for one product against the layer's stacked k|v weights; null where the values' offset could not
   * be bound (see {@link adapterStateTuning}).
   */
  readonly kva: (Tensor | null)[];
  /** Version the cached ka/va were computed at (-1: never). */
  kvVersion: number;
}

/**
 * `stackKeyValues: false` allocates every layer's adapter keys and values apart (for tests and benchmarks;
 * by default they share one buffer wherever the values' offset can be bound on its own).
 */
export const adapterStateTuning: { stackKeyValues: boolean } = { stackKeyValues: true };

/**
 * Lays out and allocates an adapter's flat buffers.
 *
 * @param gpu The GPU.
 * @param model The model config.
 * @param name Adapter name.
 * @param config Adapter config.
 * @returns The state, parameters uninitialised (zero).
 */
export function createAdapterState(
  gpu: Gpu,
  model: ModelConfig,
  name: string,
  config: AdapterConfig,
): AdapterState {
  const C = model.hiddenSize;
  const gateSize = config.gate === "scalar" ? 1 : model.numHeads;
  const pad = (n: number) => Math.ceil(n / ALIGN) * ALIGN;
  const slots: AdapterLayerSlot[] = [];
  let offset = 0;
  const first = model.numLayers - config.adapterLayers;
  for (let l = first; l < model.numLayers; l++) {
    const promptOffset = offset;
    offset += pad(config.adapterLen * C);
    const gateOffset = offset;
    offset += pad(gateSize);
    slots.push({ layer: l, promptOffset, gateOffset });
  }
  const kvWidth = model.numKvHeads * model.headDim;
  return {
    name,
    config,
    slots,
    gateSize,
    size: offset,
    params: createTensor(gpu, [offset], "f32", `adapter ${name}`),
    grads: null,
    m: null,
    v: null,
    version: 0,
    ...keysValues(gpu, slots, [config.adapterLen, kvWidth], `adapter ${name}`),
    kvVersion: -1,
  };
}

/** Each slot's keys and values `shape`: in one buffer (`kva`) where that can be bound, else apart. */
function keysValues(
  gpu: Gpu,
  slots: readonly AdapterLayerSlot[],
  shape: [number, number],
  label: string,
): { ka: Tensor[]; va: Tensor[]; kva: (Tensor | null)[] } {
  const kv = slots.map((s) => {
    const names = [`${label} ka${s.layer}`, `${label} va${s.layer}`];
    const both = adapterStateTuning.stackKeyValues
      ? createStacked(gpu, [shape, shape], "f32", `${label} kva${s.layer}`, names)
      : null;
    if (both) return { ka: both.parts[0]!, va: both.parts[1]!, kva: both.whole };
    return {
      ka: createTensor(gpu, shape, "f32", names[0]),
      va: createTensor(gpu, shape, "f32", names[1]),
      kva: null,
    };
  });
  return { ka: kv.map((x) => x.ka), va: kv.map((x) => x.va), kva: kv.map((x) => x.kva) };
}

/**
 * A view of one layer's prompt `(L, C)` in a flat buffer (params, grads or moments).
 *
 * @param state The adapter.
 * @param flat One of its flat buffers.
 * @param slot Index into `state.slots`.
 * @param hidden Model hidden size C.
 * @returns The view.
 */
export function promptView(state: AdapterState, flat: Tensor, slot: number, hidden: number): Tensor {
  const s = state.slots[slot]!;
  return new Tensor(
    flat.buffer,
    [state.config.adapterLen, hidden],
    "f32",
    flat.offset + 4 * s.promptOffset,
    "prompt",
  );
}

/**
 * A view of one layer's gate (`1` or `H` values) in a flat buffer.
 *
 * @param state The adapter.
 * @param flat One of its flat buffers.
 * @param slot Index into `state.slots`.
 * @returns The view.
 */
export function gateView(state: AdapterState, flat: Tensor, slot: number): Tensor {
  const s = state.slots[slot]!;
  return new Tensor(flat.buffer, [state.gateSize], "f32", flat.offset + 4 * s.gateOffset, "gate");
}

/**
 * Index of the slot adapting model layer `layer`, or -1.
 *
 * @param state The adapter.
 * @param layer A model layer index.
 * @returns The slot index or -1.
 */
export function slotOf(state: AdapterState, layer: number): number {
  const first = state.slots[0]?.layer ?? Infinity;
  return layer >= first ? layer - first : -1;
}

/**
 * Destroys an adapter's buffers.
 *
 * @param state The adapter.
 */
export function destroyAdapterState(state: AdapterState): void {
  for (const t of [state.params, state.grads, state.m, state.v, ...state.ka, ...state.va]) {
    t?.buffer.destroy();
  }
}
