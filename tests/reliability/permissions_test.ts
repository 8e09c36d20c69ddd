/**
 * Least privilege (issue 9). `deno task train` / `deno task generate` grant read, write, the environment
 * variables promptgate reads (HF's and the cache folders': a name read but not granted makes Deno prompt
 * in a terminal) and the hub's hosts — nothing else (no run, ffi, sys, or all). Read and write stay
 * unrestricted in the tasks because the model, data and `--out` folders are command-line values that a
 * task line cannot know; a library user or a careful person narrows them per run, and the last test shows
 * that a local run needs nothing but read and write of its `--out` folder.
 */
import assert from "node:assert/strict";
import { join } from "../../src/_std.ts";
import { ROOT, runTrain, smallRunArgs, taskCommand, workspace } from "./_train_process.ts";

/** Every environment variable name src/ reads (`env("X")` of hub.ts or `Deno.env.get("X")`). */
async function envNamesRead(): Promise<Set<string>> {
  const names = new Set<string>();
  const walk = async (dir: string): Promise<void> => {
    for await (const e of Deno.readDir(dir)) {
      const p = join(dir, e.name);
      if (e.isDirectory) await walk(p);
      else if (e.name.endsWith(".ts")) {
        const text = await Deno.readTextFile(p);
        for (const m of text.matchAll(/\b(?:env|Deno\.env\.get)\("([A-Z0-9_]+)"\)/g)) names.add(m[1]!);
      }
    }
  };
  await walk(join(ROOT, "src"));
  return names;
}

for (const task of ["train", "generate"] as const) {
  Deno.test(`deno task ${task} grants read, write, the env vars src/ reads and the hub's hosts only`, async () => {
    const { flags, script } = taskCommand(task);
    assert.equal(script, `src/cli/${task}.ts`);
    const byName = new Map(flags.map((f) => [f.split("=")[0]!, f.split("=")[1] ?? null]));
    assert.deepEqual([...byName.keys()].sort(), [
      "--allow-env",
      "--allow-net",
      "--allow-read",
      "--allow-write",
    ]);
    const net = byName.get("--allow-net")!;
    assert.ok(net, "--allow-net lists hosts");
    for (const host of net.split(",")) assert.match(host, /(^|\.)(huggingface\.co|hf\.co)$/);
    const env = byName.get("--allow-env");
    assert.ok(env, "--allow-env lists names");
    assert.deepEqual(env.split(",").sort(), [...(await envNamesRead())].sort());
  });
}

Deno.test("train and generate run on the tiny model with exactly the tasks' flags", async () => {
  const ws = await workspace();
  const out = join(ws.dir, "run");
  const r = await runTrain(smallRunArgs(ws, out, 3));
  assert.equal(r.code, 0, r.stderr);
  const g = taskCommand("generate");
  const gen = await new Deno.Command(Deno.execPath(), {
    args: ["run", ...g.flags, g.script, "--model", ws.model, "--adapter", out, "--prompt", "the cat"],
    cwd: ROOT,
    stdin: "null",
  }).output();
  assert.equal(gen.code, 0, new TextDecoder().decode(gen.stderr));
  assert.match(new TextDecoder().decode(gen.stdout), /^the cat/);
});

Deno.test("a local run needs only read and write of its --out folder (no env, no net)", async () => {
  const ws = await workspace();
  const out = join(ws.dir, "run");
  const ok = await runTrain(smallRunArgs(ws, out, 2), ["--allow-read", `--allow-write=${out}`]);
  assert.equal(ok.code, 0, ok.stderr);
  const other = join(ws.dir, "elsewhere");
  const denied = await runTrain(smallRunArgs(ws, other, 2), ["--allow-read", `--allow-write=${out}`]);
  assert.equal(denied.code, 1);
  assert.match(denied.stderr, /write access to .*elsewhere/);
});
