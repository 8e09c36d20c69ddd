/**
 * The language-model loss fused with the LM head, so that the (N, V) logits are never all resident:
 * the vocabulary is swept in chunks of `chunk` rows of the head weight. The first sweep computes each
 * chunk's logits (`linearForward`) and folds them into a running max and sum of exponentials per row
 * (the online softmax), picking up the label's logit on the way; one workgroup then turns these into the
 * mean loss over counted tokens. The second sweep recomputes each chunk's logits, turns them in place into
 * `dlogits = (softmax - onehot(label)) / count` and adds `dlogits · weight[chunk]` into `dHidden`
 * (`linearBackwardInput`). For training (dHidden wanted) the default sweeps blocks of rows instead, with
 * the whole vocabulary per block: the block's logits once, its softmax statistics, dlogits in place, its
 * dHidden rows (`crossEntropyTuning.rowSweep`), so the logits are computed once instead of twice; the
 * scratch is the same size. Semantics are HF's causal-LM loss on labels the caller has already shifted:
 * `loss = mean over tokens with label != -100 of (logsumexp(logits) - logits[label])`, the count computed
 * on the GPU. When no token counts HF gives NaN; we give loss 0 and a zero gradient, so a fully masked
 * batch cannot poison training. Labels must be -100 or in [0, V): any label outside [0, V) is ignored.
 *
 * The head weight (V, C) may be f32 or f16 and may arrive as row ranges (`splitRows`) when it is larger
 * than one binding; chunks never straddle ranges. The hidden state is an activation and may be f32 or f16
 * (read by the matmuls, which compute in f32); the logits chunks, the loss and dHidden are always f32.
 *
 * @module
 */

import { activationType, defineKernel, type Kernel, range } from "../src/gpu/kernel.ts";
import type { Recorder } from "../src/gpu/recorder.ts";
import type { Gpu } from "../src/gpu/device.ts";
import { createTensor, DTYPE_BYTES, Tensor } from "../src/gpu/tensor.ts";
import { GpuError } from "../src/errors.ts";
import { grid1d } from "./fill.ts";
import { linearBackwardInput, linearForward } from "./matmul.ts";

const WG = 256;
/** Chunks start at multiples of this many weight rows, so every chunk view is 256-byte aligned (f16 too). */
const CHUNK_ALIGN = 128;

/** An LM head weight (V, C): one tensor, or row ranges from `splitRows` covering all V rows in order. */
export type HeadWeight = Tensor | { rowStart: number; tensor: Tensor }[];

/** Scratch space of {@link crossEntropyLmHead}, made by {@link createCrossEntropyScratch}. */
export interface CrossEntropyScratch {
  /** Most rows it serves. */
  readonly N: number;
  /** Vocabulary rows per chunk (a multiple of 128). */
  readonly chunk: number;
  /** One chunk of logits, then of their gradient (N, chunk) f32. */
  readonly logits: Tensor;
  /** Per row: running max, running sum of exp, label logit, logsumexp (N, 4) f32. */
  readonly rowState: Tensor;
  /** `[count of counted tokens, 0, 0, 0]` f32. */
  readonly stats: Tensor;
}

/**
 * Allocates the scratch of {@link crossEntropyLmHead} for up to N rows.
 *
 * @param gpu The GPU.
 * @param N Most rows (tokens) per call.
 * @param V Vocabulary size (the chunk never exceeds it, rounded up to 128).
 * @param C Hidden size (checked against the calls; the scratch does not depend on it).
 * @param chunk Vocabulary rows per chunk (default 8192; rounded to a multiple of 128 and lowered until an
 *   (N, chunk) f32 chunk fits one binding).
 * @returns The scratch.
 */
