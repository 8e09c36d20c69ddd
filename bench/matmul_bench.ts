/**
 * Matmul benchmarks: GPU time (timestamp queries, many repetitions in one pass) of the products of
 * kernels/matmul.ts at 1024³, 4096³ and the linear layers of gpt2-124M, SmolLM2-135M and TinyLlama-1.1B
 * at N = B*T = 2048 rows (forward and input gradient), with f32 and f16 weights, plus the decode
 * matrix-vector products (M = 1), reported as GB/s of weight streamed. Forward products also run with
 * f16 activations (x and out f16, f16 weights: column `act`). Big shapes run only with
 * `PROMPTGATE_BENCH_FULL=1` (the default on a real GPU); on a fallback adapter small shapes stand in.
 *
 * Each figure is the median of 3 timed submissions of ≥ 20 ms of GPU work each, after ≥ 100 ms of
 * warm-up on the same product: short timed windows after an idle gap measured the GPU still at its idle
 * clock (on the H200, 4096³ read 29 TFLOP/s in one case and 7.9 in the next, while wall time disagreed).
 * `PROMPTGATE_BENCH_TUNE=1` first times every tile / split-K / K step (8 beside the default) / matrix-vector
 * variant at the model shapes (`=matvec`: the matrix-vector variants only; `=prefill`: the products of a
 * 128-token prefill, M = 128, with f32 and with f16 weights and activations; `=small`: the planner's choice
 * against every tile at the mid-size training products, M = 2048, each case twice; `=few`: products of 10 and
 * 16 rows, µs, the matrix-vector kernels against the tiles planned before they took more than 4 rows;
 * `=head`: the LM-head products of the loss's row sweep, logits and dHidden over K = V, each case twice (its
 * first run read far below the training profiles, bench/RESULTS.md); `=wide`: the planner's choice against
 * the 128x128 tiles of 256 threads and of 128 (16x8 outputs each) at the training products and the LM heads;
 * `=splits`: the planner's choice against the tiles of 8x8 outputs per thread with K split in 1 to 8 at the
 * mid-size training products;
 * `PROMPTGATE_TUNE_CASES`, a regular expression matched against "case op", keeps only the sweep cases it
 * matches)
 * (the data behind the heuristic in kernels/matmul.ts).
 *
 * `PROMPTGATE_MATMUL_F16_PACKED` compares the tiled kernel's loads of f16 operands in one run: `both` times
 * every row with an f16 operand (M > 4) twice, with vec4<f16> loads and with packed loads (8 halves per
 * 16-byte load, `matmulTuning.f16Packed`), column `f16 loads`; `all` adds packed loads at K step 8 beside
 * the default 16; `0` / `1` forces one. `PROMPTGATE_MATMUL_CASES` (a regular expression matched against
 * "case op", e.g. `^(?!.*decode)`) keeps only the cases it matches.
 *
 * Run: `deno bench --allow-read --allow-write --allow-env bench/matmul_bench.ts` (`deno run` skips the
 * Deno.bench wall-time entries at the end)
 *
 * @module
 */

import { benchFull, warmTiming } from "./_shared.ts";
import { adapterReport, getGpu } from "../src/gpu/device.ts";
import { Recorder, runOps } from "../src/gpu/recorder.ts";
import { createTensor, type DType, splitRows, type Tensor, writeTensor } from "../src/gpu/tensor.ts";
import { type timeOps, timeOpsWarm } from "../src/gpu/timing.ts";
import type * as Matmul from "../kernels/matmul.ts";

// PROMPTGATE_MATMUL_MODULE benches another copy of the module (e.g. the previous version, for a
// before/after table from one run on one card).
const modulePath = Deno.env.get("PROMPTGATE_MATMUL_MODULE");
const mm: typeof Matmul = modulePath
  ? await import(new URL(modulePath, `file://${Deno.cwd()}/`).href)
  : await import("../kernels/matmul.ts");
const { conv1dBackwardInput, conv1dForward, linearBackwardInput, linearForward } = mm;

const gpu = await getGpu();
const full = benchFull(gpu);

/** Which product: HF Linear forward / input gradient, or gpt2 Conv1D forward / input gradient. */
type Op = "linear" | "linear_dx" | "conv1d" | "conv1d_dx";

interface Case {
  name: string;
  op: Op;
  M: number;
  /** Output features of the layer (weight rows for Linear). */
  N: number;
  /** Input features of the layer. */
  K: number;
}

