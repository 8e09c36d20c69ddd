/**
 * Checkpoints of a training run, in `<out>/checkpoint/`: the adapter (PEFT files), the optimizer state
 * (`optimizer.safetensors`: AdamW's `m`, `v` and `step`), and `trainer_state.json` (step, data position
 * with the shuffling generator's state, best eval loss, the run's configuration). Each file is written
 * atomically, into a fresh temporary folder; the folder then replaces the previous checkpoint by two
 * renames (old → `.checkpoint.old`, new → `checkpoint`), and the old one is deleted only after the new one
 * is in place. A crash at any moment leaves at least one complete checkpoint, which
 * {@link findCheckpoint} picks.
 *
 * Also here: {@link writeAdapterFiles}, which writes one adapter's PEFT files straight into a folder
 * whatever its name (the run folder's best/last adapter).
 *
 * @module
 */

import { join } from "../_std.ts";
import { writeFileAtomic } from "../io/atomic_write.ts";
import { openSafetensors, type TensorToWrite, writeSafetensors } from "../io/safetensors.ts";
import { adapterConfigJson } from "../adapters/config.ts";
import { adapterState, getAdapter } from "../adapters/manage.ts";
import { InvalidFileError, TrainingError } from "../errors.ts";
import type { Model } from "../models/model.ts";
import type { DataCursor } from "./data.ts";

/** The checkpoint folder's name inside a run folder. */
export const CHECKPOINT_DIR = "checkpoint";
const OLD_DIR = ".checkpoint.old";
const TMP_PREFIX = ".checkpoint.tmp-";
/** Trainer state file name. */
export const TRAINER_STATE_NAME = "trainer_state.json";
/** Optimizer state file name. */
export const OPTIMIZER_STATE_NAME = "optimizer.safetensors";

/** What `trainer_state.json` holds. */
export interface TrainerState {
  /** Optimizer steps done. */
  step: number;
  /** Where the data iterator is (includes the shuffling generator's state). */
  cursor: DataCursor;
  /** Best eval loss so far, or null. */
  bestEvalLoss: number | null;
  /** Step of the best eval loss, or null. */
  bestStep: number | null;
  /** Last training loss. */
  lastLoss: number | null;
  /** Name of the trained adapter. */
  adapterName: string;
  /** The run's configuration (as in run.json). */
  config: Record<string, unknown>;
  /** Training seconds so far (for the summary after a resume). */
  elapsedS: number;
  /** Tokens trained on so far. */
  tokens: number;
}

/** The optimizer's saved state. */
export interface OptimizerState {
  /** AdamW step count. */
  step: number;
  /** First moments. */
  m: Float32Array;
  /** Second moments. */
  v: Float32Array;
}

/**
 * Writes one adapter's `adapter_config.json` and `adapter_model.safetensors` directly into `folder`
 * (atomically each), whatever the adapter's name.
 *
 * @param model The model.
 * @param name The adapter's name.
 * @param folder Target folder (created if missing).
 */
export async function writeAdapterFiles(model: Model, name: string, folder: string): Promise<void> {
  const state = getAdapter(model, name);
  await Deno.mkdir(folder, { recursive: true });
  const tensors = await adapterState(model, name);
  const toWrite: Record<string, TensorToWrite> = {};
  for (const [key, data] of Object.entries(tensors)) {
    const shape = key.endsWith("adaption_prompt")
      ? [1, state.config.adapterLen, model.config.hiddenSize]
      : [data.length];
    toWrite[key] = { dtype: "F32", shape, data };
  }
  await writeSafetensors(join(folder, "adapter_model.safetensors"), toWrite, { format: "pt" });
  await writeFileAtomic(
    join(folder, "adapter_config.json"),
    JSON.stringify(adapterConfigJson(state.config), null, 2) + "\n",
  );
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch {
    return false;
  }
}

/**
 * Saves a checkpoint atomically as a folder.
 *
 * @param outDir The run folder.
 * @param model The model (its adapter `state.adapterName` is saved).
 * @param optimizer The optimizer state.
 * @param state The trainer state.
 * @returns The checkpoint folder.
 */
