/**
 * Decoding with a KV cache: a prefill of the prompt, then one-token steps. Each step's token is
 * sampled on the GPU straight into the buffer the next step's embedding reads, so the host encodes
 * step after step without waiting, and token ids are read back in chunks (the only readback). The
 * adapter's keys/values are computed once per adapter version, not per step (PEFT recomputes them).
 *
 * The decode step is replayable: nothing in its dispatches changes from step to step. The position
 * lives in a GPU decode state (`kernels/kv_cache.ts`) that the step's last kernel advances; keys and
 * values are appended at that position by a kernel that also sets the cache mask there; RoPE /
 * position-embedding positions are written by that kernel too; attention runs over the first `keyLen`
 * cache positions, `keyLen` the step's position + 1 rounded up to 32 (at most the call's length `L`,
 * prompt + new tokens rounded up to 64), with the cache mask hiding what is not written yet
 * (bit-identical to attending the written prefix: hidden keys add exact zeros). So a step is recorded
 * once per (model, keyLen, sampler, adapter) and `generateStream` replays the recorded steps into a few
 * submits per chunk, reading the token history back once per chunk while the next chunk runs.
 *
 * @module
 */

import { type Op, Recorder, runOps } from "../gpu/recorder.ts";
import { createTensor, readBytes, readTensor, type Tensor, writeTensor } from "../gpu/tensor.ts";
import { copyElements } from "../../kernels/fill.ts";
import { decodeAdvance } from "../../kernels/kv_cache.ts";
import { sampleTokens } from "../../kernels/sampling.ts";
import { logitsForward } from "../../kernels/cross_entropy.ts";
import { InvalidFileError, UnsupportedConfigError } from "../errors.ts";
import type { Activations } from "./activations.ts";
import { type Model, runningAdapter } from "./model.ts";
import type { AdapterState } from "../adapters/state.ts";
import type { KvCache } from "./self_attention.ts";
import {
  activationDtype,
  activationsFor,
  decodeTuning,
  prepareBatch,
  recordForward,
  uploadBatch,
} from "./transformer.ts";

/** Options of {@link generate}. */
export interface GenerateOptions {
  /** How many tokens to generate at most. */
  maxNewTokens: number;
  /** 0 (default) = greedy; otherwise the softmax temperature. */
  temperature?: number;
  /** Nucleus sampling mass (default 1 = off). */
  topP?: number;
  /** Sampling seed (default 0). */
  seed?: number;
  /** Token ids that end generation (the stop token is included in the output). */
  stop?: number[];
  /** Tokens decoded between readbacks (default 8). Larger is faster, smaller streams sooner. */
  chunk?: number;
  /**
   * Replay one recorded decode step (default true). `false` records every step anew (the earlier path,
   * kept for comparison; same tokens).
   */
  replay?: boolean;
}

/** A KV cache for batch 1 with its decode buffers, kept on the model and reused. */
interface DecodeState {
  readonly kv: KvCache;
  readonly lastHidden: Tensor; // (1, C)
  readonly logits: Tensor; // (1, V)
  readonly tokens: Tensor; // (maxLen) i32 history of sampled tokens
  readonly rng: Tensor; // u32 (4)
  readonly state: Tensor; // u32 (4) decode state [pos, n, 0, 0] (kernels/kv_cache.ts)
  /** Recorded replayable steps by cache length and sampler, and prefills by prompt length. */
  readonly steps: Map<string, RecordedStep>;
}

/** One recorded decode step and what its bind groups captured (checked before a replay). */
interface RecordedStep {
  readonly ops: Op[];
  readonly adapter: AdapterState | null;
  readonly params: GPUBuffer | null;
  readonly acts: Activations;
  /** The one-token step's buffers the sampling writes into (the same as `acts` for decode steps). */
  readonly stepActs: Activations;
}

const decodeStates = new WeakMap<Model, DecodeState>();