const ROWS = 2048; // B=4, T=512
const cases: Case[] = [];
const add = (name: string, op: Op, M: number, N: number, K: number) => cases.push({ name, op, M, N, K });

if (full) {
  add("square 1024", "linear", 1024, 1024, 1024);
  add("square 4096", "linear", 4096, 4096, 4096);
  // gpt2-124M (Conv1D weights [in, out]): C 768, I 3072, V 50257 (tied LM head as Linear)
  for (
    const [name, n, k] of [["gpt2 c_attn", 2304, 768], ["gpt2 c_proj", 768, 768], ["gpt2 c_fc", 3072, 768], [
      "gpt2 mlp c_proj",
      768,
      3072,
    ]] as const
  ) {
    add(name, "conv1d", ROWS, n, k);
    add(name, "conv1d_dx", ROWS, n, k);
    add(`${name} decode`, "conv1d", 1, n, k);
  }
  add("gpt2 lm_head", "linear", ROWS, 50257, 768);
  add("gpt2 lm_head decode", "linear", 1, 50257, 768);
  // SmolLM2-135M: C 576, I 1536, Hkv*D 192, V 49152; TinyLlama-1.1B: C 2048, I 5632, Hkv*D 256, V 32000
  for (
    const [model, C, I, KV, V] of [["smollm2", 576, 1536, 192, 49152], [
      "tinyllama",
      2048,
      5632,
      256,
      32000,
    ]] as const
  ) {
    for (
      const [name, n, k] of [["q_proj", C, C], ["k_proj", KV, C], ["gate_proj", I, C], [
        "down_proj",
        C,
        I,
      ]] as const
    ) {
      add(`${model} ${name}`, "linear", ROWS, n, k);
      add(`${model} ${name}`, "linear_dx", ROWS, n, k);
      add(`${model} ${name} decode`, "linear", 1, n, k);
    }
    add(`${model} lm_head`, "linear", ROWS, V, C);
    add(`${model} lm_head decode`, "linear", 1, V, C);
  }
} else {
  add("square 64", "linear", 64, 64, 64);
  add("square 128", "linear", 128, 128, 128);
  add("odd 130x96x72", "linear", 130, 96, 72);
  add("odd 130x96x72", "linear_dx", 130, 96, 72);
  add("odd 130x96x72", "conv1d", 130, 96, 72);
  add("odd 130x96x72", "conv1d_dx", 130, 96, 72);
  add("decode 512x256", "linear", 1, 512, 256);
  add("decode 512x256", "conv1d", 1, 512, 256);
}

function randomTensor(shape: number[], dtype: DType): Tensor {
  const t = createTensor(gpu, shape, dtype, "bench");
  const n = shape.reduce((a, b) => a * b, 1);
  if (dtype === "f16") {
    const h = new Uint16Array(n);
    for (let i = 0; i < n; i++) h[i] = 0x2c00 + ((i * 7919) % 0x0fff); // small positive/normal halves
    writeTensor(gpu, t, h);
  } else {
    const f = new Float32Array(n);
    for (let i = 0; i < n; i++) f[i] = ((i * 7919) % 1000) / 1000 - 0.5;
    writeTensor(gpu, t, f);
  }
  return t;
}

/** Records one case (`act`: dtype of a forward product's x and out); returns its tensors to be freed. */
function record(rec: Recorder, c: Case, dtype: DType, act: DType = "f32"): Tensor[] {
  const { M, N, K } = c;
  const linearW = c.op.startsWith("linear");
  const w = randomTensor(linearW ? [N, K] : [K, N], dtype);
  const forward = c.op === "linear" || c.op === "conv1d";
  const input = randomTensor([M, forward ? K : N], forward ? act : "f32");
  const out = createTensor(gpu, [M, forward ? N : K], forward ? act : "f32", "bench out");
  const bias = forward ? randomTensor([N], "f32") : null;
  if (c.op === "linear") {
    // an LM head may exceed one binding: each row range writes its column slice of the logits
    for (const { rowStart, tensor } of splitRows(gpu, w)) {
      const b = bias && tensor !== w ? null : bias;
      linearForward(rec, out, input, tensor, b, { outColOffset: rowStart, ldOut: N });
    }
  } else if (c.op === "linear_dx") linearBackwardInput(rec, out, input, w);
  else if (c.op === "conv1d") conv1dForward(rec, out, input, w, bias);
  else conv1dBackwardInput(rec, out, input, w);
  return bias ? [w, input, out, bias] : [w, input, out];
}

