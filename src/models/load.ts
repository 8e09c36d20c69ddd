/**
 * `loadModel`: a local folder or a hub id → config, tokenizer-free model on the GPU. It reads
 * `config.json`, checks that the weights fit the adapter's limits before uploading anything (and says
 * how much memory they need when they do not), then streams the checkpoint to the GPU one tensor at a
 * time.
 *
 * @module
 */

import { checkBufferFits, fmtBytes, getGpu } from "../gpu/device.ts";
import { loadModelConfig } from "../io/hf_config.ts";
import { openCheckpoint } from "../io/safetensors.ts";
import { LAYOUTS } from "./layout.ts";
import { assembleModel, type Model, resolveModelOptions } from "./model.ts";
import { loadWeights, weightBytes } from "./weights.ts";

/** Options of {@link loadModel}. */
export interface LoadModelOptions {
  /** Compute dtype: `f32` (exact) or `f16` (needs `shader-f16`). Default `f32`. */
  dtype?: "f32" | "f16";
  /** Longest sequence this model instance serves (prompt + generated). Default: the config's maximum, at most 4096. */
  maxSeqLen?: number;
  /** Hub revision (branch, tag or commit) when `source` is a hub id. */
  revision?: string;
  /** Hub cache folder (default from HF_HUB_CACHE / HF_HOME). */
  cacheDir?: string;
  /** Read only the local cache (also when HF_HUB_OFFLINE=1). */
  offline?: boolean;
}

/** A local folder as is; anything else through the hub client (loaded only then: it is large). */
async function resolveFolder(source: string, options: LoadModelOptions): Promise<string> {
  try {
    if ((await Deno.stat(source)).isDirectory) return source;
  } catch { /* not a local path: a hub id */ }
  const { resolveModelSource } = await import("../io/hub.ts");
  const hubOptions: Parameters<typeof resolveModelSource>[1] = {};
  if (options.revision !== undefined) hubOptions.revision = options.revision;
  if (options.cacheDir !== undefined) hubOptions.cacheDir = options.cacheDir;
  if (options.offline !== undefined) hubOptions.offline = options.offline;
  return await resolveModelSource(source, hubOptions);
}

/**
 * Loads a HuggingFace checkpoint (llama, mistral or gpt2) onto the GPU.
 *
 * @param source A local folder, or a hub id such as `HuggingFaceTB/SmolLM2-135M`.
 * @param options dtype, maximum sequence length, hub revision and cache.
 * @returns The model, with no adapter.
 * @example Load the embedded default model
 * ```ts ignore
 * import { loadModel } from "@promptgate/promptgate";
 * const model = await loadModel("./default/model");
 * console.log(model.config.numLayers);
 * ```
 */
export async function loadModel(source: string, options: LoadModelOptions = {}): Promise<Model> {
  const folder = await resolveFolder(source, options);
  const config = await loadModelConfig(folder);
  const gpu = await getGpu();
  const { dtype, maxSeqLen } = resolveModelOptions(gpu, config, options);
  // fit check before uploading anything: every weight is one buffer (projections and embeddings are
  // then bound in row ranges), so each must be within maxBufferSize; WebGPU does not tell total memory
  const e = dtype === "f16" ? 2 : 4;
  const C = config.hiddenSize;
  const total = `(the whole model needs about ${fmtBytes(weightBytes(config, dtype))} in ${dtype})`;
  checkBufferFits(
    gpu,
    config.vocabSize * C * e,
    `the embedding (${config.vocabSize}x${C} ${dtype}) ${total}`,
  );
  const widest = Math.max(config.intermediateSize, config.numHeads * config.headDim);
  checkBufferFits(gpu, widest * C * e, `the largest projection (${widest}x${C} ${dtype}) ${total}`);
  const checkpoint = await openCheckpoint(folder);
  try {
    const weights = await loadWeights(gpu, config, LAYOUTS[config.family], {
      has: (n) => checkpoint.tensors.has(n),
      shape: (n) => checkpoint.tensors.get(n)!.shape,
      readF32: (n) => checkpoint.readTensor(n, "f32"),
    }, dtype);
    return assembleModel({ gpu, config, dtype, weights, maxSeqLen, source, folder });
  } finally {
    checkpoint.close();
  }
}
