/**
 * A llama (and mistral) decoder layer, forward and backward side by side:
 *
 *   x2  = x + SelfAttention(RMSNorm₁(x))            (adapter inside, see self_attention.ts)
 *   out = x2 + Down(silu(Gate(h2)) * Up(h2)),  h2 = RMSNorm₂(x2)
 *
 * Decode (one token per batch row, inference) runs {@link llamaLayerDecode}: the same layer in place on
 * the residual stream with the norms inside the matrix-vector products and gate, up and SwiGLU in one.
 *
 * Backward takes d out in `acts.grad.res` and leaves d x there (d x2 on the way); the weights are
 * frozen, so only activation gradients are formed.
 *
 * @module
 */

import { rmsnormBackward, rmsnormForward } from "../../kernels/norm.ts";
import { swigluForward } from "../../kernels/activation.ts";
import { decodeLinearForward, decodeSwigluForward } from "../../kernels/decode_matvec.ts";
import type { Tensor } from "../gpu/tensor.ts";
import {
  type LayerContext,
  selfAttentionBackward,
  selfAttentionDecode,
  selfAttentionForward,
} from "./self_attention.ts";
import { linear, linearBackward, linearBackwardActivation, linearResidual } from "./ops.ts";
import { mlpGradScratch } from "./activations.ts";

/**
 * Records one llama layer's forward: reads `ctx.la.x`, writes `ctx.out` (when `ctx.out` is null, only what
 * the backward reads: the MLP stops after gate and up).
 *
 * @param ctx The layer context.
 */
export function llamaLayerForward(ctx: LayerContext): void {
  const { rec, acts, la, w } = ctx;
  const eps = ctx.model.config.normEps;
  // (N, C) -> (N, C)
  rmsnormForward(rec, acts.h, la.rstd1, la.x, w.norm1.weight, eps);
  selfAttentionForward(ctx, acts.h);
  rmsnormForward(rec, acts.h, la.rstd2, la.x2, w.norm2.weight, eps);
  // (N, C) -> (N, I) x2 -> (N, C); gate and up in one product against their stacked weights
  if (w.gateUp && la.gu) linear(rec, la.gu, acts.h, w.gateUp.lin, false, true, w.gateUp.groups);
  else {
    linear(rec, la.g, acts.h, w.gate!);
    linear(rec, la.u, acts.h, w.up);
  }
  if (!ctx.out) return;
  swigluForward(rec, acts.a, la.g, la.u);
  linearResidual(rec, ctx.out, acts.a, w.down, la.x2);
}

/**
 * Records one llama layer for a decode step: `x += attention(...)`, `x += mlp(...)` in place on the
 * residual stream `x` (B, C) — seven dispatches (q, k, v, RoPE and cache append, attention with the
 * adapter, o_proj, gate·up·SwiGLU, down; norms folded into the products).
 *
 * @param ctx The layer context (decode).
 * @param x Residual stream (B, C), updated in place.
 */
export function llamaLayerDecode(ctx: LayerContext, x: Tensor): void {
  const { rec, acts, w } = ctx;
  const eps = ctx.model.config.normEps;
  selfAttentionDecode(ctx, x, { kind: "rms", weight: w.norm1.weight, eps });
  // (B, C) -> (B, I) -> (B, C)
  decodeSwigluForward(rec, acts.a, x, w.gate!.w, w.up.w, {
    prologue: { kind: "rms", weight: w.norm2.weight, eps },
    gateBias: w.gate!.b,
    upBias: w.up.b,
  });
  decodeLinearForward(rec, x, acts.a, w.down.w, w.down.b, { accumulate: true });
}

/**
 * Records one llama layer's backward: `acts.grad.res` holds d out on entry and d x on exit (when
 * `needInput`; the lowest adapted layer stops after the adapter's gradients).
 *
 * @param ctx The layer context.
 * @param needInput Whether d x is needed (a lower layer is adapted).
 */
export function llamaLayerBackward(ctx: LayerContext, needInput: boolean): void {
  const { rec, la, w } = ctx;
  const d = ctx.acts.grad;
  // MLP: d out -> d a -> d gate, d up -> d h2 -> (+) d x2
  linearBackwardActivation(
    rec,
    d.res,
    w.down,
    { kind: "swiglu", dg: d.g, du: d.u, g: la.g, u: la.u },
    () => mlpGradScratch(ctx.model.gpu, ctx.acts),
  );
  if (w.gateUp && d.gu) linearBackward(rec, d.h, d.gu, w.gateUp.lin, false, w.gateUp.groups);
  else {
    linearBackward(rec, d.h, d.g, w.gate!);
    linearBackward(rec, d.h, d.u, w.up, true);
  }
  rmsnormBackward(rec, d.res, d.h, la.x2, w.norm2.weight, la.rstd2, { accumulate: true });
  // attention: d x2 -> adapter gradients (and d h1 -> (+) d x)
  selfAttentionBackward(ctx, needInput);
  if (needInput) rmsnormBackward(rec, d.res, d.h, la.x, w.norm1.weight, la.rstd1, { accumulate: true });
}