/**
 * The model's KV cache for batch `B`, preallocated for `maxSeqLen` positions.
 *
 * @param model The model.
 * @param B Batch size.
 * @returns The cache.
 */
export function createKvCache(model: Model, B: number): KvCache {
  const c = model.config;
  const width = c.numKvHeads * c.headDim;
  const shape = [B, model.maxSeqLen, width];
  const dtype = activationDtype(model);
  const mask = createTensor(model.gpu, [B, model.maxSeqLen], "i32", "kv mask");
  writeTensor(model.gpu, mask, new Int32Array(B * model.maxSeqLen).fill(1));
  return {
    k: Array.from({ length: c.numLayers }, (_, l) => createTensor(model.gpu, shape, dtype, `kcache${l}`)),
    v: Array.from({ length: c.numLayers }, (_, l) => createTensor(model.gpu, shape, dtype, `vcache${l}`)),
    maxLen: model.maxSeqLen,
    batch: B,
    mask,
  };
}

/** Batched decoding with a KV cache, returning last-position logits (tests and custom samplers). */
export interface Decoder {
  /** Positions already in the cache. */
  readonly past: number;
  /**
   * Runs the prompt batch (right-padded rows allowed via the mask) and returns the logits of its last
   * position for every row, `(B, V)`.
   */
  prefill(batch: { inputIds: number[][]; attentionMask?: number[][] }): Promise<Float32Array>;
  /** Appends one token per row (mask 0 marks a padded position) and returns `(B, V)` logits. */
  step(ids: number[], mask?: number[]): Promise<Float32Array>;
}

/**
 * Creates a decoder over a fresh KV cache for batch `B`.
 *
 * @param model The model.
 * @param B Batch size.
 * @returns The decoder.
 */
export function createDecoder(model: Model, B: number): Decoder {
  const gpu = model.gpu;
  const kv = createKvCache(model, B);
  const C = model.config.hiddenSize;
  const last = createTensor(gpu, [B, C], activationDtype(model), "decoder last hidden");
  const logits = createTensor(gpu, [B, model.config.vocabSize], "f32", "decoder logits");
  let past = 0;
  let masked = false;
  const run = async (inputIds: number[][], mask: number[][] | undefined): Promise<Float32Array> => {
    const p = prepareBatch(model, mask ? { inputIds, attentionMask: mask } : { inputIds }, past);
    const acts = activationsFor(model, B, p.T, false);
    uploadBatch(model, acts, p);
    for (let b = 0; b < B; b++) {
      gpu.device.queue.writeBuffer(
        kv.mask.buffer,
        (b * kv.maxLen + past) * 4,
        p.mask as Int32Array<ArrayBuffer>,
        b * p.T,
        p.T,
      );
    }
    masked ||= p.masked;
    const adapter = runningAdapter(model);
    const rec = new Recorder(gpu);
    recordForward(rec, model, acts, { adapter, masked, head: {}, cache: { kv, past } });
    for (let b = 0; b < B; b++) copyElements(rec, acts.hFinal, last, C, (b * p.T + p.T - 1) * C, b * C);
    logitsForward(rec, logits, last, model.weights.lmHead.ranges);
    rec.submit();
    past += p.T;
    return (await readTensor(gpu, logits)) as Float32Array;
  };
  return {
    get past() {
      return past;
    },
    prefill: (batch) => {
      if (batch.inputIds.length !== B) throw new InvalidFileError(`the decoder was made for batch ${B}`);
      return run(batch.inputIds, batch.attentionMask);
    },
    step: (ids, mask) => run(ids.map((id) => [id]), mask ? mask.map((m) => [m]) : undefined),
  };
}