export function createCrossEntropyScratch(
  gpu: Gpu,
  N: number,
  V: number,
  C: number,
  chunk = 8192,
): CrossEntropyScratch {
  if (N < 1 || V < 1 || C < 1) {
    throw new GpuError(`createCrossEntropyScratch: bad sizes N=${N} V=${V} C=${C}`);
  }
  const roundUp = (x: number) => Math.ceil(x / CHUNK_ALIGN) * CHUNK_ALIGN;
  let c = Math.min(roundUp(Math.max(1, chunk)), roundUp(V));
  const maxBinding = gpu.limits.maxStorageBufferBindingSize;
  while (c > CHUNK_ALIGN && N * c * 4 > maxBinding) c -= CHUNK_ALIGN;
  if (N * c * 4 > maxBinding) {
    throw new GpuError(
      `createCrossEntropyScratch: ${N} rows are too many for one binding; pass fewer tokens per call`,
    );
  }
  return {
    N,
    chunk: c,
    logits: createTensor(gpu, [N, c], "f32", "ce logits chunk"),
    rowState: createTensor(gpu, [N, 4], "f32", "ce row state"),
    stats: createTensor(gpu, [4], "f32", "ce stats"),
  };
}

/** Logits each thread of the online-softmax sweep loads at once. */
const CE_LOADS = 8;

/** WGSL: the max of `xs` as a balanced tree of `max` calls. */
function maxTree(xs: string[]): string {
  if (xs.length === 1) return xs[0]!;
  const h = xs.length >> 1;
  return `max(${maxTree(xs.slice(0, h))}, ${maxTree(xs.slice(h))})`;
}

function onlineKernel(): Kernel {
  return defineKernel("ce_online_softmax", {}, ["read", "read", "write", "uniform"], () => `
struct P { N: u32, Vc: u32, ld: u32, v0: u32, first: u32, gx: u32, fin: u32, _b: u32 }
@group(0) @binding(0) var<storage, read> logits: array<f32>;
@group(0) @binding(1) var<storage, read> labels: array<i32>;
@group(0) @binding(2) var<storage, read_write> rowState: array<vec4<f32>>;
@group(0) @binding(3) var<uniform> p: P;
var<workgroup> red: array<f32, ${WG}>;
fn reduceMax(lid: u32, v: f32) -> f32 {
  red[lid] = v;
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s = s >> 1u) {
    if (lid < s) { red[lid] = max(red[lid], red[lid + s]); }
    workgroupBarrier();
  }
  let r = red[0];
  workgroupBarrier();
  return r;
}
fn reduceSum(lid: u32, v: f32) -> f32 {
  red[lid] = v;
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s = s >> 1u) {
    if (lid < s) { red[lid] = red[lid] + red[lid + s]; }
    workgroupBarrier();
  }
  let r = red[0];
  workgroupBarrier();
  return r;
}
@compute @workgroup_size(${WG}) fn main(@builtin(workgroup_id) wid: vec3u, @builtin(local_invocation_id) l: vec3u) {
  let row = wid.x + wid.y * p.gx;
  if (row >= p.N) { return; }
  let lid = l.x;
  let base = row * p.ld;
  // one pass: each thread keeps an online (max, sum of exp), then the workgroup merges them; ${CE_LOADS}
  // loads in flight per thread (one at a time, the sweep waited on memory latency at every element)
  var m = -3.402823e38;
  var s = 0.0;
  var j = lid;
  for (; j + ${(CE_LOADS - 1) * WG}u < p.Vc; j += ${CE_LOADS * WG}u) {
${range(CE_LOADS).map((i) => `    let x${i} = logits[base + j + ${i * WG}u];`).join("\n")}
    let mn = max(m, ${maxTree(range(CE_LOADS).map((i) => `x${i}`))});
    s = s * exp(m - mn) + ${range(CE_LOADS).map((i) => `exp(x${i} - mn)`).join(" + ")};
    m = mn;
  }
  for (; j < p.Vc; j += ${WG}u) {
    let x = logits[base + j];
    if (x > m) { s = s * exp(m - x) + 1.0; m = x; } else { s += exp(x - m); }
  }
  let mx = reduceMax(lid, m);
  let sum = reduceSum(lid, s * exp(m - mx));
  if (lid == 0u) {
    var st: vec4<f32>;
    if (p.first != 0u) {
      st = vec4<f32>(mx, sum, 0.0, 0.0);
    } else {
      st = rowState[row];
      let m2 = max(st.x, mx);
      st = vec4<f32>(m2, st.y * exp(st.x - m2) + sum * exp(mx - m2), st.z, 0.0);
    }
    let label = labels[row];
    if (label >= i32(p.v0) && label < i32(p.v0 + p.Vc)) { st.z = logits[base + u32(label) - p.v0]; }
    if (p.fin != 0u) { st.w = st.x + log(st.y); } // the row's last chunk: its logsumexp
    rowState[row] = st;
  }
}`);
}

