/**
 * Base-model weights on the GPU, read from a checkpoint one tensor at a time (never the whole file in
 * memory), normalised to one shape per family: every 2-D projection as HF `Linear` `[out, in]` (gpt2's
 * `Conv1D` weights are transposed on the way in, and its fused `c_attn` is split into q, k and v), norms
 * and biases in f32, projections and embeddings in the compute dtype (f32, or f16 on `shader-f16`). A
 * layer's q, k and v weights share one buffer where the device can bind each part alone
 * ({@link uploadProjections}), so that training computes the three in one product and their input
 * gradient in one more (kernels/matmul.ts, column groups); decode and the adapter use the parts.
 *
 * @module
 */

import type { Gpu } from "../gpu/device.ts";
import { checkBufferFits, fmtBytes } from "../gpu/device.ts";
import { createStacked, splitRows, Tensor, tensorFrom, writeTensor } from "../gpu/tensor.ts";
import type { ColumnGroups } from "../../kernels/matmul.ts";
import type { ModelConfig } from "../io/hf_config.ts";
import { f32ArrayToF16 } from "../io/dtype.ts";
import { InvalidFileError } from "../errors.ts";
import type { Layout } from "./layout.ts";

/** Reads named tensors from a checkpoint as f32 (the loader's view of `src/io/safetensors.ts`). */
export interface TensorSource {
  /** Whether the checkpoint holds `name`. */
  has(name: string): boolean;
  /** Shape of `name`. */
  shape(name: string): number[];
  /** The values of `name`, converted to f32. */
  readF32(name: string): Promise<Float32Array>;
}

/** A linear layer `y = x Wᵀ + b` with `W` `[out, in]`, in bindable row ranges. */
export interface Linear {
  /** Weight `[out, in]`. */
  readonly w: Tensor;
  /** Row ranges of `w` that fit one binding (one entry when it fits whole). */
  readonly ranges: { rowStart: number; tensor: Tensor }[];
  /** Bias `[out]` or null. */
  readonly b: Tensor | null;
}

/**
 * A layer's q, k and v projections stacked `[Nq + 2 Nkv, in]` in one buffer (the layer's `q`, `k` and `v`
 * are views of it), so that one product computes all three (and one their input gradient); likewise a
 * llama MLP's gate and up projections, `[2 I, in]`.
 */
export interface StackedLinear {
  /** The stacked weight (and bias) as one linear layer. */
  readonly lin: Linear;
  /** Where the blocks end along the output columns: `[Nq, Nq + Nkv]` (gate and up: `[I, 2 I]`). */
  readonly groups: ColumnGroups;
  /**
   * q/k/v only (null for gate and up): the k and v rows `[2 Nkv, in]` (a view of the stack) and their
   * biases, as one linear layer: an adaption prompt's keys and values in one product (output groups
   * `[Nkv, 2 Nkv]`).
   */
  readonly kv: Linear | null;
}

/** A norm's parameters (LayerNorm has a bias). */
export interface Norm {
  /** Scale `[C]`. */
  readonly weight: Tensor;
  /** Shift `[C]` (LayerNorm) or null (RMSNorm). */
  readonly bias: Tensor | null;
}

/** One transformer layer's weights. */
export interface LayerWeights {
  /** Norm before attention. */
  readonly norm1: Norm;
  /** Query projection. */
  readonly q: Linear;
  /** Key projection. */
  readonly k: Linear;
  /** Value projection. */
  readonly v: Linear;
  /** q, k and v stacked in one buffer, or null where they could not be (see {@link uploadProjections}). */
  readonly qkv: StackedLinear | null;
  /** Output projection. */
  readonly o: Linear;
  /** Norm before the MLP. */
  readonly norm2: Norm;
  /** MLP projections: llama gate/up/down, gpt2 fc/proj (as `up` and `down`; `gate` null). */
  readonly gate: Linear | null;
  /** Up (llama) or c_fc (gpt2). */
  readonly up: Linear;
  /** llama: gate and up stacked in one buffer (`gate` and `up` are views of it), or null. */
  readonly gateUp: StackedLinear | null;
  /** Down (llama) or mlp.c_proj (gpt2). */
  readonly down: Linear;
}

