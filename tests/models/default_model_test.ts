/**
 * The embedded default model (default/model) against the reference its pretraining script recorded
 * with transformers on the GPU: the last-position logits of a prompt, the tokenizer's ids, and greedy
 * samples. The reference ran in float32 on an H100 (cuBLAS), so logits agree to float32 rounding of a
 * different summation order: stated tolerance 1e-4 relative.
 */
import assert from "node:assert/strict";
import { forward, generate, loadModel, loadTokenizer } from "../../mod.ts";
import { assertClose } from "../_util.ts";

const FOLDER = new URL("../../default/model", import.meta.url).pathname;

Deno.test("default model: last logits match transformers' reference and greedy samples match", async () => {
  const log = JSON.parse(await Deno.readTextFile(`${FOLDER}/train_log.json`));
  const ref = log.reference;
  const model = await loadModel(FOLDER);
  const { logits, shape } = await forward(model, { inputIds: [ref.input_ids] });
  const V = shape[2];
  const last = logits.slice((shape[1] - 1) * V, shape[1] * V);
  assertClose(last.slice(0, 8), ref.last_logits_first8, 1e-4, "last_logits_first8");
  const top = [...last.keys()].sort((a, b) => last[b]! - last[a]!).slice(0, 5);
  assert.deepEqual(top, ref.last_logits_top5.map((e: { id: number }) => e.id));
  for (const s of log.samples.slice(0, 2)) {
    const got = await generate(model, s.prompt_ids, { maxNewTokens: s.output_ids.length });
    assert.deepEqual(got, s.output_ids, `greedy sample for ${JSON.stringify(s.prompt)}`);
  }
});

Deno.test("default tokenizer encodes the sample prompts as HF tokenizers did", async () => {
  const log = JSON.parse(await Deno.readTextFile(`${FOLDER}/train_log.json`));
  const tok = await loadTokenizer(FOLDER);
  for (const s of log.samples) assert.deepEqual(tok.encode(s.prompt), s.prompt_ids, s.prompt);
});