function lossKernel(): Kernel {
  return defineKernel("ce_loss", {}, ["read", "write", "write", "write", "uniform"], () => `
struct P { N: u32, V: u32, _a: u32, _b: u32 }
@group(0) @binding(0) var<storage, read> labels: array<i32>;
@group(0) @binding(1) var<storage, read_write> rowState: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> loss: array<f32>;
@group(0) @binding(3) var<storage, read_write> stats: array<f32>;
@group(0) @binding(4) var<uniform> p: P;
var<workgroup> red: array<vec2<f32>, ${WG}>;
@compute @workgroup_size(${WG}) fn main(@builtin(local_invocation_id) l: vec3u) {
  let lid = l.x;
  var acc = vec2<f32>(0.0, 0.0);
  for (var n = lid; n < p.N; n += ${WG}u) {
    var st = rowState[n];
    st.w = st.x + log(st.y);
    rowState[n] = st;
    let label = labels[n];
    if (label >= 0 && label < i32(p.V)) { acc += vec2<f32>(st.w - st.z, 1.0); }
  }
  red[lid] = acc;
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s = s >> 1u) {
    if (lid < s) { red[lid] = red[lid] + red[lid + s]; }
    workgroupBarrier();
  }
  if (lid == 0u) {
    let r = red[0];
    loss[0] = select(0.0, r.x / r.y, r.y > 0.0);
    stats[0] = r.y;
  }
}`);
}

function countKernel(): Kernel {
  return defineKernel("ce_count", {}, ["read", "write", "uniform"], () => `
struct P { N: u32, V: u32, _a: u32, _b: u32 }
@group(0) @binding(0) var<storage, read> labels: array<i32>;
@group(0) @binding(1) var<storage, read_write> stats: array<f32>;
@group(0) @binding(2) var<uniform> p: P;
var<workgroup> red: array<f32, ${WG}>;
@compute @workgroup_size(${WG}) fn main(@builtin(local_invocation_id) l: vec3u) {
  let lid = l.x;
  var c = 0.0;
  for (var n = lid; n < p.N; n += ${WG}u) {
    let label = labels[n];
    if (label >= 0 && label < i32(p.V)) { c += 1.0; }
  }
  red[lid] = c;
  workgroupBarrier();
  for (var s = ${WG / 2}u; s > 0u; s = s >> 1u) {
    if (lid < s) { red[lid] = red[lid] + red[lid + s]; }
    workgroupBarrier();
  }
  if (lid == 0u) { stats[0] = red[0]; }
}`);
}

function dlogitsKernel(): Kernel {
  return defineKernel("ce_dlogits", {}, ["read", "read", "read", "write", "uniform"], () => `
struct P { total: u32, Vc: u32, ld: u32, v0: u32, V: u32, stride: u32, _a: u32, _b: u32 }
@group(0) @binding(0) var<storage, read> labels: array<i32>;
@group(0) @binding(1) var<storage, read> rowState: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> stats: array<f32>;
@group(0) @binding(3) var<storage, read_write> logits: array<f32>;
@group(0) @binding(4) var<uniform> p: P;
@compute @workgroup_size(${WG}) fn main(@builtin(global_invocation_id) g: vec3u) {
  let i = g.x + g.y * p.stride;
  if (i >= p.total) { return; }
  let n = i / p.Vc;
  let j = i % p.Vc;
  let idx = n * p.ld + j;
  let label = labels[n];
  if (label < 0 || label >= i32(p.V)) { logits[idx] = 0.0; return; }
  var d = exp(logits[idx] - rowState[n].w);
  if (label == i32(p.v0 + j)) { d -= 1.0; }
  logits[idx] = d / stats[0];
}`);
}

