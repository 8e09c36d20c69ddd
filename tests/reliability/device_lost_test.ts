/**
 * A lost device mid-run (issue 9): `_device_lost_child.ts` destroys the process-wide WebGPU device right
 * after step 3 of a run that checkpoints every step (in its own process: a destroyed device breaks every
 * later GPU use of the process). The run must end with a GpuError that says the device was lost, where
 * the last good checkpoint is, how to continue and what to change (batch size, sequence length, f16);
 * that checkpoint (step 2: step 3's save is the one that meets the dead device) loads and resumes.
 */
import assert from "node:assert/strict";
import { join } from "../../src/_std.ts";
import { loadAdapter, loadModel } from "../../mod.ts";
import { findCheckpoint, readCheckpoint } from "../../src/train/checkpoint.ts";
import { ROOT, runTrain, smallRunArgs, workspace } from "./_train_process.ts";

Deno.test("destroying the device mid-run gives a GpuError with a hint and keeps the last checkpoint", async () => {
  const ws = await workspace();
  const out = join(ws.dir, "run");
  const child = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "tests/reliability/_device_lost_child.ts", ws.model, ws.data, out, "3"],
    cwd: ROOT,
    stdin: "null",
  }).output();
  const stderr = new TextDecoder().decode(child.stderr);
  assert.equal(child.code, 0, stderr);
  const lines = new TextDecoder().decode(child.stdout).trim().split("\n");
  const result = JSON.parse(lines.at(-1)!) as { name: string; message: string; isGpuError: boolean };
  assert.equal(result.name, "GpuError", result.message);
  assert.ok(result.isGpuError);
  assert.match(result.message, /device was lost/);
  assert.match(result.message, /The last good checkpoint \(step 2\) is in .*checkpoint/);
  assert.match(
    result.message,
    /--batch-size or --seq-len, pass --gradient-checkpointing, or (use )?--dtype f16/,
  );
  assert.match(result.message, /continue with --resume --out /);

  const dir = await findCheckpoint(out);
  assert.equal(dir, join(out, "checkpoint"));
  const { state } = await readCheckpoint(dir!);
  assert.equal(state.step, 2);
  const model = await loadModel(ws.model);
  await loadAdapter(model, dir!);
  await loadAdapter(model, out, { name: "run" });
  // The child's configuration equals smallRunArgs but for --max-steps, which a resume may change.
  const r = await runTrain([...smallRunArgs(ws, out, 4), "--resume"]);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(r.events.filter((e) => e.e.event === "step").map((e) => e.e.step), [3, 4]);
});