function decodeState(model: Model): DecodeState {
  let s = decodeStates.get(model);
  if (!s || s.kv.k[0]!.dtype !== activationDtype(model)) { // (the precision switch changed: a new cache)
    const gpu = model.gpu;
    s = {
      kv: createKvCache(model, 1),
      lastHidden: createTensor(gpu, [1, model.config.hiddenSize], activationDtype(model), "last hidden"),
      logits: createTensor(gpu, [1, model.config.vocabSize], "f32", "decode logits"),
      tokens: createTensor(gpu, [model.maxSeqLen + 1], "i32", "sampled tokens"),
      rng: createTensor(gpu, [4], "u32", "sampler state"),
      state: createTensor(gpu, [4], "u32", "decode state"),
      steps: new Map(),
    };
    decodeStates.set(model, s);
  }
  return s;
}

/**
 * Records the forward of `acts` (already uploaded) against the cache and the logits of its last row
 * of batch row 0 (decode is batch 1).
 */
function recordStep(
  rec: Recorder,
  model: Model,
  acts: Activations,
  s: DecodeState,
  past: number,
  refreshAdapter: boolean,
  kv: KvCache = s.kv,
  masked = false,
): void {
  const adapter = runningAdapter(model);
  recordForward(rec, model, acts, {
    adapter,
    masked,
    head: {},
    cache: { kv, past },
    adapterKeyValues: refreshAdapter,
  });
  const C = model.config.hiddenSize;
  // logits of the last position only: (1, C) x (V, C)^T (a one-token step's hidden state is that row)
  let last = acts.hFinal;
  if (acts.N !== 1) {
    copyElements(rec, acts.hFinal, s.lastHidden, C, (acts.T - 1) * C, 0);
    last = s.lastHidden;
  }
  logitsForward(rec, s.logits, last, model.weights.lmHead.ranges);
}

interface Sampler {
  temperature: number;
  topP: number;
}

function recordSample(rec: Recorder, s: DecodeState, out: Tensor, index: number, sampler: Sampler): void {
  sampleTokens(rec, {
    out,
    outIndex: index,
    outStride: 0,
    logits: s.logits,
    state: s.rng,
    temperature: sampler.temperature,
    topP: sampler.topP,
  });
}

/**
 * The replayable decode step attending over `L` cache positions: embedding of `acts.ids[0]` at
 * `acts.positions[0]`, every layer (appending at the decode state's position, attending over the first
 * `L` cache positions through the mask), logits, sampling into `acts.ids[0]`, and the state's advance.
 * Recorded once and cached by `L`, sampler and what the bind groups captured.
 */
function replayableStep(
  model: Model,
  s: DecodeState,
  acts: Activations,
  L: number,
  sampler: Sampler,
): Op[] {
  return recordedOps(model, s, `${L}|${samplingKey(sampler)}|${decodeTuning.fused}`, acts, acts, (rec) => {
    // past = L - 1 and one query: keyLen = L, queryOffset = L - 1, so the causal mask hides nothing and
    // the cache mask alone decides which positions are visible
    recordStep(rec, model, acts, s, L - 1, false, { ...s.kv, position: s.state }, true);
    recordSample(rec, s, acts.ids, 0, sampler);
    decodeAdvance(rec, s.state, acts.ids, s.tokens, acts.positions);
  });
}

/**
 * The ops under `key` in the decode state's cache when they were recorded against the same running
 * adapter, parameter buffer and activation buffers (what their bind groups captured), else `record`ed
 * anew and cached.
 */
function recordedOps(
  model: Model,
  s: DecodeState,
  key: string,
  acts: Activations,
  stepActs: Activations,
  record: (rec: Recorder) => void,
): Op[] {
  const adapter = runningAdapter(model);
  const params = adapter ? adapter.params.buffer : null;
  const hit = s.steps.get(key);
  if (
    hit && hit.adapter === adapter && hit.params === params && hit.acts === acts && hit.stepActs === stepActs
  ) return hit.ops;
  const rec = new Recorder(model.gpu);
  record(rec);
  const ops = rec.take();
  if (s.steps.size >= 512) s.steps.clear();
  s.steps.set(key, { ops, adapter, params, acts, stepActs });
  return ops;
}

