import assert from "node:assert/strict";
import { join } from "../../src/_std.ts";
import { cleanStaleCheckpoints, findCheckpoint, readCheckpoint } from "../../src/train/checkpoint.ts";
import { MetricsLog } from "../../src/train/metrics.ts";

Deno.test("a crash between the two renames of a save leaves .checkpoint.old, which is found", async () => {
  const out = await Deno.makeTempDir();
  assert.equal(await findCheckpoint(out), null);
  await Deno.mkdir(join(out, ".checkpoint.old"));
  await Deno.writeTextFile(join(out, ".checkpoint.old", "trainer_state.json"), "{}");
  await Deno.mkdir(join(out, ".checkpoint.tmp-1234"));
  assert.equal(await findCheckpoint(out), join(out, ".checkpoint.old"));
  // an incomplete new checkpoint (no trainer_state.json yet) is not picked
  await Deno.mkdir(join(out, "checkpoint"));
  assert.equal(await findCheckpoint(out), join(out, ".checkpoint.old"));
  await cleanStaleCheckpoints(out);
  assert.rejects(Deno.stat(join(out, ".checkpoint.tmp-1234")));
});

Deno.test("a damaged checkpoint is refused with a message", async () => {
  const dir = await Deno.makeTempDir();
  await Deno.writeTextFile(join(dir, "trainer_state.json"), '{"step": "x"}');
  await assert.rejects(readCheckpoint(dir), /checkpoint is damaged/);
});

Deno.test("metrics.jsonl: appended lines, a torn last line and later steps are dropped on resume", async () => {
  const path = join(await Deno.makeTempDir(), "metrics.jsonl");
  const log = new MetricsLog(path);
  for (let s = 1; s <= 4; s++) await log.append({ step: s, loss: 1 / s, lr: 0.1, tokens_per_s: 10 });
  await Deno.writeTextFile(path, '{"step":5,"lo', { append: true });
  const back = await MetricsLog.resume(path, 3);
  assert.deepEqual(back.entries.map((e) => e.step), [1, 2, 3]);
  await back.write();
  assert.equal((await Deno.readTextFile(path)).trim().split("\n").length, 3);
});