/** The head weight as row ranges covering [0, V). */
function rangesOf(
  weight: HeadWeight,
  what: string,
): { ranges: { rowStart: number; tensor: Tensor }[]; V: number; C: number } {
  const ranges = weight instanceof Tensor ? [{ rowStart: 0, tensor: weight }] : weight;
  if (ranges.length === 0) throw new GpuError(`${what}: no weight ranges`);
  let V = 0;
  const first = ranges[0]!.tensor;
  if (first.shape.length !== 2) {
    throw new GpuError(`${what}: weight ${first.label} must be (V, C), got [${first.shape}]`);
  }
  const C = first.shape[1]!;
  for (const r of ranges) {
    if (r.tensor.shape.length !== 2 || r.tensor.shape[1] !== C || r.rowStart !== V) {
      throw new GpuError(
        `${what}: weight ranges must be (rows, ${C}) tensors covering the vocabulary in order`,
      );
    }
    V += r.tensor.shape[0]!;
  }
  return { ranges, V, C };
}

/** A view of `rows` weight rows starting at local row `r` of a range. */
function rowView(t: Tensor, r: number, rows: number): Tensor {
  return rowsOf(t, r, rows, t.shape[1]!);
}

/**
 * Training path: `rowSweep` (the default) sweeps the rows instead of the vocabulary when dHidden is wanted
 * and at least 128 rows (or all N) of full-vocabulary logits fit the scratch: each block of rows gets its
 * logits once, its softmax statistics, dlogits in place and its dHidden rows, so the logits are computed
 * once instead of twice. `false` keeps the vocabulary sweep for the gradient too. Both are tested.
 */
export const crossEntropyTuning: { rowSweep: boolean } = { rowSweep: true };

/** Row blocks start at multiples of this many rows (256-byte aligned views of every per-row tensor). */
const ROW_ALIGN = 128;

/** Row stride of the row sweep's logits: V rounded up to 4 (aligned vec4 loads of dlogits). */
function sweepStride(V: number): number {
  return Math.ceil(V / 4) * 4;
}

/** Rows per block of the row sweep (all N, or a multiple of 128), or 0 when not even 128 rows fit. */
function rowsPerSweep(scratch: CrossEntropyScratch, N: number, V: number): number {
  const capacity = scratch.logits.size, ld = sweepStride(V);
  if (N * ld <= capacity) return N;
  const rows = Math.floor(capacity / ld / ROW_ALIGN) * ROW_ALIGN;
  return rows >= ROW_ALIGN ? rows : 0;
}

/** A view of rows [n0, n0 + rows) of a row-major (N, width) tensor. */
function rowsOf(t: Tensor, n0: number, rows: number, width: number): Tensor {
  return new Tensor(
    t.buffer,
    width === 1 ? [rows] : [rows, width],
    t.dtype,
    t.offset + n0 * width * DTYPE_BYTES[t.dtype],
    `${t.label}[${n0}:${n0 + rows}]`,
  );
}

