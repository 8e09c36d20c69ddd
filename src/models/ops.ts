/**
 * Model-level wrappers over the kernels: a `Linear` applied across the bindable row ranges of its
 * weight, a layer's product together with the elementwise op after it (the residual add; the SwiGLU or
 * GELU backward), and the attention options a layer passes to the attention kernels.
 *
 * @module
 */

import type { Recorder } from "../gpu/recorder.ts";
import type { Tensor } from "../gpu/tensor.ts";
import { type ColumnGroups, linearBackwardInput, linearForward } from "../../kernels/matmul.ts";
import { GpuError } from "../errors.ts";
import { addBiasRows, addInto, geluBackward, swigluBackward } from "../../kernels/activation.ts";
import type { Linear } from "./weights.ts";
import type { ModelConfig } from "../io/hf_config.ts";

/**
 * `out (+)= x Wᵀ + b` over every row range of `W`.
 *
 * @param rec The recorder.
 * @param out Output (M, out).
 * @param x Input (M, in).
 * @param lin The linear layer.
 * @param accumulate Add into `out` instead of overwriting it.
 * @param withBias Whether to add the bias (default true).
 * @param outGroups `out`'s columns as consecutive blocks (a stacked q/k/v product; one row range only).
 */
export function linear(
  rec: Recorder,
  out: Tensor,
  x: Tensor,
  lin: Linear,
  accumulate = false,
  withBias = true,
  outGroups?: ColumnGroups,
): void {
  const N = lin.w.shape[0]!;
  const bias = withBias ? lin.b : null;
  if (lin.ranges.length === 1) {
    linearForward(rec, out, x, lin.w, bias, outGroups ? { accumulate, outGroups } : { accumulate });
    return;
  }
  if (outGroups) throw new GpuError(`linear: ${lin.w.label} in row ranges cannot write column groups`);
  for (const { rowStart, tensor } of lin.ranges) {
    linearForward(rec, out, x, tensor, null, { accumulate, outColOffset: rowStart, ldOut: N });
  }
  if (bias) addBiasRows(rec, out, bias);
}

/**
 * `dx (+)= dy W` over every row range of `W` (gradient to a linear layer's input; weights are frozen).
 *
 * @param rec The recorder.
 * @param dx Input gradient (M, in).
 * @param dy Output gradient (M, out).
 * @param lin The linear layer.
 * @param accumulate Add into `dx` instead of overwriting it.
 * @param dyGroups `dy`'s columns as consecutive blocks (a stacked q/k/v product; one row range only).
 */
export function linearBackward(
  rec: Recorder,
  dx: Tensor,
  dy: Tensor,
  lin: Linear,
  accumulate = false,
  dyGroups?: ColumnGroups,
): void {
  const N = lin.w.shape[0]!;
  if (lin.ranges.length === 1) {
    linearBackwardInput(rec, dx, dy, lin.w, dyGroups ? { accumulate, dyGroups } : { accumulate });
    return;
  }
  if (dyGroups) throw new GpuError(`linearBackward: ${lin.w.label} in row ranges cannot read column groups`);
  lin.ranges.forEach(({ rowStart, tensor }, i) => {
    linearBackwardInput(rec, dx, dy, tensor, {
      accumulate: accumulate || i > 0,
      dyColOffset: rowStart,
      ldDy: N,
    });
  });
}

/**
 * `fuse` (default true): a layer's residual add, SwiGLU backward and GELU backward run in the epilogue of
 * the product before them (`MatmulEpilogue` in kernels/matmul.ts: one dispatch and one pass over memory
 * fewer each); false records the product, then the elementwise kernel (for A/B runs and tests).
 */
export const epilogueTuning: { fuse: boolean } = { fuse: true };

/** Whether `lin`'s product can take an epilogue: one weight range (row ranges sum or slice the output). */
function fusable(lin: Linear): boolean {
  return epilogueTuning.fuse && lin.ranges.length === 1;
}

/**
 * `out = x Wᵀ + b + residual`: a layer's product and its residual add (one dispatch where it fuses, see
 * {@link epilogueTuning}).
 *
 * @param rec The recorder.
 * @param out Output (M, out), not `residual`.
 * @param x Input (M, in).
 * @param lin The linear layer.
 * @param residual The residual stream (M, out), f32 or f16.
 */
export function linearResidual(rec: Recorder, out: Tensor, x: Tensor, lin: Linear, residual: Tensor): void {
  if (fusable(lin)) {
    linearForward(rec, out, x, lin.w, lin.b, { epilogue: { kind: "residual", x: residual } });
    return;
  }
  linear(rec, out, x, lin);
  addInto(rec, out, residual);
}

/** The activation whose backward follows a product's input gradient (see {@link linearBackwardActivation}). */
export type ActivationBackward =
  /** SwiGLU: `dg` and `du` from the saved gate and up. */
  | { kind: "swiglu"; dg: Tensor; du: Tensor; g: Tensor; u: Tensor }
  /** gpt2's GELU: `dh` from the saved pre-activation h. */
  | { kind: "gelu"; dh: Tensor; h: Tensor };

/**
 * The gradient through an MLP's output product and its activation: `d a = dy W`, then the SwiGLU or GELU
 * backward of `d a` (one dispatch where it fuses, see {@link epilogueTuning}; else `d a` goes through
 * a scratch buffer).
 *
 * @param rec The recorder.
 * @param dy Output gradient (M, out).
 * @param lin The MLP's output (down) projection.
 * @param act The activation's backward and its tensors, all (M, in).
 * @param scratch Gives an (M, in) f32 buffer for `d a`, called only when the two do not fuse.
 */
export function linearBackwardActivation(
  rec: Recorder,
  dy: Tensor,
  lin: Linear,
  act: ActivationBackward,
  scratch: () => Tensor,
): void {
  const out = act.kind === "swiglu" ? act.dg : act.dh;
  if (fusable(lin)) {
    const epilogue = act.kind === "swiglu"
      ? { kind: "swigluBackward" as const, g: act.g, u: act.u, du: act.du }
      : { kind: "geluBackward" as const, h: act.h };
    linearBackwardInput(rec, out, dy, lin.w, { epilogue });
    return;
  }
  const da = scratch();
  linearBackward(rec, da, dy, lin);
  if (act.kind === "swiglu") swigluBackward(rec, act.dg, act.du, da, act.g, act.u);
  else geluBackward(rec, act.dh, da, act.h);
}

/**
 * Softmax scale of a family's attention scores.
 *
 * @param config The model config.
 * @returns `1/sqrt(D)`, or 1 for gpt2 with `scale_attn_weights` false.
 */
export function attentionScale(config: ModelConfig): number {
  if (config.family === "gpt2" && config.scaleAttnWeights === false) return 1;
  return 1 / Math.sqrt(config.headDim);
}