/** All base weights of a model. */
export interface Weights {
  /** Token embedding `[V, C]` with bindable ranges. */
  readonly embed: Linear;
  /** Learned positions `[P, C]` (gpt2) or null. */
  readonly positions: Tensor | null;
  /** Layers, bottom first. */
  readonly layers: LayerWeights[];
  /** Final norm. */
  readonly finalNorm: Norm;
  /** LM head `[V, C]` (the embedding when tied). */
  readonly lmHead: Linear;
  /** Bytes uploaded. */
  readonly bytes: number;
}

/**
 * Uploads a layer's q, k and v weights (or a llama MLP's gate and up; `[rows, in]` each, f32 or f16 bits)
 * and biases: into one buffer when each part's offset can be bound on its own and the stack fits one
 * binding — the parts then are views of it and `stacked` is the whole, for one product — else as separate
 * uploads (`stacked` null).
 *
 * @param gpu The GPU.
 * @param parts q, k, v: values in the compute dtype, rows, f32 bias or null, label.
 * @param cols Input features.
 * @param label A name for the stack.
 * @returns The three layers, the stack or null, and the bytes uploaded.
 */
export function uploadProjections(
  gpu: Gpu,
  parts: { data: Float32Array | Uint16Array; rows: number; bias: Float32Array | null; label: string }[],
  cols: number,
  label: string,
): { linears: Linear[]; stacked: StackedLinear | null; bytes: number } {
  let bytes = 0;
  const vector = (data: Float32Array, name: string) => {
    const t = tensorFrom(gpu, data, [data.length], name);
    bytes += t.byteLength;
    return t;
  };
  const biases = parts.map((p) => (p.bias ? vector(p.bias, `${p.label}.bias`) : null));
  const dtype = parts[0]!.data instanceof Uint16Array ? "f16" : "f32";
  const rows = parts.reduce((a, p) => a + p.rows, 0);
  const sameBias = biases.every((b) => b !== null) || biases.every((b) => b === null);
  // column groups end on multiples of 4 (the products read and write them as vec4)
  const whole4 = parts.every((p) => p.rows % 4 === 0);
  const stack = sameBias && whole4 && parts.length >= 2
    ? createStacked(gpu, parts.map((p) => [p.rows, cols]), dtype, label, parts.map((p) => p.label))
    : null;
  if (!stack) {
    const linears = parts.map((p, i) => {
      const w = tensorFrom(gpu, p.data, [p.rows, cols], p.label);
      bytes += w.byteLength;
      return { w, b: biases[i]!, ranges: splitRows(gpu, w) };
    });
    return { linears, stacked: null, bytes };
  }
  bytes += stack.whole.byteLength;
  const linears = parts.map((p, i) => {
    const w = stack.parts[i]!;
    writeTensor(gpu, w, p.data);
    return { w, b: biases[i]!, ranges: [{ rowStart: 0, tensor: w }] };
  });
  const whole = stack.whole.reshape([rows, cols]);
  const bias = biases[0]
    ? vector(Float32Array.from(parts.flatMap((p) => Array.from(p.bias!))), `${label}.bias`)
    : null;
  const q = parts[0]!.rows, k = parts[1]!.rows;
  let kv: Linear | null = null;
  if (parts.length === 3) {
    const kvW = new Tensor(whole.buffer, [rows - q, cols], dtype, linears[1]!.w.offset, `${label}.kv`);
    const kvBias = biases[1]
      ? vector(Float32Array.from([...parts[1]!.bias!, ...parts[2]!.bias!]), `${label}.kv.bias`)
      : null;
    kv = { w: kvW, b: kvBias, ranges: [{ rowStart: 0, tensor: kvW }] };
  }
  return {
    linears,
    stacked: { lin: { w: whole, b: bias, ranges: [{ rowStart: 0, tensor: whole }] }, groups: [q, q + k], kv },
    bytes,
  };
}

/**
 * Estimates the GPU bytes the weights need in a dtype (for the fit check before uploading).
 *
 * @param config The model config.
 * @param dtype Compute dtype of projections.
 * @returns Bytes.
 */
export function weightBytes(config: ModelConfig, dtype: "f32" | "f16"): number {
  const e = dtype === "f16" ? 2 : 4;
  const C = config.hiddenSize;
  const qkv = C * (config.numHeads + 2 * config.numKvHeads) * config.headDim;
  const o = config.numHeads * config.headDim * C;
  const mlp = (config.family === "gpt2" ? 2 : 3) * C * config.intermediateSize;
  const emb = config.vocabSize * C * (config.tieWordEmbeddings ? 1 : 2);
  return e * (config.numLayers * (qkv + o + mlp) + emb);
}

