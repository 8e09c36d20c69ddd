/**
 * Adding, choosing, disabling and deleting adapters on a model — PEFT's `add_adapter`,
 * `set_adapter`, `disable_adapter`, `delete_adapter` — and reading an adapter's tensors by PEFT's
 * state-dict names. A fresh adapter's prompt is drawn from a standard normal (PEFT's `normal_()`) and
 * its gate is zero, so until it trains the model computes exactly the base model's logits.
 *
 * @module
 */

import { readF32, writeTensor } from "../gpu/tensor.ts";
import { AdapterError } from "../errors.ts";
import type { Model } from "../models/model.ts";
import { Random } from "../train/rng.ts";
import { type AdapterConfig, type GateKind, validateAdapterConfig } from "./config.ts";
import { type AdapterState, createAdapterState, destroyAdapterState } from "./state.ts";

/** Options of {@link addAdaptionPrompt}. */
export interface AddAdaptionPromptOptions {
  /** Prompt tokens per adapted layer (PEFT `adapter_len`; LLaMA-Adapter uses 10). */
  adapterLen: number;
  /** How many top layers to adapt (PEFT `adapter_layers`). */
  adapterLayers: number;
  /** Adapter name (default `default`). */
  name?: string;
  /** Gate form (default `scalar`, as PEFT). */
  gate?: GateKind;
  /** Seed of the prompt initialisation (default 0). */
  seed?: number;
}

/** Names allowed for adapters (they become folder names when saved). */
const NAME = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$/;

/**
 * Checks an adapter name (it becomes a folder name when saved).
 *
 * @param name The name.
 */
export function checkAdapterName(name: string): void {
  if (!NAME.test(name) || name.includes("..")) {
    throw new AdapterError(
      `adapter name ${JSON.stringify(name)} is not allowed: use 1-64 letters, digits, '_', '-' or '.', ` +
        "not starting with '.' or containing '..'",
    );
  }
}

/**
 * Adds a fresh adaption prompt (random prompt, zero gate) and makes it active.
 *
 * @param model The model.
 * @param options Length, layers, name, gate form, seed.
 * @returns The model.
 * @example Add an adapter of 10 tokens on the top 2 layers
 * ```ts ignore
 * const model = addAdaptionPrompt(await loadModel("./default/model"), { adapterLen: 10, adapterLayers: 2 });
 * ```
 */
export function addAdaptionPrompt(model: Model, options: AddAdaptionPromptOptions): Model {
  const name = options.name ?? "default";
  const config: AdapterConfig = {
    adapterLen: options.adapterLen,
    adapterLayers: options.adapterLayers,
    gate: options.gate ?? "scalar",
    targetModules: model.layout.peftTargetModules,
    baseModel: model.source,
  };
  const state = registerAdapter(model, name, config);
  const rng = new Random(options.seed ?? 0);
  const values = new Float32Array(state.size);
  const promptSize = config.adapterLen * model.config.hiddenSize;
  for (const s of state.slots) {
    for (let i = 0; i < promptSize; i++) values[s.promptOffset + i] = rng.normal();
  }
  writeTensor(model.gpu, state.params, values);
  return model;
}

/**
 * Creates an adapter's state under a new name and makes it active (parameters zero).
 *
 * @param model The model.
 * @param name The name.
 * @param config The config.
 * @returns The new state.
 */
export function registerAdapter(model: Model, name: string, config: AdapterConfig): AdapterState {
  checkAdapterName(name);
  if (model.adapters.has(name)) {
    throw new AdapterError(
      `an adapter named "${name}" already exists; delete it first or choose another name`,
    );
  }
  validateAdapterConfig(config, model.config.numLayers, `adapter "${name}"`);
  const state = createAdapterState(model.gpu, model.config, name, config);
  model.adapters.set(name, state);
  model.active = name;
  return state;
}

/**
 * Makes a named adapter the active one.
 *
 * @param model The model.
 * @param name An existing adapter's name.
 * @returns The model.
 */
export function setAdapter(model: Model, name: string): Model {
  if (!model.adapters.has(name)) {
    throw new AdapterError(
      `no adapter named "${name}"; this model has ${listNames(model)}`,
    );
  }
  model.active = name;
  return model;
}

