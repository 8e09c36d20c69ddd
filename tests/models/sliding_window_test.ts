/**
 * Mistral's sliding window against transformers: a model whose window (4) is shorter than the
 * sequence (12) gives HF's logits (≤ 1e-5 relative), which differ from the logits without a window —
 * so the window is really applied. Reference made by scripts/gen_extra_golden.py.
 */
import assert from "node:assert/strict";
import { join } from "../../src/_std.ts";
import { openSafetensors } from "../../src/io/safetensors.ts";
import { forward, loadModel } from "../../mod.ts";
import { assertClose, relError } from "../_util.ts";

const CASE = new URL("../fixtures/extra/mistral_window/", import.meta.url).pathname;

Deno.test("mistral with sliding_window 4 < T 12 matches transformers", async () => {
  const g = await openSafetensors(join(CASE, "golden.safetensors"));
  const ids = new Int32Array((await g.readRaw("input_ids")).slice().buffer);
  const want = await g.readTensor("logits", "f32");
  const noWindow = await g.readTensor("no_window_logits", "f32");
  g.close();
  const [B, T] = [2, 12];
  const model = await loadModel(join(CASE, "model"));
  assert.equal(model.config.slidingWindow, 4);
  const inputIds = Array.from({ length: B }, (_, b) => Array.from(ids.slice(b * T, (b + 1) * T)));
  const { logits } = await forward(model, { inputIds });
  assertClose(logits, want, 1e-5, "windowed logits");
  assert.ok(relError(logits, noWindow) > 1e-3, "the window must change the logits");
});