const caseFilter = Deno.env.get("PROMPTGATE_MATMUL_CASES");
if (caseFilter) {
  const re = new RegExp(caseFilter);
  cases.splice(0, cases.length, ...cases.filter((c) => re.test(`${c.name} ${c.op}`)));
}

const dtypes: DType[] = gpu.hasF16 ? ["f32", "f16"] : ["f32"];

/** A way of loading f16 operands in the tiled kernel (`matmulTuning.f16Packed` / `f16PackedK`). */
interface F16Loads {
  label: string;
  packed: boolean | null;
  k: 8 | 16 | null;
}
const VEC4_F16: F16Loads = { label: "vec4<f16>", packed: false, k: null };
const PACKED: F16Loads = { label: "packed", packed: true, k: null };
const packedMode = Deno.env.get("PROMPTGATE_MATMUL_F16_PACKED");
// an older module (PROMPTGATE_MATMUL_MODULE) without the switch has only its own loads
const f16Loads: F16Loads[] = !("f16Packed" in mm.matmulTuning) || packedMode === undefined
  ? [{ label: "", packed: null, k: null }]
  : packedMode === "both"
  ? [VEC4_F16, PACKED]
  : packedMode === "all"
  ? [VEC4_F16, { label: "packed K16", packed: true, k: 16 }, { label: "packed K8", packed: true, k: 8 }]
  : [packedMode === "1" ? PACKED : VEC4_F16];

/** Sets the f16 loads of the tiled kernel (a no-op on a module without the switch). */
function setF16Loads(l: F16Loads): void {
  if (!("f16Packed" in mm.matmulTuning)) return;
  mm.matmulTuning.f16Packed = l.packed;
  mm.matmulTuning.f16PackedK = l.k;
}

/** Median ms of `ops` after a warm-up (see `timeOpsWarm`). */
function measure(ops: Parameters<typeof timeOps>[1]): Promise<{ ms: number; timestamps: boolean }> {
  return timeOpsWarm(gpu, ops, { ...warmTiming(full), maxRepeats: 2000 });
}

const tuneMode = Deno.env.get("PROMPTGATE_BENCH_TUNE");
const tune = ["1", "matvec", "prefill", "small", "few", "head", "wide", "splits"].includes(tuneMode ?? "") &&
  "matmulTuning" in mm &&
  "splitK" in mm.matmulTuning;
