/**
 * A probe of the attention passes at the training shapes (B=4, T=S=512, D=64; gpt2-124M, SmolLM2-135M,
 * TinyLlama-1.1B heads), each dispatch timed alone (warm medians from timestamp queries):
 *
 * - every pass (lane forward, dk/dv, dq from the scores and the small ones) causal and not, at T=512 and
 *   256: a causal pass does half the work of the full one, so its time against the full one's shows how
 *   much the uneven causal blocks cost;
 * - the lane forward without and with the adapter folded in (L=10, per-head tanh gate, with the main
 *   output), its rows read and written as vec4s (`attentionTuning.vecRows`, the default) and one element
 *   at a time.
 *
 * Run it on a real GPU: `deno run -A bench/attention_probe.ts [out.txt]` (it prints the lines and writes
 * them to `out.txt` when given).
 *
 * @module
 */

import { seededUniform, warmTiming } from "./_shared.ts";
import {
  attentionBackward,
  attentionForward,
  type AttentionOptions,
  attentionTuning,
} from "../kernels/attention.ts";
import { getGpu } from "../src/gpu/device.ts";
import { Recorder, runOps } from "../src/gpu/recorder.ts";
import { createTensor, type Tensor, tensorFrom } from "../src/gpu/tensor.ts";
import { timeOpsWarm } from "../src/gpu/timing.ts";

const gpu = await getGpu();
const lines: string[] = [];
const say = (line: string) => (console.log(line), lines.push(line));

function rand(n: number, seed: number): Tensor {
  return tensorFrom(gpu, seededUniform(n, seed));
}

const MODELS = [["gpt2-124M", 12, 12], ["SmolLM2-135M", 9, 3], ["TinyLlama-1.1B", 32, 4]] as const;
const B = 4, D = 64, L = 10;

/** The attention of a model's heads at B x T (self-attention, T = S). */
function options(H: number, Hkv: number, T: number, causal: boolean): AttentionOptions {
  const shape = { numHeads: H, numKvHeads: Hkv, headDim: D, batch: B, queryLen: T, keyLen: T };
  return { ...shape, scale: 1 / Math.sqrt(D), causal };
}

/** Warm median ms of one recorded op. */
async function ms(ops: ReturnType<Recorder["take"]>): Promise<number> {
  return (await timeOpsWarm(gpu, ops, warmTiming(true))).ms;
}

for (const [name, H, Hkv] of MODELS) {
  for (const T of [512, 256]) {
    for (const causal of [true, false]) {
      const o = options(H, Hkv, T, causal);
      const q = rand(B * T * H * D, 1), k = rand(B * T * Hkv * D, 2), v = rand(B * T * Hkv * D, 3);
      const out = createTensor(gpu, [B * T * H * D]), lse = createTensor(gpu, [B * H * T]);
      const grads = [B * T * H * D, B * T * Hkv * D, B * T * Hkv * D].map((n) => createTensor(gpu, [n]));
      const rec = new Recorder(gpu);
      attentionForward(rec, out, lse, q, k, v, null, o);
      attentionBackward(
        rec,
        grads[0]!,
        grads[1]!,
        grads[2]!,
        rand(B * T * H * D, 4),
        out,
        lse,
        q,
        k,
        v,
        null,
        o,
      );
      const ops = rec.take();
      runOps(gpu, ops);
      // FLOPs of the forward (two products of the visible scores), the dk/dv pass (four) and dq (one)
      const fwd = 4 * B * H * T * T * D * (causal ? 0.5 : 1);
      const flops: Record<string, number> = {
        attention_fwd_lanes: fwd,
        attention_bwd_dkdv: 2 * fwd,
        attention_bwd_dq_scores: fwd / 2,
      };
      for (const op of ops) {
        const label = op.label.split("|")[0]!;
        const t = await ms([op]);
        const f = flops[label.split(" ")[0]!];
        say(
          `${name} T=${T} causal=${causal} ${label} ${t.toFixed(4)} ms${
            f ? ` ${(f / t / 1e9).toFixed(2)} TFLOP/s` : ""
          }`,
        );
      }
    }
  }
  // the lane forward alone: adapter folded in or not, vec4 rows or not (T = 512, causal)
  const T = 512;
  const o = options(H, Hkv, T, true);
  const q = rand(B * T * H * D, 1), k = rand(B * T * Hkv * D, 2), v = rand(B * T * Hkv * D, 3);
  const out = createTensor(gpu, [B * T * H * D]), aout = createTensor(gpu, [B * T * H * D]);
  const lse = createTensor(gpu, [B * H * T]);
  const adapter = {
    ka: rand(L * Hkv * D, 5),
    va: rand(L * Hkv * D, 6),
    gate: rand(H, 7),
    adapterLen: L,
    gateKind: "per-head-tanh" as const,
    scale: 1 / Math.sqrt(D),
    out: aout,
    withMain: true,
  };
  for (const vecRows of [true, false]) {
    for (const withAdapter of [false, true]) {
      attentionTuning.vecRows = vecRows;
      try {
        const rec = new Recorder(gpu);
        attentionForward(rec, out, lse, q, k, v, null, o, withAdapter ? adapter : undefined);
        const ops = rec.take();
        runOps(gpu, ops);
        say(
          `${name} lane forward vec4 rows=${vecRows} adapter=${withAdapter}: ${
            (await ms(ops)).toFixed(4)
          } ms ` +
            `(${ops.map((x) => x.label.split("|")[0]).join(" ; ")})`,
        );
      } finally {
        attentionTuning.vecRows = true;
      }
    }
  }
}
if (Deno.args[0]) Deno.writeTextFileSync(Deno.args[0], lines.join("\n") + "\n");