/**
 * The prefill of a `P`-token prompt (already uploaded), the sampling of the first new token into
 * `stepActs.ids[0]` and the decode state's advance: recorded once per prompt length, sampler and adapter
 * refresh, then replayed (its dispatches do not depend on the prompt's ids).
 */
function prefillOps(
  model: Model,
  s: DecodeState,
  P: number,
  refreshAdapter: boolean,
  sampler: Sampler,
  stepActs: Activations,
): Op[] {
  const acts = activationsFor(model, 1, P, false);
  const key = `prefill|${P}|${refreshAdapter}|${samplingKey(sampler)}|${decodeTuning.fused}`;
  return recordedOps(model, s, key, acts, stepActs, (rec) => {
    recordStep(rec, model, acts, s, 0, refreshAdapter);
    recordSample(rec, s, stepActs.ids, 0, sampler);
    decodeAdvance(rec, s.state, stepActs.ids, s.tokens, stepActs.positions);
  });
}

/** The part of a recorded step's cache key that says how it samples. */
function samplingKey(sampler: Sampler): string {
  return sampler.temperature > 0 ? `${sampler.temperature}|${sampler.topP}` : "greedy";
}

/**
 * The replayed decode step of a greedy call with this prompt length and token budget (benchmarks:
 * GPU time and host encoding time of one step). Running it moves the decode state on; the next
 * generate call resets it.
 *
 * @param model The model.
 * @param promptLen Prompt tokens.
 * @param maxNewTokens New tokens.
 * @returns The step's ops.
 */
export function decodeStepOps(model: Model, promptLen: number, maxNewTokens: number): Op[] {
  const L = cacheLength(model, Math.min(promptLen + maxNewTokens, model.maxSeqLen));
  const s = decodeState(model);
  return replayableStep(model, s, activationsFor(model, 1, 1, false), L, { temperature: 0, topP: 1 });
}

/**
 * The recorded prefill of a greedy call with this prompt length (benchmarks: a per-kernel profile of the
 * time to first token). The prompt's ids are whatever the activation buffers hold.
 *
 * @param model The model.
 * @param promptLen Prompt tokens.
 * @returns The prefill's ops (forward, last-row logits, sampling, decode-state advance).
 */
export function decodePrefillOps(model: Model, promptLen: number): Op[] {
  const adapter = runningAdapter(model);
  const refresh = adapter !== null && adapter.kvVersion !== adapter.version;
  const stepActs = activationsFor(model, 1, 1, false);
  return prefillOps(model, decodeState(model), promptLen, refresh, { temperature: 0, topP: 1 }, stepActs);
}

/** The cache length of one generate call: prompt + new tokens rounded up to 64, at most maxSeqLen. */
function cacheLength(model: Model, total: number): number {
  return Math.min(model.maxSeqLen, Math.ceil(total / 64) * 64);
}

/**
 * Generates tokens after `inputIds`, streaming them as they are read back.
 *
 * @param model The model (with the active adapter unless disabled).
 * @param inputIds The prompt's token ids.
 * @param options Length, sampling, stop tokens.
 * @returns An async iterator of new token ids.
 * @example Stream 20 tokens greedily
 * ```ts ignore
 * for await (const id of generateStream(model, ids, { maxNewTokens: 20 })) console.log(id);
 * ```
 */
