/**
 * Adapter configuration, as PEFT writes it in `adapter_config.json` for `ADAPTION_PROMPT`, plus one
 * field of ours (`promptgate_gate`) that PEFT ignores: the gate form. Reading validates every field
 * and refuses what we cannot honour.
 *
 * @module
 */

import { AdapterError, InvalidFileError } from "../errors.ts";

/** The gate forms: PEFT's scalar, per-head (official LLaMA-Adapter, litgpt), per-head through tanh. */
export type GateKind = "scalar" | "per-head" | "per-head-tanh";

/** What an adaption-prompt adapter is. */
export interface AdapterConfig {
  /** Prompt tokens per adapted layer (PEFT `adapter_len`). */
  readonly adapterLen: number;
  /** How many top layers are adapted (PEFT `adapter_layers`). */
  readonly adapterLayers: number;
  /** Gate form. */
  readonly gate: GateKind;
  /** PEFT `target_modules` (the attention module name). */
  readonly targetModules: string;
  /** Base model name or path (PEFT `base_model_name_or_path`). */
  readonly baseModel: string | null;
}

const GATES: readonly GateKind[] = ["scalar", "per-head", "per-head-tanh"];

/**
 * The most prompt tokens per layer the adapter attention kernels take (their softmax over the adapter
 * tokens lives in registers / workgroup memory: kernels/adapter_attention.ts, kernels/decode_attention.ts).
 */
export const MAX_ADAPTER_LEN = 64;

/**
 * Checks an adapter config's numbers against a model.
 *
 * @param config The adapter config.
 * @param numLayers Layers of the model.
 * @param what Name for messages.
 */
export function validateAdapterConfig(config: AdapterConfig, numLayers: number, what = "adapter"): void {
  if (!Number.isInteger(config.adapterLen) || config.adapterLen < 1) {
    throw new AdapterError(`${what}: adapter_len must be a positive integer, got ${config.adapterLen}`);
  }
  if (config.adapterLen > MAX_ADAPTER_LEN) {
    throw new AdapterError(
      `${what}: adapter_len ${config.adapterLen} is more than promptgate's adapter attention kernels take ` +
        `(${MAX_ADAPTER_LEN} prompt tokens per layer; LLaMA-Adapter and PEFT's examples use 10): ` +
        `use an adapter_len of at most ${MAX_ADAPTER_LEN}`,
    );
  }
  if (!Number.isInteger(config.adapterLayers) || config.adapterLayers < 1) {
    throw new AdapterError(`${what}: adapter_layers must be a positive integer, got ${config.adapterLayers}`);
  }
  if (config.adapterLayers > numLayers) {
    throw new AdapterError(
      `${what}: adapter_layers is ${config.adapterLayers} but the model has only ${numLayers} layers; ` +
        `use at most ${numLayers}`,
    );
  }
  if (!GATES.includes(config.gate)) {
    throw new AdapterError(`${what}: gate must be one of ${GATES.join(", ")}, got ${config.gate}`);
  }
}

/**
 * Parses PEFT's `adapter_config.json` text.
 *
 * @param text The JSON text.
 * @param path The file (for messages).
 * @returns The config.
 */
export function parseAdapterConfig(text: string, path: string): AdapterConfig {
  let raw: unknown;
  try {
    raw = JSON.parse(
      text,
      (k, v) => (k === "__proto__" || k === "constructor" || k === "prototype") ? undefined : v,
    );
  } catch (e) {
    throw new InvalidFileError(`${path} is not valid JSON (${(e as Error).message}); save the adapter again`);
  }
  if (!raw || typeof raw !== "object" || Array.isArray(raw)) {
    throw new InvalidFileError(`${path} must hold a JSON object`);
  }
  const o = raw as Record<string, unknown>;
  if (o.peft_type !== "ADAPTION_PROMPT") {
    throw new AdapterError(
      `${path}: peft_type is ${JSON.stringify(o.peft_type)}; promptgate loads ADAPTION_PROMPT adapters only`,
    );
  }
  const int = (k: string): number => {
    const v = o[k];
    if (typeof v !== "number" || !Number.isInteger(v)) {
      throw new InvalidFileError(`${path}: ${k} must be an integer, got ${JSON.stringify(v)}`);
    }
    return v;
  };
  const gate = o.promptgate_gate ?? "scalar";
  if (typeof gate !== "string" || !GATES.includes(gate as GateKind)) {
    throw new InvalidFileError(`${path}: promptgate_gate must be one of ${GATES.join(", ")}`);
  }
  return {
    adapterLen: int("adapter_len"),
    adapterLayers: int("adapter_layers"),
    gate: gate as GateKind,
    targetModules: typeof o.target_modules === "string" ? o.target_modules : "",
    baseModel: typeof o.base_model_name_or_path === "string" ? o.base_model_name_or_path : null,
  };
}

/**
 * Writes the config as PEFT's `adapter_config.json` object (with our gate field when not scalar).
 *
 * @param config The config.
 * @returns A JSON-serialisable object.
 */
export function adapterConfigJson(config: AdapterConfig): Record<string, unknown> {
  const out: Record<string, unknown> = {
    adapter_layers: config.adapterLayers,
    adapter_len: config.adapterLen,
    auto_mapping: null,
    base_model_name_or_path: config.baseModel,
    inference_mode: true,
    peft_type: "ADAPTION_PROMPT",
    peft_version: "0.21.0",
    revision: null,
    target_modules: config.targetModules,
    task_type: "CAUSAL_LM",
  };
  if (config.gate !== "scalar") out.promptgate_gate = config.gate;
  return out;
}
