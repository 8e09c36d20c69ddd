/**
 * Embedding lookups: token embeddings (`out[n, :] = table[ids[n], :]`) and gpt2's learned position
 * embeddings added into the hidden state. Tables may be f16 (converted to f32 on read), and so may the
 * output, an activation (rounded once, at the store: an f16 table into an f16 output is an exact copy).
 * A table larger than one binding is used in row ranges (`splitRows`), one call per range, each writing
 * only the ids it owns. The embeddings are frozen base weights, so there is no backward here.
 *
 * @module
 */

import {
  type ActivationType,
  activationType,
  defineKernel,
  enableF16,
  type Kernel,
} from "../src/gpu/kernel.ts";
import type { Recorder } from "../src/gpu/recorder.ts";
import type { Tensor } from "../src/gpu/tensor.ts";
import { GpuError } from "../src/errors.ts";
import { grid1d } from "./fill.ts";

const WG = 256;

/**
 * One thread per output element: rows whose id falls in `[rowStart, rowStart + rows)` read the table;
 * with `full` (the table is the whole vocabulary) the others are written 0 (unless accumulating).
 * `tt` is the table's element type, `ot` the output's.
 */
function gatherKernel(tt: ActivationType, ot: ActivationType, accumulate: boolean, full: boolean): Kernel {
  return defineKernel(
    "embedding_gather",
    { tt, ot, accumulate, full },
    ["write", "read", "read", "uniform"],
    () => {
      const store = accumulate ? `out[i] = ${ot}(f32(out[i]) + v);` : `out[i] = ${ot}(v);`;
      return `${enableF16(tt, ot)}
struct P { n: u32, C: u32, stride: u32, rowStart: u32, rows: u32, _a: u32, _b: u32, _c: u32 }
@group(0) @binding(0) var<storage, read_write> out: array<${ot}>;
@group(0) @binding(1) var<storage, read> ids: array<i32>;
@group(0) @binding(2) var<storage, read> table: array<${tt}>;
@group(0) @binding(3) var<uniform> p: P;
@compute @workgroup_size(${WG}) fn main(@builtin(global_invocation_id) g: vec3u) {
  let i = g.x + g.y * p.stride;
  if (i >= p.n) { return; }
  let row = i / p.C;
  let c = i - row * p.C;
  // ids are i32: a negative id becomes a huge u32 and fails the range test like one past the end
  let local = u32(ids[row]) - p.rowStart;
  if (local < p.rows) {
    let v = f32(table[local * p.C + c]);
    ${store}
  }${full && !accumulate ? ` else {\n    out[i] = ${ot}(0.0);\n  }` : ""}
}`;
    },
  );
}

function checkTable(rec: Recorder, t: Tensor, what: string): [number, number] {
  if (t.shape.length !== 2) throw new GpuError(`${what}: ${t.label} must be 2-D, got [${t.shape}]`);
  if (t.dtype !== "f32" && t.dtype !== "f16") throw new GpuError(`${what}: ${t.label} must be f32 or f16`);
  if (t.dtype === "f16" && !rec.gpu.hasF16) {
    throw new GpuError(`${what}: ${t.label} is f16 but this GPU lacks shader-f16; load the weights as f32`);
  }
  return t.shape as [number, number];
}

/** Checks ids (N) i32 against out (N, C) and returns N and the output's element type. */
function checkRows(
  rec: Recorder,
  out: Tensor,
  idx: Tensor,
  C: number,
  what: string,
): [number, ActivationType] {
  if (idx.dtype !== "i32") throw new GpuError(`${what}: ${idx.label} must be i32, got ${idx.dtype}`);
  const ot = activationType(rec.gpu, out, `${what} out`);
  if (out.size !== idx.size * C) {
    throw new GpuError(`${what}: ${out.label} [${out.shape}] should be (${idx.size}, ${C})`);
  }
  return [idx.size, ot];
}

/**
 * Records a token-embedding lookup: `out[n, :] (+)= table[ids[n] - rowStart, :]` for every n whose id
 * falls in this table's rows `[rowStart, rowStart + V)`.
 *
 * Without `rowStart` the table is the whole vocabulary, and ids outside it (negative or ≥ V) get zeros
 * (nothing is added with `accumulate`); nothing is ever read out of bounds. With `rowStart` (a row range
 * from `splitRows`) each call writes only its own ids: call once per range so that every id is covered.
 * Ids outside every range are left unwritten — validate ids on the host.
 *
 * @param rec The recorder.
 * @param out Output, (N, C) f32 or f16 (any leading shape with N rows).
 * @param ids Token ids, (N) i32.
 * @param table Embedding rows, (V, C) f32 or f16 — all of the table or one row range of it.
 * @param opts `rowStart`: the first vocabulary row of `table` (marks it as a range); `accumulate`: add into `out`.
 */
export function embeddingForward(
  rec: Recorder,
  out: Tensor,
  ids: Tensor,
  table: Tensor,
  opts: { rowStart?: number; accumulate?: boolean } = {},
): void {
  // ids: (N), table: (V, C), out: (N, C)
  const [V, C] = checkTable(rec, table, "embeddingForward");
  const [N, ot] = checkRows(rec, out, ids, C, "embeddingForward");
  const full = opts.rowStart === undefined;
  const kernel = gatherKernel(table.dtype === "f16" ? "f16" : "f32", ot, opts.accumulate ?? false, full);
  const n = N * C;
  if (n === 0) return;
  const { groups, stride } = grid1d(n, WG);
  rec.dispatch(kernel, [out, ids, table], [n, C, stride, opts.rowStart ?? 0, V, 0, 0, 0], groups);
}

/**
 * Records gpt2's learned position embedding: `out[n, :] += wpe[positions[n], :]`. Positions outside
 * `[0, P)` add nothing (and read nothing).
 *
 * @param rec The recorder.
 * @param out Hidden state, (N, C) f32 or f16, added into.
 * @param wpe Position embeddings, (P, C) f32 or f16.
 * @param positions Position of each row, (N) i32.
 */
export function positionEmbeddingForward(rec: Recorder, out: Tensor, wpe: Tensor, positions: Tensor): void {
  // positions: (N), wpe: (P, C), out: (N, C)
  const [P, C] = checkTable(rec, wpe, "positionEmbeddingForward");
  const [N, ot] = checkRows(rec, out, positions, C, "positionEmbeddingForward");
  const n = N * C;
  if (n === 0) return;
  const { groups, stride } = grid1d(n, WG);
  rec.dispatch(gatherKernel(wpe.dtype === "f16" ? "f16" : "f32", ot, true, false), [out, positions, wpe], [
    n,
    C,
    stride,
    0,
    P,
    0,
    0,
    0,
  ], groups);
}
