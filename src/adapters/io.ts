/**
 * Saving and loading adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`
 * with PEFT's state-dict names (`base_model.model.model.layers.2.self_attn.adaption_prompt`, ...). As
 * PEFT's `save_pretrained` does, the adapter named `default` goes in the folder itself and every other
 * adapter in a subfolder of its name. Each adapter's file is written from that adapter's own buffers
 * (PEFT bug #3638 wrote one adapter's weights under another's name), atomically (temp file, fsync,
 * rename), and a loaded adapter is checked against the model before anything is uploaded.
 *
 * @module
 */

import { join } from "../_std.ts";
import { readF32 } from "../gpu/tensor.ts";
import { openSafetensors, type TensorToWrite, writeSafetensors } from "../io/safetensors.ts";
import { writeFileAtomic } from "../io/atomic_write.ts";
import { AdapterError, InvalidFileError } from "../errors.ts";
import type { Model } from "../models/model.ts";
import { adapterConfigJson, parseAdapterConfig, validateAdapterConfig } from "./config.ts";
import {
  checkAdapterName,
  getAdapter,
  peftName,
  registerAdapter,
  splitFlat,
  writeAdapterTensors,
} from "./manage.ts";

/** PEFT's file names. */
export const ADAPTER_CONFIG_NAME = "adapter_config.json";
/** PEFT's weights file name. */
export const ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors";

/**
 * The folder an adapter is saved in: the folder itself for `default`, else `folder/<name>`.
 *
 * @param folder The save folder.
 * @param name The adapter name.
 * @returns The adapter's folder.
 */
export function adapterFolder(folder: string, name: string): string {
  checkAdapterName(name);
  return name === "default" ? folder : join(folder, name);
}

/**
 * Saves adapters in PEFT's format.
 *
 * @param model The model.
 * @param folder Where to save (created if missing).
 * @param options `names`: which adapters (default: all).
 * @example Save the active adapter for Python PEFT
 * ```ts ignore
 * await saveAdapter(model, "./my-adapter");
 * // python: PeftModel.from_pretrained(base, "./my-adapter")
 * ```
 */
export async function saveAdapter(
  model: Model,
  folder: string,
  options: { names?: string[] } = {},
): Promise<void> {
  const names = options.names ?? [...model.adapters.keys()];
  if (names.length === 0) throw new AdapterError("there is no adapter to save: add or load one first");
  for (const name of names) {
    const state = getAdapter(model, name);
    const dir = adapterFolder(folder, name);
    await Deno.mkdir(dir, { recursive: true });
    const tensors = splitFlat(model, state, await readF32(model.gpu, state.params));
    const toWrite: Record<string, TensorToWrite> = {};
    const C = model.config.hiddenSize;
    for (const [key, data] of Object.entries(tensors)) {
      const shape = key.endsWith("adaption_prompt") ? [1, state.config.adapterLen, C] : [data.length];
      toWrite[key] = { dtype: "F32", shape, data };
    }
    await writeSafetensors(join(dir, ADAPTER_WEIGHTS_NAME), toWrite, { format: "pt" });
    await writeFileAtomic(
      join(dir, ADAPTER_CONFIG_NAME),
      JSON.stringify(adapterConfigJson(state.config), null, 2),
    );
  }
}

/**
 * Loads a PEFT adaption-prompt adapter and makes it active.
 *
 * @param model The model.
 * @param folder The adapter folder (with `adapter_config.json` and `adapter_model.safetensors`).
 * @param options `name` to register it under (default `default`).
 * @returns The model.
 * @example Load an adapter trained by PEFT
 * ```ts ignore
 * await loadAdapter(model, "./peft-adapter", { name: "peft" });
 * ```
 */
export async function loadAdapter(
  model: Model,
  folder: string,
  options: { name?: string } = {},
): Promise<Model> {
  const name = options.name ?? "default";
  checkAdapterName(name);
  if (model.adapters.has(name)) {
    throw new AdapterError(
      `an adapter named "${name}" already exists; delete it first or load under another name`,
    );
  }
  const configPath = join(folder, ADAPTER_CONFIG_NAME);
  let text: string;
  try {
    text = await Deno.readTextFile(configPath);
  } catch (e) {
    throw new InvalidFileError(
      `cannot read ${configPath} (${
        (e as Error).message
      }): an adapter folder holds adapter_config.json and ` +
        "adapter_model.safetensors",
      { cause: e },
    );
  }
  const config = { ...parseAdapterConfig(text, configPath), baseModel: null };
  const c = model.config;
  try {
    validateAdapterConfig(config, c.numLayers, `adapter ${folder}`);
  } catch (e) {
    throw new AdapterError(
      `the adapter in ${folder} does not fit ${model.source} (${c.family}, ${c.numLayers} layers, hidden ` +
        `${c.hiddenSize}): ${(e as Error).message}`,
    );
  }
  const file = await openSafetensors(join(folder, ADAPTER_WEIGHTS_NAME));
  const tensors: Record<string, Float32Array> = {};
  try {
    const first = c.numLayers - config.adapterLayers;
    const gateSize = config.gate === "scalar" ? 1 : c.numHeads;
    const expected = new Map<string, number[]>();
    for (let l = first; l < c.numLayers; l++) {
      expected.set(peftName(model, l, "adaption_prompt"), [1, config.adapterLen, c.hiddenSize]);
      expected.set(peftName(model, l, "adaption_gate"), [gateSize]);
    }
    for (const key of file.tensors.keys()) {
      if (!expected.has(key)) {
        throw new AdapterError(
          `the adapter in ${folder} has a tensor "${key}" that ${model.source} (${c.family}, ${c.numLayers} ` +
            `layers) has no place for; expected names like "${[...expected.keys()][0]}". Was it trained on ` +
            "another model or family?",
        );
      }
    }
    for (const [key, shape] of expected) {
      const info = file.tensors.get(key);
      if (!info) {
        throw new AdapterError(
          `the adapter in ${folder} lacks "${key}", which adapter_layers=${config.adapterLayers} on this ` +
            `${c.numLayers}-layer ${c.family} model requires`,
        );
      }
      if (info.shape.join(",") !== shape.join(",")) {
        throw new AdapterError(
          `adapter tensor "${key}" in ${folder} has shape [${info.shape}] but ${model.source} needs [${shape}] ` +
            `(hidden size ${c.hiddenSize}); the adapter was trained on another model`,
        );
      }
      const values = await file.readTensor(key, "f32");
      if (!values.every(Number.isFinite)) {
        throw new InvalidFileError(`adapter tensor "${key}" in ${folder} holds NaN or infinite values`);
      }
      tensors[key] = values;
    }
  } finally {
    file.close();
  }
  const state = registerAdapter(model, name, config);
  writeAdapterTensors(model, state, tensors);
  return model;
}