/**
 * Runs the base model without any adapter until {@link enableAdapters}.
 *
 * @param model The model.
 * @returns The model.
 */
export function disableAdapters(model: Model): Model {
  model.disabled = true;
  return model;
}

/**
 * Re-enables the active adapter after {@link disableAdapters}.
 *
 * @param model The model.
 * @returns The model.
 */
export function enableAdapters(model: Model): Model {
  model.disabled = false;
  return model;
}

/**
 * Deletes an adapter and frees its GPU memory. Deleting the active adapter leaves none active.
 *
 * @param model The model.
 * @param name The adapter's name.
 * @returns The model.
 */
export function deleteAdapter(model: Model, name: string): Model {
  const state = model.adapters.get(name);
  if (!state) {
    throw new AdapterError(`no adapter named "${name}" to delete; this model has ${listNames(model)}`);
  }
  model.adapters.delete(name);
  destroyAdapterState(state);
  if (model.active === name) model.active = null;
  return model;
}

/**
 * The adapter by name (default: the active one).
 *
 * @param model The model.
 * @param name The name.
 * @returns Its state.
 */
export function getAdapter(model: Model, name?: string): AdapterState {
  const n = name ?? model.active;
  if (n === null) {
    throw new AdapterError("no adapter is active: add one with addAdaptionPrompt or loadAdapter");
  }
  const state = model.adapters.get(n);
  if (!state) throw new AdapterError(`no adapter named "${n}"; this model has ${listNames(model)}`);
  return state;
}

function listNames(model: Model): string {
  return model.adapters.size ? [...model.adapters.keys()].map((n) => `"${n}"`).join(", ") : "no adapters";
}

/**
 * PEFT's state-dict name of a layer's adapter tensor.
 *
 * @param model The model.
 * @param layer Model layer index.
 * @param tensor `adaption_prompt` or `adaption_gate`.
 * @returns e.g. `base_model.model.model.layers.2.self_attn.adaption_prompt`.
 */
export function peftName(model: Model, layer: number, tensor: "adaption_prompt" | "adaption_gate"): string {
  return `base_model.model.${model.layout.peftAttention(layer)}.${tensor}`;
}

/**
 * Splits a flat adapter buffer (params, grads) read from the GPU into PEFT-named tensors.
 *
 * @param model The model.
 * @param state The adapter.
 * @param flat The flat values.
 * @returns Tensors keyed by PEFT names (prompt `[1, L, C]` flattened, gate `[1]` or `[H]`).
 */
export function splitFlat(
  model: Model,
  state: AdapterState,
  flat: Float32Array,
): Record<string, Float32Array> {
  const out: Record<string, Float32Array> = {};
  const promptSize = state.config.adapterLen * model.config.hiddenSize;
  for (const s of state.slots) {
    out[peftName(model, s.layer, "adaption_prompt")] = flat.slice(
      s.promptOffset,
      s.promptOffset + promptSize,
    );
    out[peftName(model, s.layer, "adaption_gate")] = flat.slice(s.gateOffset, s.gateOffset + state.gateSize);
  }
  return out;
}

/**
 * Reads an adapter's tensors from the GPU, keyed by PEFT's state-dict names. It waits for the GPU
 * (one readback), hence the promise.
 *
 * @param model The model.
 * @param name Adapter name (default: the active one).
 * @returns `{ "base_model.model.…adaption_prompt": Float32Array, … }`.
 */
export async function adapterState(model: Model, name?: string): Promise<Record<string, Float32Array>> {
  const state = getAdapter(model, name);
  return splitFlat(model, state, await readF32(model.gpu, state.params));
}

/**
 * Writes PEFT-named tensors into an adapter (shapes checked by the caller).
 *
 * @param model The model.
 * @param state The adapter.
 * @param tensors Values by PEFT name.
 */
export function writeAdapterTensors(
  model: Model,
  state: AdapterState,
  tensors: Record<string, Float32Array>,
): void {
  const values = new Float32Array(state.size);
  for (const s of state.slots) {
    values.set(tensors[peftName(model, s.layer, "adaption_prompt")]!, s.promptOffset);
    values.set(tensors[peftName(model, s.layer, "adaption_gate")]!, s.gateOffset);
  }
  writeTensor(model.gpu, state.params, values);
  state.version++;
}