/** The row sweep of {@link crossEntropyLmHead} (see {@link crossEntropyTuning}). */
function rowSweep(
  rec: Recorder,
  a: { loss: Tensor; dHidden: Tensor; hidden: Tensor; labels: Tensor; scratch: CrossEntropyScratch },
  ranges: { rowStart: number; tensor: Tensor }[],
  N: number,
  V: number,
  C: number,
  rows: number,
): void {
  const { scratch } = a;
  const ld = sweepStride(V);
  // each weight range in a part of whole 128-row tiles and the rest, so that the big products take the
  // exact (unchecked, vec4) tile kernels: V = 50257 would leave a partial tile in every one
  const parts = ranges.flatMap((r) => {
    const rows = r.tensor.shape[0]!, whole = Math.floor(rows / 128) * 128;
    if (whole === 0 || whole === rows) return [r];
    return [
      { rowStart: r.rowStart, tensor: rowView(r.tensor, 0, whole) },
      { rowStart: r.rowStart + whole, tensor: rowView(r.tensor, whole, rows - whole) },
    ];
  });
  // the count of counted tokens first: dlogits divide by it
  rec.dispatch(countKernel(), [a.labels, scratch.stats], [N, V, 0, 0], [1]);
  for (let n0 = 0; n0 < N; n0 += rows) {
    const nr = Math.min(rows, N - n0);
    const logits = new Tensor(
      scratch.logits.buffer,
      [nr, ld],
      "f32",
      scratch.logits.offset,
      "ce logits rows",
    );
    const hidden = rowsOf(a.hidden, n0, nr, C), dHidden = rowsOf(a.dHidden, n0, nr, C);
    const labels = rowsOf(a.labels, n0, nr, 1), rowState = rowsOf(scratch.rowState, n0, nr, 4);
    for (const r of parts) {
      linearForward(rec, logits, hidden, r.tensor, null, { outColOffset: r.rowStart, ldOut: ld });
    }
    const gx = Math.min(nr, 65535);
    rec.dispatch(onlineKernel(), [logits, labels, rowState], [nr, V, ld, 0, 1, gx, 1, 0], [
      gx,
      Math.ceil(nr / gx),
    ]);
    const { groups, stride } = grid1d(nr * V, WG);
    rec.dispatch(
      dlogitsKernel(),
      [labels, rowState, scratch.stats, logits],
      [nr * V, V, ld, 0, V, stride, 0, 0],
      groups,
    );
    parts.forEach((r, k) => {
      linearBackwardInput(rec, dHidden, logits, r.tensor, {
        accumulate: k > 0,
        dyColOffset: r.rowStart,
        ldDy: ld,
      });
    });
  }
  rec.dispatch(lossKernel(), [a.labels, scratch.rowState, a.loss, scratch.stats], [N, V, 0, 0], [1]);
}

/**
 * Records the mean causal-LM cross-entropy of `hidden · weightᵀ` against `labels`, and optionally its
 * gradient with respect to `hidden`, sweeping the vocabulary in chunks (no (N, V) logits are stored).
 *
 * @param rec The recorder.
 * @param args `loss` (1) f32 out: the mean loss over counted tokens (0 when none count);
 *   `dHidden` (N, C) f32 out, overwritten with d(mean loss)/d(hidden), or null for the loss only;
 *   `hidden` (N, C) f32 or f16, the final normed hidden states; `weight` (V, C) f32 or f16, or its row
 *   ranges; `labels` (N) i32, already shifted by the caller, -100 = ignored; `scratch` from
 *   {@link createCrossEntropyScratch} with at least N rows.
 */
