/**
 * Ctrl-C (issue 9), as a real SIGINT to a `deno task train` process: the first one lets the running step
 * finish, saves a checkpoint of it and exits with code 130 (128 + SIGINT, what shells report for Ctrl-C;
 * a run that finishes exits 0); the run resumes from that checkpoint. A second SIGINT soon after the first
 * exits at once (130) — also when it lands in the middle of that save — and the last complete checkpoint
 * still loads and resumes.
 */
import assert from "node:assert/strict";
import { join } from "../../src/_std.ts";
import { deleteAdapter, loadAdapter, loadModel } from "../../mod.ts";
import { findCheckpoint, readCheckpoint } from "../../src/train/checkpoint.ts";
import { runTrain, smallRunArgs, TrainProcess, workspace } from "./_train_process.ts";

const NEVER = 1_000_000;

Deno.test("SIGINT finishes the step, saves a checkpoint of it and exits 130; the run resumes from it", async () => {
  const ws = await workspace();
  const out = join(ws.dir, "run");
  const p = new TrainProcess(smallRunArgs(ws, out, NEVER));
  assert.ok(await p.waitFor((e) => e.e.event === "step" && e.e.step === 3), p.stderr);
  p.kill("SIGINT");
  const status = await p.status();
  assert.equal(status.code, 130, p.stderr);
  const lastStep = Math.max(...p.events.filter((e) => e.e.event === "step").map((e) => e.e.step as number));
  const done = p.events.find((e) => e.e.event === "interrupted");
  assert.ok(done, "an interrupted event");
  assert.equal(done.e.steps, lastStep);
  const { state } = await readCheckpoint((await findCheckpoint(out))!);
  assert.equal(state.step, lastStep, "the checkpoint holds the last finished step");
  const model = await loadModel(ws.model);
  await loadAdapter(model, join(out, "checkpoint"));
  const r = await runTrain([...smallRunArgs(ws, out, lastStep + 2), "--resume"]);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(r.events.filter((e) => e.e.event === "step").map((e) => e.e.step), [
    lastStep + 1,
    lastStep + 2,
  ]);
});

Deno.test("a second SIGINT right after the first exits at once, even mid-save; the last checkpoint loads", async () => {
  const ws = await workspace();
  const out = join(ws.dir, "run");
  const model = await loadModel(ws.model);
  let before = -1;
  let atOnce = 0, afterHandler = 0, midSave = 0;
  // Five rounds, the second signal 0-150 ms after the first: before, during and after the final save.
  for (let round = 0; round < 5; round++) {
    const args = smallRunArgs(ws, out, NEVER);
    const p = new TrainProcess(round === 0 ? args : [...args, "--resume"]);
    assert.ok(await p.waitFor((e) => e.e.event === "step" && (e.e.step as number) >= before + 2), p.stderr);
    p.kill("SIGINT");
    const gap = round * 37;
    await new Promise((r) => setTimeout(r, gap));
    const second = performance.now();
    p.kill("SIGINT");
    const status = await p.status();
    const exitMs = performance.now() - second;
    assert.equal(status.code, 130, p.stderr);
    assert.ok(exitMs < 2000, `exited ${exitMs.toFixed(0)} ms after the second SIGINT`);
    // Three endings: the handler exits at once (its message), the signal comes after training removed its
    // handler (the default action ends the process: code 130 with signal SIGINT; the checkpoint is
    // complete by then), or the first signal's exit came first.
    if (status.signal === "SIGINT") afterHandler++;
    else if (!p.events.some((e) => e.e.event === "interrupted")) {
      assert.match(p.stderr, /second Ctrl-C: exiting now/);
      atOnce++;
    }
    for await (const e of Deno.readDir(out)) if (e.name.startsWith(".checkpoint.tmp-")) midSave++;
    const dir = await findCheckpoint(out);
    assert.ok(dir);
    const { state } = await readCheckpoint(dir);
    assert.ok(state.step >= before, `checkpoint went back from ${before} to ${state.step}`);
    before = state.step;
    await loadAdapter(model, dir, { name: "ckpt" });
    deleteAdapter(model, "ckpt");
  }
  const r = await runTrain([...smallRunArgs(ws, out, before + 1), "--resume"]);
  assert.equal(r.code, 0, r.stderr);
  console.log(
    `double SIGINT: 5 rounds, ${atOnce} exited by the handler at the second signal (${midSave} mid-save), ` +
      `${afterHandler} by the signal's default action after training`,
  );
});