/**
 * Reads every weight of the model from `source` and uploads it, one tensor at a time.
 *
 * @param gpu The GPU.
 * @param config Normalised config.
 * @param layout The family's layout.
 * @param source The checkpoint.
 * @param dtype Compute dtype of projections and embeddings.
 * @returns The weights on the GPU.
 */
export async function loadWeights(
  gpu: Gpu,
  config: ModelConfig,
  layout: Layout,
  source: TensorSource,
  dtype: "f32" | "f16",
): Promise<Weights> {
  const C = config.hiddenSize;
  let bytes = 0;
  const need = (name: string, shape: number[]): void => {
    if (!source.has(name)) {
      throw new InvalidFileError(
        `the checkpoint has no tensor "${name}", which a ${config.family} model with this config.json needs; ` +
          "is the folder a complete HuggingFace checkpoint of this architecture?",
      );
    }
    const got = source.shape(name);
    if (got.length !== shape.length || got.some((d, i) => d !== shape[i])) {
      throw new InvalidFileError(
        `checkpoint tensor "${name}" has shape [${got}] but config.json implies [${shape}]; the weights and ` +
          "config.json do not belong together",
      );
    }
  };
  const upload = (data: Float32Array, shape: number[], label: string, keepF32 = false): Tensor => {
    const t = dtype === "f16" && !keepF32 ? tensorFrom(gpu, f32ArrayToF16(data), shape, label) : tensorFrom(
      gpu,
      data,
      shape,
      label,
    );
    bytes += t.byteLength;
    return t;
  };
  const vector = async (name: string, n: number): Promise<Tensor> => {
    need(name, [n]);
    const t = tensorFrom(gpu, await source.readF32(name), [n], name);
    bytes += t.byteLength;
    return t;
  };
  const makeLinear = (w: Tensor, b: Tensor | null): Linear => ({ w, b, ranges: splitRows(gpu, w) });
  /** A projection stored [out, in] (Linear) or [in, out] (Conv1D), returned as [out, in]. */
  const linear = async (module: string, out: number, inp: number, bias: boolean): Promise<Linear> => {
    const name = `${module}.weight`;
    need(name, layout.weightOrder === "out_in" ? [out, inp] : [inp, out]);
    let data = await source.readF32(name);
    if (layout.weightOrder === "in_out") data = transpose(data, inp, out);
    checkBufferFits(gpu, data.length * (dtype === "f16" ? 2 : 4), name);
    const w = upload(data, [out, inp], name);
    const b = bias && source.has(`${module}.bias`) ? await vector(`${module}.bias`, out) : null;
    return makeLinear(w, b);
  };
  const norm = async (module: string): Promise<Norm> => ({
    weight: await vector(`${module}.weight`, C),
    bias: config.norm === "layernorm" ? await vector(`${module}.bias`, C) : null,
  });

  need(layout.embed, [config.vocabSize, C]);
  const embedData = await source.readF32(layout.embed);
  const embed = makeLinear(upload(embedData, [config.vocabSize, C], layout.embed), null);
  let positions: Tensor | null = null;
  if (layout.positionEmbed) {
    need(layout.positionEmbed, [config.maxPositions, C]);
    positions = upload(
      await source.readF32(layout.positionEmbed),
      [config.maxPositions, C],
      layout.positionEmbed,
      true,
    );
  }
  const H = config.numHeads, Hkv = config.numKvHeads, D = config.headDim;
  const layers: LayerWeights[] = [];
  for (let i = 0; i < config.numLayers; i++) {
    const p = layout.layerPrefix(i);
    const m = layout.modules;
    const inDtype = (data: Float32Array) => (dtype === "f16" ? f32ArrayToF16(data) : data);
    let parts: { data: Float32Array | Uint16Array; rows: number; bias: Float32Array | null; label: string }[];
    if ("fused" in m.qkv) {
      // gpt2 c_attn: Conv1D [C, 3C] = [q | k | v] along the output columns
      const name = `${p}${m.qkv.fused}`;
      need(`${name}.weight`, [C, 3 * C]);
      const wt = transpose(await source.readF32(`${name}.weight`), C, 3 * C); // [3C, C]
      need(`${name}.bias`, [3 * C]);
      const bias = await source.readF32(`${name}.bias`);
      parts = ["q", "k", "v"].map((label, j) => ({
        data: inDtype(wt.subarray(j * C * C, (j + 1) * C * C)),
        rows: C,
        bias: bias.slice(j * C, (j + 1) * C),
        label: `${name}.${label}`,
      }));
    } else {
      parts = [];
      for (const [module, rows] of [[m.qkv.q, H * D], [m.qkv.k, Hkv * D], [m.qkv.v, Hkv * D]] as const) {
        const name = `${p}${module}`;
        need(`${name}.weight`, [rows, C]);
        const b = config.attentionBias && source.has(`${name}.bias`);
        if (b) need(`${name}.bias`, [rows]);
        parts.push({
          data: inDtype(await source.readF32(`${name}.weight`)),
          rows,
          bias: b ? await source.readF32(`${name}.bias`) : null,
          label: `${name}.weight`,
        });
      }
    }
    const projections = uploadProjections(gpu, parts, C, `${p}qkv`);
    bytes += projections.bytes;
    const [q, k, v] = projections.linears as [Linear, Linear, Linear];
    const o = await linear(`${p}${m.o}`, C, H * D, config.attentionBias || config.family === "gpt2");
    const I = config.intermediateSize;
    let gate: Linear | null = null, up: Linear, down: Linear, gateUp: StackedLinear | null = null;
    if ("gate" in m.mlp) {
      // gate and up stacked in one buffer where possible (one product forward, one input gradient)
      const mlpParts = [];
      for (const module of [m.mlp.gate, m.mlp.up]) {
        const name = `${p}${module}`;
        need(`${name}.weight`, [I, C]);
        const b = config.mlpBias && source.has(`${name}.bias`);
        if (b) need(`${name}.bias`, [I]);
        checkBufferFits(gpu, I * C * (dtype === "f16" ? 2 : 4), `${name}.weight`);
        mlpParts.push({
          data: inDtype(await source.readF32(`${name}.weight`)),
          rows: I,
          bias: b ? await source.readF32(`${name}.bias`) : null,
          label: `${name}.weight`,
        });
      }
      const gu = uploadProjections(gpu, mlpParts, C, `${p}gate_up`);
      bytes += gu.bytes;
      [gate, up] = gu.linears as [Linear, Linear];
      gateUp = gu.stacked;
      down = await linear(`${p}${m.mlp.down}`, C, I, config.mlpBias);
    } else {
      up = await linear(`${p}${m.mlp.fc}`, I, C, true);
      down = await linear(`${p}${m.mlp.proj}`, C, I, true);
    }
    layers.push({
      norm1: await norm(`${p}${m.norm1}`),
      q,
      k,
      v,
      qkv: projections.stacked,
      o,
      norm2: await norm(`${p}${m.norm2}`),
      gate,
      up,
      gateUp,
      down,
    });
  }
  const finalNorm = await norm(layout.finalNorm);
  let lmHead = embed;
  if (!config.tieWordEmbeddings) {
    if (source.has(layout.lmHead)) {
      need(layout.lmHead, [config.vocabSize, C]);
      lmHead = makeLinear(
        upload(await source.readF32(layout.lmHead), [config.vocabSize, C], layout.lmHead),
        null,
      );
    } else {
      throw new InvalidFileError(
        `config.json says tie_word_embeddings is false but the checkpoint has no "${layout.lmHead}"`,
      );
    }
  }
  return { embed, positions, layers, finalNorm, lmHead, bytes };
}

/**
 * Transposes a row-major `[rows, cols]` matrix.
 *
 * @param a Values.
 * @param rows Rows of `a`.
 * @param cols Columns of `a`.
 * @returns `[cols, rows]`.
 */
export function transpose(a: Float32Array, rows: number, cols: number): Float32Array {
  const out = new Float32Array(a.length);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) out[c * rows + r] = a[r * cols + c]!;
  }
  return out;
}

/**
 * Describes how much GPU memory a model needs, for "does not fit" messages.
 *
 * @param config The config.
 * @param dtype The dtype.
 * @returns A short human-readable size.
 */
export function describeWeightBytes(config: ModelConfig, dtype: "f32" | "f16"): string {
  return fmtBytes(weightBytes(config, dtype));
}
