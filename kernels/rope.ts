/**
 * Rotary position embeddings in HF's `rotate_half` convention (LLaMA, Mistral, SmolLM): within each head
 * of size D, element i pairs with element i + D/2 and the pair is rotated by θ = position · invFreq[i].
 * One thread rotates one pair. The angle is the f32 product `f32(position) * invFreq[i]` and cos/sin are
 * taken in f32, as HF does (`inv_freq` and the position ids in float32, then `.cos()`, `.sin()`).
 * The backward is the transpose (the rotation by -θ). In-place variants bind the tensor once as
 * read-write, because WebGPU forbids binding one buffer both read-only and writable in a dispatch; they
 * also rotate a second tensor that follows the first in its buffer (the keys after the queries of a stacked
 * q/k/v buffer) in the same dispatch, its threads after the first's.
 * The forward's queries/keys may be stored in f16 (each pair loaded into f32, rotated, rounded once);
 * the backward acts on gradients, which are f32.
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
import { Tensor } from "../src/gpu/tensor.ts";
import { GpuError } from "../src/errors.ts";
import { grid1d } from "./fill.ts";

const WG = 256;

/** `xt`/`ot`: element types of x and out (in place: both x's). */
function ropeKernel(inverse: boolean, inPlace: boolean, xt: ActivationType, ot: ActivationType): Kernel {
  const bindings = inPlace
    ? (["write", "read", "read", "uniform"] as const)
    : (["read", "read", "read", "write", "uniform"] as const);
  return defineKernel("rope", { inverse, inPlace, xt, ot }, bindings, () => `
${enableF16(xt, ot)}
// split: threads of the first block; H2 and off2: heads and element offset of the second (in-place only)
struct P { total: u32, H: u32, half: u32, stride: u32, split: u32, H2: u32, off2: u32, _p: u32 }
@group(0) @binding(0) var<storage, ${inPlace ? "read_write" : "read"}> x: array<${xt}>;
@group(0) @binding(1) var<storage, read> invFreq: array<f32>;
@group(0) @binding(2) var<storage, read> positions: array<i32>;
${inPlace ? "" : `@group(0) @binding(3) var<storage, read_write> out: array<${ot}>;`}
@group(0) @binding(${inPlace ? 3 : 4}) var<uniform> p: P;
@compute @workgroup_size(${WG}) fn main(@builtin(global_invocation_id) g: vec3u) {
  let t0 = g.x + g.y * p.stride;
  if (t0 >= p.total) { return; }
  let second = t0 >= p.split;
  let t = select(t0, t0 - p.split, second);
  let i = t % p.half;
  let nh = t / p.half;          // row * H + head
  let n = nh / select(p.H, p.H2, second);
  let base = nh * 2u * p.half + select(0u, p.off2, second);
  let angle = f32(positions[n]) * invFreq[i];
  let c = cos(angle);
  let s = ${inverse ? "-" : ""}sin(angle);
  let x1 = f32(x[base + i]);
  let x2 = f32(x[base + i + p.half]);
  ${inPlace ? "x" : "out"}[base + i] = ${ot}(x1 * c - x2 * s);
  ${inPlace ? "x" : "out"}[base + i + p.half] = ${ot}(x2 * c + x1 * s);
}`);
}

function sizes(x: Tensor, invFreq: Tensor, positions: Tensor, numHeads: number, what: string): number {
  const N = positions.size;
  const D = 2 * invFreq.size;
  if (x.size !== N * numHeads * D) {
    throw new GpuError(
      `${what}: ${x.label} [${x.shape}] is not (N=${N}, H=${numHeads} * D=${D}) for ${positions.size} positions`,
    );
  }
  if (positions.dtype !== "i32") throw new GpuError(`${what}: positions must be i32, got ${positions.dtype}`);
  return N * numHeads * invFreq.size;
}

/** A second tensor rotated in place by the same dispatch: it must follow the first in its buffer. */
export interface RopeSecond {
  /** The tensor (N, H2*D), e.g. the keys right after the queries of a stacked q/k/v buffer. */
  x: Tensor;
  /** Its heads per row. */
  numHeads: number;
}

