/**
 * promptgate: fine-tune and run LLaMA-Adapter adaption prompts on WebGPU, exactly as HuggingFace PEFT
 * computes them, for llama, mistral and gpt2 checkpoints.
 *
 * @example Train an adapter for a few steps and save it for PEFT
 * ```ts ignore
 * import { addAdaptionPrompt, createOptimizer, generate, loadModel, saveAdapter } from "@promptgate/promptgate";
 *
 * const model = await loadModel("./default/model");
 * addAdaptionPrompt(model, { adapterLen: 10, adapterLayers: 2 });
 * const opt = createOptimizer(model, { lr: 1e-2 });
 * const ids = [[1, 17, 42, 99, 7]];
 * for (let i = 0; i < 10; i++) console.log(await opt.step({ inputIds: ids, labels: ids }));
 * console.log(await generate(model, [1, 17], { maxNewTokens: 8 }));
 * await saveAdapter(model, "./my-adapter");
 * ```
 *
 * @module
 */

export { loadModel, type LoadModelOptions } from "./src/models/load.ts";
export type { Model } from "./src/models/model.ts";
export type {
  Activation,
  ModelConfig,
  ModelFamily,
  NormKind,
  RopeScaling,
  RopeType,
} from "./src/io/hf_config.ts";
export type { Layout } from "./src/models/layout.ts";
export type { LayerWeights, Linear, Norm, StackedLinear, Weights } from "./src/models/weights.ts";
export type { ColumnGroups } from "./kernels/matmul.ts";
export type { AdapterLayerSlot, AdapterState } from "./src/adapters/state.ts";
export type { Activations, LayerActivations } from "./src/models/activations.ts";
export type { BindingKind, Kernel } from "./src/gpu/kernel.ts";
export type { Batch } from "./src/models/transformer.ts";
export { forward, type ForwardResult, loss, lossAndGradients } from "./src/models/run.ts";
export { generate, type GenerateOptions, generateStream } from "./src/models/generate.ts";
export {
  adapterState,
  addAdaptionPrompt,
  type AddAdaptionPromptOptions,
  deleteAdapter,
  disableAdapters,
  enableAdapters,
  setAdapter,
} from "./src/adapters/manage.ts";
export { loadAdapter, saveAdapter } from "./src/adapters/io.ts";
export type { AdapterConfig, GateKind } from "./src/adapters/config.ts";
export {
  adaptedAttention,
  type AdaptedAttentionShape,
  adapterKeyValues,
  computeQueryStates,
  gatedAdapterScores,
} from "./src/adapters/functional.ts";
export { createOptimizer, type Optimizer, type OptimizerOptions } from "./src/train/optimizer.ts";
export { type AdapterReport, adapterReport, getGpu, type Gpu } from "./src/gpu/device.ts";
export { type Op, type Param, Recorder } from "./src/gpu/recorder.ts";
export { createTensor, type DType, type HostArray, readF32, Tensor, tensorFrom } from "./src/gpu/tensor.ts";
export {
  type DecodeOptions,
  type EncodeOptions,
  loadTokenizer,
  type StreamDecoder,
  Tokenizer,
  type TokenizerFiles,
} from "./src/io/tokenizer.ts";
export * from "./src/errors.ts";