if (tune) {
  // every variant at the model shapes: tiles (double-buffered), one single-buffered, split-K; matvec threads
  type Variant = {
    label: string;
    /** null: the planner's choice */
    force: Matmul.MatmulKernelChoice | null;
    /** `matmulTuning.matvecMaxM` (4: the planner of before the matrix-vector kernels took 16 rows) */
    mvMax?: number;
    splitK?: number;
    db?: boolean;
    threads?: 32 | 64 | 128 | 256;
    packed?: boolean;
    k?: 8;
  };
  const tiles8: Matmul.MatmulTile[] = ["128x64-8x8", "64x128-8x8", "64x64-8x8"];
  const tiles: Matmul.MatmulTile[] = ["128x128", "128x64", "64x128", "64x64", "32x32", ...tiles8];
  const big: Variant[] = [
    ...tiles.map((t) => ({ label: t, force: t })),
    { label: "128x128 1buf", force: "128x128", db: false },
    { label: "64x64 1buf", force: "64x64", db: false },
    ...tiles.map((t) => ({ label: `${t} K8`, force: t, k: 8 as const })),
    { label: "128x128 K8 1buf", force: "128x128", db: false, k: 8 },
  ];
  const skinny: Variant[] = [
    ...big,
    ...[2, 4, 8].flatMap((s) =>
      (["128x128", "64x64"] as const).flatMap((t) => [
        { label: `${t} splitK${s}`, force: t, splitK: s },
        { label: `${t} splitK${s} K8`, force: t, splitK: s, k: 8 as const },
      ])
    ),
  ];
  const mv: Variant[] = ([32, 64, 128] as const).flatMap((t) => [
    { label: `matvec t${t}`, force: "matvec" as const, threads: t },
    { label: `matvec t${t} vec4<f16>`, force: "matvec" as const, threads: t, packed: false },
  ]);
  const prefill: Variant[] = [
    ...skinny,
    ...[2, 4, 8, 16].map((s) => ({ label: `32x32 splitK${s}`, force: "32x32" as const, splitK: s })),
    { label: "64x64 splitK16", force: "64x64", splitK: 16 },
  ];
  // `small`: the planner's choice against every tile at the M = 2048 products that fill less than three
  // waves of 128x128 tiles, each case twice (the spread between the two rows is the noise)
  const mid: Variant[] = [
    { label: "planned", force: null },
    ...tiles.map((t) => ({ label: t, force: t })),
    ...tiles8.map((t) => ({ label: `${t} K8`, force: t, k: 8 as const })),
    ...([2, 3] as const).flatMap((s) => [
      { label: `64x64-8x8 splitK${s}`, force: "64x64-8x8" as const, splitK: s },
      { label: `64x128-8x8 splitK${s} K8`, force: "64x128-8x8" as const, splitK: s, k: 8 as const },
    ]),
  ];
  const smallCases: [Case, Variant[], DType[]][] = [
    ["gpt2 c_attn", 2304, 768],
    ["gpt2 q/k/v/c_proj", 768, 768],
    ["gpt2 c_fc", 3072, 768],
    ["gpt2 mlp c_proj", 768, 3072],
    ["smollm2 q/o", 576, 576],
    ["smollm2 k/v", 192, 576],
    ["smollm2 gate/up", 1536, 576],
    ["smollm2 down", 576, 1536],
    ["tinyllama k/v", 256, 2048],
    ["smollm2 q/k/v stacked", 960, 576],
    ["tinyllama q/k/v stacked", 2560, 2048],
    ["smollm2 gate|up stacked", 3072, 576],
    ["tinyllama gate|up stacked", 11264, 2048],
  ].flatMap(([name, N, K]) =>
    (["linear", "linear_dx"] as const).flatMap((op) => {
      const c: [Case, Variant[], DType[]] = [
        { name: name as string, op, M: 2048, N: N as number, K: K as number },
        mid,
        ["f32"],
      ];
      return [c, c];
    })
  );
  // `few`: products of 10 and 16 rows (an adaption prompt's keys and values, stacked k|v, and the prompt's
  // gradient; a 16-token prefill), the matrix-vector kernels against the tiles planned before (µs)
  const few: Variant[] = [
    { label: "planned", force: null },
    { label: "tiled (M > 4 before)", force: null, mvMax: 4 },
    ...([32, 64, 128] as const).map((t) => ({ label: `matvec t${t}`, force: "matvec" as const, threads: t })),
  ];
  const fewCases: [Case, Variant[], DType[]][] = [
    ["gpt2 adapter k|v", 1536, 768, 10],
    ["smollm2 adapter k|v", 384, 576, 10],
    ["tinyllama adapter k|v", 512, 2048, 10],
    ["tinyllama q_proj 16 rows", 2048, 2048, 16],
    ["tinyllama gate_proj 16 rows", 5632, 2048, 16],
    ["smollm2 gate_proj 16 rows", 1536, 576, 16],
  ].flatMap(([name, N, K, M]) =>
    (["linear", "linear_dx"] as const).map((op): [Case, Variant[], DType[]] => [
      { name: name as string, op, M: M as number, N: N as number, K: K as number },
      few,
      ["f32"],
    ])
  );
  // `head`: the LM-head products of the training loss's row sweep (kernels/cross_entropy.ts: 256 rows of
  // the whole vocabulary at a time for gpt2 and SmolLM2, 512 for TinyLlama), the logits and dHidden over
  // K = V, the planner's choice against other tiles and K splits
  const headLogits: Variant[] = [
    { label: "planned", force: null },
    ...(["128x128", "64x128-8x8", "128x64-8x8", "64x64-8x8"] as const).map((t) => ({ label: t, force: t })),
  ];
  const headDx: Variant[] = [
    { label: "planned", force: null },
    ...([8, 16, 32] as const).flatMap((sp) =>
      (["64x64", "64x64-8x8", "128x64-8x8", "64x128-8x8", "128x128"] as const).map((t) => ({
        label: `${t} splitK${sp}`,
        force: t,
        splitK: sp,
      }))
    ),
  ];
  const headCases: [Case, Variant[], DType[]][] = [
    ["gpt2", 256, 50257, 768],
    ["smollm2", 256, 49152, 576],
    ["tinyllama", 512, 32000, 2048],
  ].flatMap(([name, M, V, C]) =>
    (["linear", "linear_dx"] as const).flatMap((op) => {
      // each case twice, as in `small`: its first run of this sweep read far below the training profiles
      const c: [Case, Variant[], DType[]] = [
        { name: `${name} lm_head rows`, op, M: M as number, N: V as number, K: C as number },
        op === "linear" ? headLogits : headDx,
        ["f32"],
      ];
      return [c, c];
    })
  );
  // `wide`: the planner's choice against the 128x128 tiles of 256 threads (8x8 outputs each) and of 128
  // (16x8 each; its K step 16 spills) at the training products (M = 2048) and the LM head. The first sweep
  // (bench/RESULTS.md, 2026-11-28) also timed 8x16 outputs per thread over 128x128, 64x128 and 128x256 tiles
  // and 16x8 over 128x64: none beat these anywhere by more than 1-5%.
  const wide: Variant[] = [
    { label: "planned", force: null },
    { label: "128x128", force: "128x128" },
    { label: "128x128 K8", force: "128x128", k: 8 },
    { label: "128x128-16x8", force: "128x128-16x8" },
    { label: "128x128-16x8 splitK2", force: "128x128-16x8", splitK: 2 },
  ];
  const wideCases: [Case, Variant[], DType[]][] = [
    ...[
      ["gpt2 c_attn", 2304, 768],
      ["gpt2 q/k/v/c_proj", 768, 768],
      ["gpt2 c_fc", 3072, 768],
      ["gpt2 mlp c_proj", 768, 3072],
      ["smollm2 q/o", 576, 576],
      ["smollm2 down", 576, 1536],
      ["smollm2 q/k/v stacked", 960, 576],
      ["smollm2 gate|up stacked", 3072, 576],
      ["tinyllama q/o", 2048, 2048],
      ["tinyllama down", 2048, 5632],
      ["tinyllama q/k/v stacked", 2560, 2048],
      ["tinyllama gate|up stacked", 11264, 2048],
    ].flatMap(([name, N, K]) =>
      (["linear", "linear_dx"] as const).map((op): [Case, Variant[], DType[]] => [
        { name: name as string, op, M: 2048, N: N as number, K: K as number },
        wide,
        ["f32"],
      ])
    ),
    [{ name: "smollm2 lm_head", op: "linear", M: 2048, N: 49152, K: 576 }, wide, ["f32"]],
    [{ name: "tinyllama lm_head", op: "linear", M: 2048, N: 32000, K: 2048 }, wide, ["f32"]],
    [{ name: "square 4096", op: "linear", M: 4096, N: 4096, K: 4096 }, wide, ["f32"]],
  ];
  // `splits`: the planner's choice against the tiles of 8x8 outputs per thread with K split in 1-8, at the
  // mid-size training products (M = 2048), each case twice: more, smaller workgroups per SM against the
  // reduction's extra pass
  const splitVariants: Variant[] = [
    { label: "planned", force: null },
    ...(["64x64-8x8", "128x64-8x8", "64x128-8x8"] as const).flatMap((t) =>
      [1, 2, 3, 4, 6, 8].map((sp) => ({ label: `${t} splitK${sp}`, force: t, splitK: sp }))
    ),
  ];
  const splitCases: [Case, Variant[], DType[]][] = smallCases
    .filter(([c]) => !/tinyllama (q\/k\/v|gate\|up)/.test(c.name))
    .map(([c]) => [c, splitVariants, ["f32"]]);
  const P = 128; // prompt tokens
  const prefillCases: [Case, Variant[], DType[]][] = [
    ["tinyllama q_proj", "linear", 2048, 2048],
    ["tinyllama k_proj", "linear", 256, 2048],
    ["tinyllama gate_proj", "linear", 5632, 2048],
    ["tinyllama down_proj", "linear", 2048, 5632],
    ["smollm2 q_proj", "linear", 576, 576],
    ["smollm2 k_proj", "linear", 192, 576],
    ["smollm2 gate_proj", "linear", 1536, 576],
    ["smollm2 down_proj", "linear", 576, 1536],
    ["gpt2 c_attn", "conv1d", 2304, 768],
    ["gpt2 attn c_proj", "conv1d", 768, 768],
    ["gpt2 c_fc", "conv1d", 3072, 768],
    ["gpt2 mlp c_proj", "conv1d", 768, 3072],
  ].map(([name, op, N, K]) => [
    { name: `${name} prefill`, op: op as Op, M: P, N: N as number, K: K as number },
    prefill,
    ["f32", "f16"],
  ]);
  const tuneCases: [Case, Variant[], DType[]][] = tuneMode === "wide"
    ? wideCases
    : tuneMode === "splits"
    ? splitCases
    : tuneMode === "prefill"
    ? prefillCases
    : tuneMode === "head"
    ? headCases
    : tuneMode === "few"
    ? fewCases
    : tuneMode === "small"
    ? smallCases
    : full
    ? [
      [{ name: "square 4096", op: "linear", M: 4096, N: 4096, K: 4096 }, big, ["f32", "f16"]],
      [{ name: "tinyllama q_proj", op: "linear", M: 2048, N: 2048, K: 2048 }, big, ["f32"]],
      [{ name: "tinyllama q_proj", op: "linear_dx", M: 2048, N: 2048, K: 2048 }, big, ["f32"]],
      [{ name: "tinyllama gate_proj", op: "linear", M: 2048, N: 5632, K: 2048 }, big, ["f32", "f16"]],
      [{ name: "tinyllama gate_proj", op: "linear_dx", M: 2048, N: 5632, K: 2048 }, big, ["f32"]],
      [{ name: "tinyllama down_proj", op: "linear", M: 2048, N: 2048, K: 5632 }, skinny, ["f32"]],
      [{ name: "tinyllama k_proj", op: "linear", M: 2048, N: 256, K: 2048 }, skinny, ["f32"]],
      [{ name: "smollm2 gate_proj", op: "linear", M: 2048, N: 1536, K: 576 }, big, ["f32"]],
      [{ name: "smollm2 gate_proj", op: "linear_dx", M: 2048, N: 1536, K: 576 }, big, ["f32"]],
      [{ name: "smollm2 q_proj", op: "linear", M: 2048, N: 576, K: 576 }, big, ["f32"]],
      [{ name: "gpt2 c_attn", op: "conv1d", M: 2048, N: 2304, K: 768 }, big, ["f32"]],
      [{ name: "gpt2 mlp c_proj", op: "conv1d", M: 2048, N: 768, K: 3072 }, skinny, ["f32"]],
      [{ name: "tinyllama gate_proj decode", op: "linear", M: 1, N: 5632, K: 2048 }, mv, ["f32", "f16"]],
      [{ name: "tinyllama down_proj decode", op: "linear", M: 1, N: 2048, K: 5632 }, mv, ["f32", "f16"]],
      [{ name: "tinyllama lm_head decode", op: "linear", M: 1, N: 32000, K: 2048 }, mv, ["f32", "f16"]],
      [{ name: "tinyllama q_proj decode", op: "linear", M: 1, N: 2048, K: 2048 }, mv, ["f32", "f16"]],
    ]
    : [
      [{ name: "odd 130x96x72", op: "linear", M: 130, N: 96, K: 72 }, skinny, ["f32"]],
      [{ name: "decode 512x256", op: "linear", M: 1, N: 512, K: 256 }, mv, ["f32"]],
    ];
  const tuneRows: Record<string, string | number>[] = [];
  const tuneFilter = new RegExp(Deno.env.get("PROMPTGATE_TUNE_CASES") ?? "");
  const picked = tuneCases.filter(([c]) =>
    (tuneMode !== "matvec" || c.M <= 4) && tuneFilter.test(`${c.name} ${c.op}`)
  );
  for (const [c, variants, dts] of picked) {
    for (const dtype of dts.filter((d) => dtypes.includes(d))) {
      const row: Record<string, string | number> = {
        case: c.name,
        op: c.op,
        "M x N x K": `${c.M}x${c.N}x${c.K}`,
        w: dtype,
      };
      for (const v of variants) {
        mm.matmulTuning.force = v.force;
        mm.matmulTuning.splitK = v.splitK ?? null;
        mm.matmulTuning.doubleBuffer = v.db ?? null;
        mm.matmulTuning.matvecThreads = v.threads ?? null;
        mm.matmulTuning.matvecPacked = v.packed ?? null;
        if ("kStep" in mm.matmulTuning) mm.matmulTuning.kStep = v.k ?? null;
        if ("matvecMaxM" in mm.matmulTuning) mm.matmulTuning.matvecMaxM = v.mvMax ?? 16;
        try {
          const rec = new Recorder(gpu);
          // prefill: an f16 model's products take f16 activations too
          const tensors = record(rec, c, dtype, tuneMode === "prefill" ? dtype : "f32");
          const { ms } = await measure(rec.take());
          row[v.label] = tuneMode === "few"
            ? Number((ms * 1000).toPrecision(3)) // µs
            : c.M <= 4
            ? Number((c.N * c.K * (dtype === "f16" ? 2 : 4) / ms / 1e6).toPrecision(4)) // GB/s of weight
            : Math.round(2 * c.M * c.N * c.K / ms / 1e6); // GFLOP/s
          for (const t of tensors) t.buffer.destroy();
        } finally {
          mm.matmulTuning.force = null;
          mm.matmulTuning.splitK = null;
          mm.matmulTuning.doubleBuffer = null;
          mm.matmulTuning.matvecThreads = null;
          mm.matmulTuning.matvecPacked = null;
          if ("kStep" in mm.matmulTuning) mm.matmulTuning.kStep = null;
          if ("matvecMaxM" in mm.matmulTuning) mm.matmulTuning.matvecMaxM = 16;
        }
      }
      tuneRows.push(row);
      console.log(JSON.stringify(row));
    }
  }
  console.log(
    `variants (${tuneMode === "few" ? "µs per product" : "GFLOP/s, or GB/s of weight for M = 1"}):`,
  );
  console.table(tuneRows);
  // these sweeps stand alone
  if (["prefill", "small", "few", "head", "wide", "splits"].includes(tuneMode!)) cases.length = 0;
}