function record(
  rec: Recorder,
  inverse: boolean,
  out: Tensor | null,
  first: Tensor,
  invFreq: Tensor,
  positions: Tensor,
  numHeads: number,
  what: string,
  second?: RopeSecond,
): void {
  const total1 = sizes(first, invFreq, positions, numHeads, what);
  if (out && out.size !== first.size) {
    throw new GpuError(`${what}: output [${out.shape}] differs from input [${first.shape}]`);
  }
  let x = first, total = total1;
  if (second) {
    const follows = second.x.buffer === first.buffer && second.x.dtype === first.dtype &&
      second.x.offset === first.offset + first.byteLength;
    if (out || !follows) {
      throw new GpuError(
        `${what}: ${second.x.label} must follow ${first.label} in its buffer (in place only)`,
      );
    }
    total += sizes(second.x, invFreq, positions, second.numHeads, what);
    x = new Tensor(first.buffer, [first.size + second.x.size], first.dtype, first.offset, first.label);
  }
  // activations (forward) may be f16; gradients (backward) are f32
  const type = (t: Tensor, arg: string): ActivationType => {
    if (!inverse) return activationType(rec.gpu, t, `${what} ${arg}`);
    if (t.dtype !== "f32") throw new GpuError(`${what}: gradient ${t.label} must be f32, got ${t.dtype}`);
    return "f32";
  };
  const xt = type(x, "x");
  const { groups, stride } = grid1d(total, WG);
  const params = [total, numHeads, invFreq.size, stride, total1, second?.numHeads ?? 1, first.size, 0];
  if (out) {
    rec.dispatch(
      ropeKernel(inverse, false, xt, type(out, "out")),
      [x, invFreq, positions, out],
      params,
      groups,
    );
  } else rec.dispatch(ropeKernel(inverse, true, xt, xt), [x, invFreq, positions], params, groups);
}

/**
 * Records RoPE forward: per head, `out_i = x_i cos θ - x_{i+D/2} sin θ`,
 * `out_{i+D/2} = x_{i+D/2} cos θ + x_i sin θ`, with `θ = f32(position) * invFreq[i]`.
 *
 * @param rec The recorder.
 * @param out Rotated output (N, H*D) f32 or f16 (a different buffer from x; see {@link ropeInPlace}).
 * @param x Queries or keys (N, H*D) f32 or f16 (independently of `out`).
 * @param invFreq Inverse frequencies (D/2) f32, as HF computes them in f32.
 * @param positions Position of each row (N) i32.
 * @param numHeads H, the heads per row.
 */
export function ropeForward(
  rec: Recorder,
  out: Tensor,
  x: Tensor,
  invFreq: Tensor,
  positions: Tensor,
  numHeads: number,
): void {
  // x, out: (N, H*D); invFreq: (D/2); positions: (N)
  record(rec, false, out, x, invFreq, positions, numHeads, "ropeForward");
}

/**
 * Records RoPE forward in place (`x` is bound once, read-write).
 *
 * @param rec The recorder.
 * @param x Queries or keys (N, H*D) f32 or f16, rotated in place (f16: rounded once after the rotation).
 * @param invFreq Inverse frequencies (D/2) f32.
 * @param positions Position of each row (N) i32.
 * @param numHeads H, the heads per row.
 * @param second Also rotates this tensor, which must follow `x` in its buffer (the keys after the queries
 *   of a stacked q/k/v buffer), in the same dispatch.
 */
export function ropeInPlace(
  rec: Recorder,
  x: Tensor,
  invFreq: Tensor,
  positions: Tensor,
  numHeads: number,
  second?: RopeSecond,
): void {
  // x: (N, H*D); invFreq: (D/2); positions: (N)
  record(rec, false, null, x, invFreq, positions, numHeads, "ropeInPlace", second);
}

/**
 * Records RoPE backward: the transpose rotation (by -θ) of the output gradient.
 *
 * @param rec The recorder.
 * @param dx Gradient of the input (N, H*D) f32, overwritten.
 * @param dout Gradient of the output (N, H*D) f32.
 * @param invFreq Inverse frequencies (D/2) f32.
 * @param positions Position of each row (N) i32.
 * @param numHeads H, the heads per row.
 */
export function ropeBackward(
  rec: Recorder,
  dx: Tensor,
  dout: Tensor,
  invFreq: Tensor,
  positions: Tensor,
  numHeads: number,
): void {
  // dx, dout: (N, H*D); invFreq: (D/2); positions: (N)
  record(rec, true, dx, dout, invFreq, positions, numHeads, "ropeBackward");
}

/**
 * Records RoPE backward in place: turns the output gradient into the input gradient.
 *
 * @param rec The recorder.
 * @param d Gradient (N, H*D) f32: the output's on entry, the input's after.
 * @param invFreq Inverse frequencies (D/2) f32.
 * @param positions Position of each row (N) i32.
 * @param numHeads H, the heads per row.
 * @param second Also this gradient, which must follow `d` in its buffer, in the same dispatch.
 */
export function ropeBackwardInPlace(
  rec: Recorder,
  d: Tensor,
  invFreq: Tensor,
  positions: Tensor,
  numHeads: number,
  second?: RopeSecond,
): void {
  // d: (N, H*D); invFreq: (D/2); positions: (N)
  record(rec, true, null, d, invFreq, positions, numHeads, "ropeBackwardInPlace", second);
}
