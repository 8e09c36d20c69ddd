/**
 * Helpers of the reliability tests: a copy of the tiny golden llama with a byte-level `tokenizer.json`
 * (so the real CLI can load it), small training data, the permission flags of `deno task train` as
 * `deno.json` spells them, and a training subprocess whose `--json` events can be awaited — so a test can
 * kill it at a chosen moment (after the n-th step, i.e. while the checkpoint of that step is being
 * written) or at a random one.
 *
 * @module
 */

import { join } from "../../src/_std.ts";
import denoJson from "../../deno.json" with { type: "json" };
import { byteTokenizerJson } from "../train/_byte_tokenizer.ts";

/** The repository root (subprocesses run there, as `deno task` does). */
export const ROOT: string = new URL("../..", import.meta.url).pathname;
const GOLDEN = new URL("../fixtures/golden/llama_basic/model", import.meta.url).pathname;

/**
 * Splits a `deno run …` task of `deno.json` into its flags and its script.
 *
 * @param name The task's name (`train`, `generate`).
 * @returns The permission flags and the script path.
 */
export function taskCommand(name: "train" | "generate"): { flags: string[]; script: string } {
  const words = (denoJson.tasks as Record<string, string>)[name]!.trim().split(/\s+/);
  if (words[0] !== "deno" || words[1] !== "run") throw new Error(`task ${name} is not "deno run …"`);
  const rest = words.slice(2);
  return { flags: rest.filter((w) => w.startsWith("-")), script: rest.find((w) => !w.startsWith("-"))! };
}

/** A work folder with the model (plus a byte tokenizer) and plain-text training data. */
export interface Workspace {
  /** The folder. */
  dir: string;
  /** Model folder with `tokenizer.json`. */
  model: string;
  /** Training data file. */
  data: string;
}

/**
 * Makes a workspace: the golden llama copied with a byte tokenizer, and ~1.4 KB of text.
 *
 * @returns The paths.
 */
export async function workspace(): Promise<Workspace> {
  const dir = await Deno.makeTempDir({ prefix: "promptgate-reliability-" });
  const model = join(dir, "model");
  await Deno.mkdir(model);
  for (const f of ["config.json", "model.safetensors", "generation_config.json"]) {
    await Deno.copyFile(join(GOLDEN, f), join(model, f));
  }
  await Deno.writeTextFile(join(model, "tokenizer.json"), JSON.stringify(byteTokenizerJson()));
  const data = join(dir, "data.txt");
  await Deno.writeTextFile(data, "the cat sat on the mat. a dog ran in the fog. ".repeat(30));
  return { dir, model, data };
}

/**
 * The flags of a small run: constant learning rate (so the schedule does not depend on `--max-steps`, which
 * a resume may change), no eval split (so every checkpoint also rewrites the run folder's adapter), no
 * samples, a checkpoint every step.
 *
 * @param ws The workspace.
 * @param out The run folder.
 * @param maxSteps Steps.
 * @returns Arguments of `src/cli/train.ts`.
 */
export function smallRunArgs(ws: Workspace, out: string, maxSteps: number): string[] {
  return [
    ...["--model", ws.model, "--data", ws.data, "--out", out, "--max-steps", String(maxSteps)],
    ...["--seq-len", "32", "--batch-size", "2", "--adapter-layers", "2", "--adapter-len", "4"],
    ...["--lr", "0.01", "--warmup-steps", "0", "--schedule", "constant", "--eval-split", "0"],
    ...["--sample-tokens", "0", "--save-every", "1", "--json"],
  ];
}

/** One `--json` event with the time it was read (ms since the process started). */
export interface TimedEvent {
  /** Milliseconds after spawn. */
  t: number;
  /** The event. */
  e: Record<string, unknown> & { event: string };
}

/** A running `src/cli/train.ts`. */
export class TrainProcess {
  readonly child: Deno.ChildProcess;
  readonly started = performance.now();
  readonly events: TimedEvent[] = [];
  stderr = "";
  private waiters: { pred: (e: TimedEvent) => boolean; resolve: (e: TimedEvent | null) => void }[] = [];
  private done: Promise<void>;
  private closed = false;