export async function saveCheckpoint(
  outDir: string,
  model: Model,
  optimizer: OptimizerState,
  state: TrainerState,
): Promise<string> {
  const tmp = join(outDir, TMP_PREFIX + crypto.randomUUID().slice(0, 8));
  const final = join(outDir, CHECKPOINT_DIR);
  const old = join(outDir, OLD_DIR);
  try {
    await Deno.mkdir(tmp, { recursive: true });
    await writeAdapterFiles(model, state.adapterName, tmp);
    await writeSafetensors(join(tmp, OPTIMIZER_STATE_NAME), {
      m: { dtype: "F32", shape: [optimizer.m.length], data: optimizer.m },
      v: { dtype: "F32", shape: [optimizer.v.length], data: optimizer.v },
      step: { dtype: "I64", shape: [1], data: new BigInt64Array([BigInt(optimizer.step)]) },
    }, { format: "pt" });
    // Written last: a folder without it is incomplete.
    await writeFileAtomic(join(tmp, TRAINER_STATE_NAME), JSON.stringify(state, null, 2) + "\n");
    if (await exists(final)) {
      await Deno.remove(old, { recursive: true }).catch(() => {});
      await Deno.rename(final, old);
    }
    await Deno.rename(tmp, final);
    await Deno.remove(old, { recursive: true }).catch(() => {});
  } catch (e) {
    await Deno.remove(tmp, { recursive: true }).catch(() => {});
    throw e;
  }
  return final;
}

/**
 * The complete checkpoint of a run folder: `checkpoint/`, or `.checkpoint.old/` when a crash came
 * between the two renames of a save.
 *
 * @param outDir The run folder.
 * @returns The checkpoint folder, or null when there is none.
 */
export async function findCheckpoint(outDir: string): Promise<string | null> {
  for (const name of [CHECKPOINT_DIR, OLD_DIR]) {
    const dir = join(outDir, name);
    if (await exists(join(dir, TRAINER_STATE_NAME))) return dir;
  }
  return null;
}

/** Temporary files of `writeFileAtomic` (`.<name>.<8 hex>.tmp`). */
const ATOMIC_TMP = /^\..+\.[0-9a-f]{8}\.tmp$/;

/**
 * Removes what a killed save left behind: half-built checkpoint folders and temporary files of atomic
 * writes in the run folder.
 *
 * @param outDir The run folder.
 */
export async function cleanStaleCheckpoints(outDir: string): Promise<void> {
  try {
    for await (const e of Deno.readDir(outDir)) {
      if (e.isDirectory && e.name.startsWith(TMP_PREFIX)) {
        await Deno.remove(join(outDir, e.name), { recursive: true });
      } else if (e.isFile && ATOMIC_TMP.test(e.name)) {
        await Deno.remove(join(outDir, e.name));
      }
    }
  } catch {
    // No folder yet: nothing to clean.
  }
}

function safeParse(text: string): unknown {
  return JSON.parse(text, (k, v) => (k === "__proto__" || k === "constructor" ? undefined : v));
}

/**
 * Reads a checkpoint's trainer and optimizer state (the adapter is loaded with `loadAdapter`).
 *
 * @param dir The checkpoint folder.
 * @returns Trainer and optimizer state.
 * @throws {InvalidFileError} When a file is missing or malformed.
 */
export async function readCheckpoint(
  dir: string,
): Promise<{ state: TrainerState; optimizer: OptimizerState }> {
  const statePath = join(dir, TRAINER_STATE_NAME);
  let state: TrainerState;
  try {
    state = safeParse(await Deno.readTextFile(statePath)) as TrainerState;
  } catch (e) {
    throw new InvalidFileError(
      `cannot read ${statePath} (${(e as Error).message}); the checkpoint is damaged`,
      { cause: e },
    );
  }
  if (
    typeof state !== "object" || state === null || !Number.isInteger(state.step) || state.step < 0 ||
    typeof state.cursor !== "object" || state.cursor === null || !Number.isInteger(state.cursor.epoch) ||
    !Number.isInteger(state.cursor.index) || typeof state.cursor.rng?.state !== "number" ||
    typeof state.adapterName !== "string"
  ) {
    throw new InvalidFileError(`${statePath} lacks step, cursor or adapterName; the checkpoint is damaged`);
  }
  const file = await openSafetensors(join(dir, OPTIMIZER_STATE_NAME));
  try {
    for (const k of ["m", "v", "step"]) {
      if (!file.tensors.has(k)) {
        throw new InvalidFileError(`${file.path} lacks the tensor "${k}"; the checkpoint is damaged`);
      }
    }
    const m = await file.readTensor("m", "f32");
    const v = await file.readTensor("v", "f32");
    const raw = await file.readRaw("step");
    const step = Number(new DataView(raw.buffer, raw.byteOffset, raw.byteLength).getBigInt64(0, true));
    if (m.length !== v.length) {
      throw new InvalidFileError(`${file.path}: m and v differ in length; the checkpoint is damaged`);
    }
    if (step !== state.step) {
      throw new TrainingError(
        `${dir}: the optimizer is at step ${step} but trainer_state.json says ${state.step}; the checkpoint is damaged`,
      );
    }
    return { state, optimizer: { step, m, v } };
  } finally {
    file.close();
  }
}