export async function* generateStream(
  model: Model,
  inputIds: number[],
  options: GenerateOptions,
): AsyncGenerator<number, void, undefined> {
  const maxNew = options.maxNewTokens;
  if (!Number.isInteger(maxNew) || maxNew < 0) {
    throw new UnsupportedConfigError("maxNewTokens must be an integer ≥ 0");
  }
  if (inputIds.length === 0) throw new InvalidFileError("generate needs a prompt of at least one token");
  const temperature = options.temperature ?? 0;
  const topP = options.topP ?? 1;
  if (!(temperature >= 0) || !(topP > 0 && topP <= 1)) {
    throw new UnsupportedConfigError("temperature must be ≥ 0 and topP in (0, 1]");
  }
  const total = Math.min(inputIds.length + maxNew, model.maxSeqLen);
  if (inputIds.length > model.maxSeqLen) {
    throw new InvalidFileError(
      `the prompt has ${inputIds.length} tokens, more than this model instance's maximum of ${model.maxSeqLen}`,
    );
  }
  const stop = new Set(options.stop ?? []);
  const chunk = Math.max(1, options.chunk ?? 8);
  const sampler: Sampler = { temperature, topP };
  const sw = model.config.slidingWindow;
  const L = cacheLength(model, total);
  // a sliding window needs the true query position, which the replayed step does not know
  const replay = (options.replay ?? true) && !(sw && L > sw);
  if (replay) yield* replayLoop(model, inputIds, total, chunk, stop, sampler, options.seed ?? 0, L);
  else yield* recordingLoop(model, inputIds, total, chunk, stop, sampler, options.seed ?? 0);
}

/** Prefill of the prompt (and the adapter keys/values when stale), its logits in `s.logits`. */
function recordPrefill(rec: Recorder, model: Model, s: DecodeState, inputIds: number[]): void {
  const adapter = runningAdapter(model);
  const refresh = adapter !== null && adapter.kvVersion !== adapter.version;
  const pre = prepareBatch(model, { inputIds: [inputIds] });
  const preActs = activationsFor(model, 1, inputIds.length, false);
  uploadBatch(model, preActs, pre);
  recordStep(rec, model, preActs, s, 0, refresh);
  if (adapter) adapter.kvVersion = adapter.version;
}

/** Replayed steps per submit inside a chunk. */
const SUBMIT_STEPS = 4;
/** Granularity of the attention's key length in replayed steps (a key block of the decode kernel). */
const KEY_BUCKET = 32;

/** The replaying decode loop (see the module doc). */
async function* replayLoop(
  model: Model,
  inputIds: number[],
  total: number,
  chunk: number,
  stop: Set<number>,
  sampler: Sampler,
  seed: number,
  L: number,
): AsyncGenerator<number, void, undefined> {
  const gpu = model.gpu;
  const s = decodeState(model);
  const P = inputIds.length;
  const stepActs = activationsFor(model, 1, 1, false);
  writeTensor(gpu, s.rng, new Uint32Array([seed >>> 0, 0, 0, 0]));
  // pos = P - 1: the prefill's advance moves it to P, the first generated token's position
  writeTensor(gpu, s.state, new Uint32Array([P - 1, 0, 0, 0]));
  const mask = new Int32Array(L);
  mask.fill(1, 0, P);
  gpu.device.queue.writeBuffer(s.kv.mask.buffer, s.kv.mask.offset, mask);
  // the prompt's ids and positions go up; the prefill's dispatches are recorded once per prompt length
  const adapter = runningAdapter(model);
  const refresh = adapter !== null && adapter.kvVersion !== adapter.version;
  uploadBatch(model, activationsFor(model, 1, P, false), prepareBatch(model, { inputIds: [inputIds] }));
  runOps(gpu, prefillOps(model, s, P, refresh, sampler, stepActs));
  if (adapter) adapter.kvVersion = adapter.version;
  const budget = total - P;
  if (budget <= 0) return;
  // readbacks in flight: each resolves to the history's first `upto` tokens
  const pending: { upto: number; ids: Promise<Uint8Array> }[] = [];
  const read = (upto: number) => {
    const ids = readBytes(gpu, s.tokens.buffer, s.tokens.offset, upto * 4, s.tokens.label);
    ids.catch(() => {}); // abandoned after a stop token: never an unhandled rejection
    pending.push({ upto, ids });
  };
  read(1); // the first token as soon as the prefill is done
  let produced = 1; // tokens whose sampling is submitted
  // the step that samples token `i` appends position P + i - 1 and attends over the first keyLen
  // cache positions, keyLen rounded up to KEY_BUCKET (one recorded step per bucket), so attention
  // reads about as many keys as the written prefix rather than all L
  const opsFor = (i: number) => {
    const keyLen = Math.min(L, Math.ceil((P + i) / KEY_BUCKET) * KEY_BUCKET);
    return replayableStep(model, s, stepActs, keyLen, sampler);
  };
  // a chunk is submitted a few steps at a time, so the GPU starts on it while the host encodes the rest
  const encode = () => {
    const k = Math.min(chunk, budget - produced);
    if (k <= 0) return;
    for (let done = 0; done < k; done += SUBMIT_STEPS) {
      const n = Math.min(SUBMIT_STEPS, k - done);
      const batch: Op[] = [];
      for (let i = 0; i < n; i++) {
        for (const op of opsFor(produced + done + i)) batch.push(op);
      }
      runOps(gpu, batch);
    }
    produced += k;
    read(produced);
  };
  encode(); // one chunk queued behind the first readback
  let delivered = 0;
  while (delivered < budget) {
    const next = pending.shift()!;
    const bytes = await next.ids;
    encode(); // keep the GPU busy while the host delivers
    const ids = new Int32Array(bytes.buffer, bytes.byteOffset, next.upto);
    for (let i = delivered; i < next.upto; i++) {
      const id = ids[i]!;
      yield id;
      delivered++;
      if (stop.has(id)) return;
    }
  }
}