export function crossEntropyLmHead(
  rec: Recorder,
  args: {
    loss: Tensor;
    dHidden: Tensor | null;
    hidden: Tensor;
    weight: HeadWeight;
    labels: Tensor;
    scratch: CrossEntropyScratch;
  },
): void {
  // loss: (1); dHidden, hidden: (N, C); weight: (V, C); labels: (N)
  const { loss, dHidden, hidden, labels, scratch } = args;
  const { ranges, V, C } = rangesOf(args.weight, "crossEntropyLmHead");
  const N = labels.size;
  if (hidden.size !== N * C) {
    throw new GpuError(`crossEntropyLmHead: hidden [${hidden.shape}] is not (N=${N}, C=${C})`);
  }
  activationType(rec.gpu, hidden, "crossEntropyLmHead hidden");
  if (loss.dtype !== "f32" || loss.size < 1) {
    throw new GpuError(
      `crossEntropyLmHead: loss ${loss.label} must be f32 (1), got ${loss.dtype} [${loss.shape}]`,
    );
  }
  if (labels.dtype !== "i32") {
    throw new GpuError(`crossEntropyLmHead: labels must be i32, got ${labels.dtype}`);
  }
  if (N > scratch.N) throw new GpuError(`crossEntropyLmHead: ${N} rows exceed the scratch's ${scratch.N}`);
  if (dHidden && dHidden.size !== N * C) {
    throw new GpuError(`crossEntropyLmHead: dHidden [${dHidden.shape}] is not (N=${N}, C=${C})`);
  }
  if (dHidden && dHidden.dtype !== "f32") {
    throw new GpuError(
      `crossEntropyLmHead: dHidden ${dHidden.label} is a gradient and must be f32, got ${dHidden.dtype}`,
    );
  }
  const sweep = dHidden && crossEntropyTuning.rowSweep ? rowsPerSweep(scratch, N, V) : 0;
  if (sweep > 0) {
    rowSweep(rec, { loss, dHidden: dHidden!, hidden, labels, scratch }, ranges, N, V, C, sweep);
    return;
  }
  const ld = scratch.chunk;
  const logits = new Tensor(scratch.logits.buffer, [N, ld], "f32", scratch.logits.offset, "ce logits chunk");
  const chunks: { v0: number; w: Tensor }[] = [];
  for (const r of ranges) {
    const rows = r.tensor.shape[0]!;
    for (let j = 0; j < rows; j += ld) {
      chunks.push({ v0: r.rowStart + j, w: rowView(r.tensor, j, Math.min(ld, rows - j)) });
    }
  }
  const gx = Math.min(N, 65535);
  const rowGroups = [gx, Math.ceil(N / gx)];
  chunks.forEach(({ v0, w }, k) => {
    const Vc = w.shape[0]!;
    linearForward(rec, logits, hidden, w, null, { outColOffset: 0, ldOut: ld });
    rec.dispatch(onlineKernel(), [logits, labels, scratch.rowState], [
      N,
      Vc,
      ld,
      v0,
      k === 0 ? 1 : 0,
      gx,
      0,
      0,
    ], rowGroups);
  });
  rec.dispatch(lossKernel(), [labels, scratch.rowState, loss, scratch.stats], [N, V, 0, 0], [1]);
  if (!dHidden) return;
  chunks.forEach(({ v0, w }, k) => {
    const Vc = w.shape[0]!;
    linearForward(rec, logits, hidden, w, null, { outColOffset: 0, ldOut: ld });
    const { groups, stride } = grid1d(N * Vc, WG);
    rec.dispatch(
      dlogitsKernel(),
      [labels, scratch.rowState, scratch.stats, logits],
      [N * Vc, Vc, ld, v0, V, stride, 0, 0],
      groups,
    );
    linearBackwardInput(rec, dHidden, logits, w, { accumulate: k > 0, dyColOffset: 0, ldDy: ld });
  });
}

/**
 * Records the full logits `hidden · weightᵀ` (inference: the next-token distribution).
 *
 * @param rec The recorder.
 * @param logits Output (N, V) f32.
 * @param hidden Final normed hidden states (N, C) f32 or f16.
 * @param weight LM head (V, C) f32 or f16, or its row ranges.
 */
export function logitsForward(rec: Recorder, logits: Tensor, hidden: Tensor, weight: HeadWeight): void {
  // logits: (N, V); hidden: (N, C); weight: (V, C)
  const { ranges, V } = rangesOf(weight, "logitsForward");
  activationType(rec.gpu, hidden, "logitsForward hidden");
  if (logits.dtype !== "f32") {
    throw new GpuError(`logitsForward: logits ${logits.label} must be f32, got ${logits.dtype}`);
  }
  for (const r of ranges) {
    linearForward(rec, logits, hidden, r.tensor, null, { outColOffset: r.rowStart, ldOut: V });
  }
}