  /**
   * Starts the train CLI with exactly the permission flags of `deno task train`.
   *
   * @param args CLI arguments.
   * @param flags Permission flags (default: the task's).
   */
  constructor(args: string[], flags: string[] = taskCommand("train").flags) {
    const { script } = taskCommand("train");
    this.child = new Deno.Command(Deno.execPath(), {
      args: ["run", ...flags, script, ...args],
      cwd: ROOT,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
      env: { NO_COLOR: "1" },
    }).spawn();
    const out = this.readLines(this.child.stdout, (line) => {
      if (!line.startsWith("{")) return;
      const ev: TimedEvent = { t: performance.now() - this.started, e: JSON.parse(line) };
      this.events.push(ev);
      this.waiters = this.waiters.filter((w) => {
        if (!w.pred(ev)) return true;
        w.resolve(ev);
        return false;
      });
    });
    const err = this.readLines(this.child.stderr, (line) => (this.stderr += line + "\n"));
    this.done = Promise.all([out, err]).then(() => {
      this.closed = true;
      for (const w of this.waiters) w.resolve(null);
      this.waiters = [];
    });
  }

  private async readLines(stream: ReadableStream<Uint8Array>, onLine: (l: string) => void): Promise<void> {
    let buf = "";
    for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
      buf += chunk;
      let i: number;
      while ((i = buf.indexOf("\n")) >= 0) {
        onLine(buf.slice(0, i));
        buf = buf.slice(i + 1);
      }
    }
    if (buf) onLine(buf);
  }

  /**
   * Waits for the first event (already seen or to come) that matches.
   *
   * @param pred The test.
   * @returns The event, or null when the process ended first.
   */
  waitFor(pred: (e: TimedEvent) => boolean): Promise<TimedEvent | null> {
    const seen = this.events.find(pred);
    if (seen) return Promise.resolve(seen);
    if (this.closed) return Promise.resolve(null);
    return new Promise((resolve) => this.waiters.push({ pred, resolve }));
  }

  /**
   * Sends a signal (ignored if the process is gone).
   *
   * @param signal The signal.
   */
  kill(signal: Deno.Signal): void {
    try {
      this.child.kill(signal);
    } catch {
      // Already exited.
    }
  }

  /** @returns The exit status once stdout and stderr are drained. */
  async status(): Promise<Deno.CommandStatus> {
    const s = await this.child.status;
    await this.done;
    return s;
  }
}

/**
 * Runs the train CLI to its end.
 *
 * @param args CLI arguments.
 * @param flags Permission flags (default: the task's).
 * @returns Exit code, events and stderr.
 */
export async function runTrain(
  args: string[],
  flags?: string[],
): Promise<{ code: number; events: TimedEvent[]; stderr: string }> {
  const p = new TrainProcess(args, flags);
  const s = await p.status();
  return { code: s.code, events: p.events, stderr: p.stderr };
}

/**
 * The losses of `metrics.jsonl` by step (training steps only).
 *
 * @param out The run folder.
 * @returns step → loss.
 */
export async function metricLosses(out: string): Promise<Map<number, number>> {
  const m = new Map<number, number>();
  for (const line of (await Deno.readTextFile(join(out, "metrics.jsonl"))).split("\n")) {
    if (!line.trim()) continue;
    const e = JSON.parse(line) as { step: number; loss: number | null };
    if (e.step > 0) {
      if (m.has(e.step)) throw new Error(`metrics.jsonl lists step ${e.step} twice`);
      m.set(e.step, e.loss ?? NaN);
    }
  }
  return m;
}

/**
 * Copies a folder recursively.
 *
 * @param from Source.
 * @param to Target (created).
 */
export async function copyDir(from: string, to: string): Promise<void> {
  await Deno.mkdir(to, { recursive: true });
  for await (const e of Deno.readDir(from)) {
    if (e.isDirectory) await copyDir(join(from, e.name), join(to, e.name));
    else await Deno.copyFile(join(from, e.name), join(to, e.name));
  }
}