/** The earlier loop: every step recorded anew with its position in uniforms (`replay: false`). */
async function* recordingLoop(
  model: Model,
  inputIds: number[],
  total: number,
  chunk: number,
  stop: Set<number>,
  sampler: Sampler,
  seed: number,
): AsyncGenerator<number, void, undefined> {
  const gpu = model.gpu;
  const s = decodeState(model);
  writeTensor(gpu, s.rng, new Uint32Array([seed >>> 0, 0, 0, 0]));
  let rec = new Recorder(gpu);
  recordPrefill(rec, model, s, inputIds);
  recordSample(rec, s, s.tokens, 0, sampler);
  rec.submit();
  const stepActs = activationsFor(model, 1, 1, false);
  let produced = 0; // tokens recorded on the GPU
  let delivered = 0; // tokens yielded
  const budget = total - inputIds.length;
  while (delivered < budget) {
    // encode ahead up to `chunk` tokens beyond what was delivered
    while (produced + 1 < budget && produced + 1 - delivered < chunk) {
      const past = inputIds.length + produced;
      writeTensor(gpu, stepActs.positions, new Int32Array([past]));
      rec = new Recorder(gpu);
      copyElements(rec, s.tokens, stepActs.ids, 1, produced, 0);
      recordStep(rec, model, stepActs, s, past, false);
      recordSample(rec, s, s.tokens, produced + 1, sampler);
      rec.submit();
      produced++;
    }
    const upto = Math.min(produced + 1, budget);
    const ids = (await readTensor(gpu, s.tokens)) as Int32Array;
    for (let i = delivered; i < upto; i++) {
      const id = ids[i]!;
      yield id;
      delivered++;
      if (stop.has(id)) return;
    }
  }
}

/**
 * Generates up to `maxNewTokens` tokens after `inputIds` (greedy when temperature is 0).
 *
 * @param model The model.
 * @param inputIds The prompt's token ids.
 * @param options Length, sampling, stop tokens.
 * @returns The new tokens only.
 * @example Greedy continuation
 * ```ts ignore
 * const ids = await generate(model, [1, 450, 4996], { maxNewTokens: 16 });
 * ```
 */
export async function generate(
  model: Model,
  inputIds: number[],
  options: GenerateOptions,
): Promise<number[]> {
  const out: number[] = [];
  for await (const id of generateStream(model, inputIds, { chunk: 32, ...options })) out.push(id);
  return out;
}
