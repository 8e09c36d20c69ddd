/**
 * A gpt2 block, forward and backward side by side:
 *
 *   x2  = x + SelfAttention(LayerNorm₁(x))        (adapter added after c_proj, as PEFT does)
 *   out = x2 + Proj(gelu_new(Fc(h2))),  h2 = LayerNorm₂(x2)
 *
 * Decode (one token per batch row, inference) runs {@link gpt2LayerDecode}: in place on the residual
 * stream, the LayerNorms inside the matrix-vector products, gelu_new in the c_fc product's epilogue.
 *
 * @module
 */

import { layernormBackward, layernormForward } from "../../kernels/norm.ts";
import { geluForward } from "../../kernels/activation.ts";
import { decodeLinearForward } from "../../kernels/decode_matvec.ts";
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
 * Records one gpt2 block's forward: reads `ctx.la.x`, writes `ctx.out` (when `ctx.out` is null, only what
 * the backward reads: the MLP stops after c_fc).
 *
 * @param ctx The layer context.
 */
export function gpt2LayerForward(ctx: LayerContext): void {
  const { rec, acts, la, w } = ctx;
  const eps = ctx.model.config.normEps;
  layernormForward(rec, acts.h, la.mean1, la.rstd1, la.x, w.norm1.weight, w.norm1.bias!, eps);
  selfAttentionForward(ctx, acts.h);
  layernormForward(rec, acts.h, la.mean2, la.rstd2, la.x2, w.norm2.weight, w.norm2.bias!, eps);
  linear(rec, la.u, acts.h, w.up); // (N, 4C) before gelu
  if (!ctx.out) return;
  geluForward(rec, acts.a, la.u);
  linearResidual(rec, ctx.out, acts.a, w.down, la.x2);
}

/**
 * Records one gpt2 block for a decode step, in place on the residual stream `x` (B, C): seven
 * dispatches (q, k, v, cache append, attention adding the adapter into `x`, c_proj, c_fc with gelu,
 * mlp c_proj; LayerNorms folded into the products).
 *
 * @param ctx The layer context (decode).
 * @param x Residual stream (B, C), updated in place.
 */
export function gpt2LayerDecode(ctx: LayerContext, x: Tensor): void {
  const { rec, la, w } = ctx;
  const eps = ctx.model.config.normEps;
  selfAttentionDecode(ctx, x, { kind: "layer", weight: w.norm1.weight, bias: w.norm1.bias!, eps });
  // (B, C) -> (B, 4C) -> (B, C)
  decodeLinearForward(rec, la.u, x, w.up.w, w.up.b, {
    prologue: { kind: "layer", weight: w.norm2.weight, bias: w.norm2.bias!, eps },
    epilogue: "gelu_new",
  });
  decodeLinearForward(rec, x, la.u, w.down.w, w.down.b, { accumulate: true });
}

/**
 * Records one gpt2 block's backward (see {@link gpt2LayerForward}); `acts.grad.res` holds d out on
 * entry and d x on exit when `needInput`.
 *
 * @param ctx The layer context.
 * @param needInput Whether d x is needed.
 */
export function gpt2LayerBackward(ctx: LayerContext, needInput: boolean): void {
  const { rec, la, w } = ctx;
  const d = ctx.acts.grad;
  linearBackwardActivation(
    rec,
    d.res,
    w.down,
    { kind: "gelu", dh: d.u, h: la.u },
    () => mlpGradScratch(ctx.model.gpu, ctx.acts),
  );
  linearBackward(rec, d.h, d.u, w.up);
  layernormBackward(rec, d.res, d.h, la.x2, w.norm2.weight, la.mean2, la.rstd2, { accumulate: true });
  selfAttentionBackward(ctx, needInput);
  if (needInput) {
    layernormBackward(rec, d.res, d.h, la.x, w.norm1.weight, la.mean1, la.rstd1, { accumulate: true });
  }
}
