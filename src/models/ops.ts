/**
 * Model-level wrappers over the kernels: a `Linear` applied across the bindable row ranges of its
 * weight, and the attention options a layer passes to the attention kernels.
 *
 * @module
 */

import type { Recorder } from "../gpu/recorder.ts";
import type { Tensor } from "../gpu/tensor.ts";
import { type ColumnGroups, linearBackwardInput, linearForward } from "../../kernels/matmul.ts";
import { GpuError } from "../errors.ts";
import { addBiasRows } from "../../kernels/activation.ts";
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
 * Softmax scale of a family's attention scores.
 *
 * @param config The model config.
 * @returns `1/sqrt(D)`, or 1 for gpt2 with `scale_attn_weights` false.
 */
export function attentionScale(config: ModelConfig): number {
  if (config.family === "gpt2" && config.scaleAttnWeights === false) return 1;
  return 1 / Math.sqrt(config.headDim);
}