const rows: Record<string, string | number>[] = [];
for (const c of cases) {
  // (weight, activations): f32 and f16 weights with f32 activations; an f16 model's forward products
  const forward = c.op === "linear" || c.op === "conv1d";
  const configs = dtypes.map((d) => [d, "f32"] as [DType, DType]);
  if (gpu.hasF16 && forward) configs.push(["f16", "f16"]);
  for (const [dtype, act] of configs) {
    // the f16 loads only matter to the tiled kernel (M > 4) with an f16 operand
    const loads = c.M > 4 && (dtype === "f16" || act === "f16") ? f16Loads : [f16Loads[0]!];
    for (const l of loads) {
      setF16Loads(l);
      try {
        const rec = new Recorder(gpu);
        const tensors = record(rec, c, dtype, act);
        const ops = rec.take();
        const flops = 2 * c.M * c.N * c.K;
        const { ms, timestamps } = await measure(ops);
        const weightBytes = c.N * c.K * (dtype === "f16" ? 2 : 4);
        rows.push({
          case: c.name,
          op: c.op,
          "M x N x K": `${c.M}x${c.N}x${c.K}`,
          w: dtype,
          act,
          ...(packedMode === undefined ? {} : { "f16 loads": loads.length > 1 ? l.label : "" }),
          "GPU ms": Number(ms.toFixed(4)),
          "GFLOP/s": Math.round(flops / ms / 1e6),
          "weight GB/s": c.M <= 4 ? Number((weightBytes / ms / 1e6).toPrecision(4)) : "",
          clock: timestamps ? "timestamps" : "wall",
        });
        for (const t of tensors) t.buffer.destroy();
      } finally {
        setF16Loads({ label: "", packed: null, k: null });
      }
    }
  }
}
console.log(
  `matmul (${modulePath ?? "kernels/matmul.ts"}) on ${adapterReport(gpu).description} (${
    full ? "full" : "small"
  } shapes)`,
);
console.table(rows);
const jsonOut = Deno.env.get("PROMPTGATE_BENCH_JSON");
if (jsonOut) Deno.writeTextFileSync(jsonOut, JSON.stringify(rows));

// Deno.bench entries: wall time of submitting a few recorded products and waiting for them.
const benchCases = full
  ? [
    cases.find((c) => c.name === "square 4096"),
    cases.find((c) => c.name === "tinyllama down_proj decode"),
  ]
  : [cases[1], cases.find((c) => c.M === 1)];
for (const c of benchCases.filter((c) => c !== undefined)) {
  for (const dtype of dtypes) {
    const rec = new Recorder(gpu);
    record(rec, c, dtype);
    const ops = rec.take();
    Deno.bench(`${c.name} ${c.op} ${c.M}x${c.N}x${c.K} w=${dtype}`, async () => {
      runOps(gpu, ops);
      await gpu.device.queue.onSubmittedWorkDone();
    });
  }
}
