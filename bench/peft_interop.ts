/**
 * Interop with Python PEFT, our half (bench/peft_interop.py is PEFT's): adapters travel both ways in
 * PEFT's format and give the same logits. On every golden model of tests/fixtures/golden (tiny llama,
 * mistral-GQA and gpt2, some with right padding):
 *
 * - `prepare <dir>`: trains a fresh adapter here for a few AdamW steps on the case's batch, saves it with
 *   `saveAdapter` to `<dir>/<case>/ours_adapter`, and writes `<dir>/<case>/ours.json` (model folder,
 *   batch, adapter settings, our logits with that adapter).
 * - the Python script then loads our adapter with `PeftModel.from_pretrained` and compares its logits
 *   with ours (≤ 1e-5), trains its own adapter, saves it to `<dir>/<case>/peft_adapter`, and writes its
 *   logits to `<dir>/<case>/peft.json`.
 * - `check <dir> [summary.json]`: loads PEFT's adapter with `loadAdapter`, compares our logits with
 *   PEFT's (≤ 1e-5), prints both directions' figures and writes the summary.
 * - `all <dir> [summary.json]`: prepare, `python3 bench/peft_interop.py --dir <dir>`, check.
 *
 * Relative error is normwise, `max|ours − peft| / max|peft|`, over the logits of real (unpadded)
 * positions only: HF leaves padded query rows as whatever its kernel makes.
 *
 * Run on a machine with torch, transformers and peft:
 * `deno run -A bench/peft_interop.ts all /tmp/interop /tmp/interop-summary.json`
 *
 * @module
 */

import { join, resolve } from "../src/_std.ts";
import { openSafetensors } from "../src/io/safetensors.ts";
import { loadModel } from "../src/models/load.ts";
import { forward } from "../src/models/run.ts";
import { addAdaptionPrompt } from "../src/adapters/manage.ts";
import { loadAdapter, saveAdapter } from "../src/adapters/io.ts";
import { createOptimizer } from "../src/train/optimizer.ts";

const GOLDEN = new URL("../tests/fixtures/golden/", import.meta.url).pathname;
const CASES = ["llama_basic", "llama_gqa_pad", "mistral_gqa", "gpt2_basic", "gpt2_pad"];
const TOLERANCE = 1e-5;
const TRAIN_STEPS = 5;

/** What `prepare` writes per case for the Python side. */
interface OursJson {
  case: string;
  model: string;
  adapter: string;
  adapterLen: number;
  adapterLayers: number;
  inputIds: number[][];
  attentionMask: number[][];
  labels: number[][];
  shape: [number, number, number];
  logits: number[];
  losses: number[];
  tolerance: number;
}

interface Batch {
  inputIds: number[][];
  attentionMask: number[][];
  labels: number[][];
}

async function goldenBatch(
  name: string,
): Promise<{ batch: Batch; meta: { adapter_len: number; adapter_layers: number } }> {
  const meta = JSON.parse(await Deno.readTextFile(join(GOLDEN, name, "meta.json")));
  const file = await openSafetensors(join(GOLDEN, name, "golden.safetensors"));
  try {
    const ints = async (key: string): Promise<number[][]> => {
      const a = new Int32Array((await file.readRaw(key)).slice().buffer);
      const [B, T] = [meta.batch as number, meta.seq as number];
      return Array.from({ length: B }, (_, b) => Array.from(a.subarray(b * T, (b + 1) * T)));
    };
    return {
      batch: {
        inputIds: await ints("input_ids"),
        attentionMask: await ints("attention_mask"),
        labels: await ints("labels"),
      },
      meta,
    };
  } finally {
    file.close();
  }
}

/**
 * Normwise relative error over the rows whose mask is 1.
 *
 * @param ours Our logits `[B*T*V]`.
 * @param theirs PEFT's logits, same layout.
 * @param mask Attention mask `[B][T]`.
 * @param V Vocabulary size.
 * @returns `max|ours − theirs| / max|theirs|`.
 */
function maskedRelError(
  ours: ArrayLike<number>,
  theirs: ArrayLike<number>,
  mask: number[][],
  V: number,
): number {
  let num = 0, den = 0;
  mask.flat().forEach((m, row) => {
    if (!m) return;
    for (let v = row * V; v < (row + 1) * V; v++) {
      const a = ours[v]!, e = theirs[v]!;
      if (!Number.isFinite(a) || !Number.isFinite(e)) num = Infinity;
      num = Math.max(num, Math.abs(a - e));
      den = Math.max(den, Math.abs(e));
    }
  });
  return num / Math.max(den, 1e-30);
}

async function prepare(dir: string): Promise<void> {
  for (const name of CASES) {
    const caseDir = join(dir, name);
    await Deno.mkdir(caseDir, { recursive: true });
    const { batch, meta } = await goldenBatch(name);
    const modelDir = resolve(join(GOLDEN, name, "model"));
    const model = await loadModel(modelDir);
    addAdaptionPrompt(model, { adapterLen: meta.adapter_len, adapterLayers: meta.adapter_layers, seed: 42 });
    const opt = createOptimizer(model, { lr: 1e-2, weightDecay: 0 });
    const losses: number[] = [];
    for (let i = 0; i < TRAIN_STEPS; i++) losses.push(await opt.step(batch));
    const adapterDir = resolve(join(caseDir, "ours_adapter"));
    await saveAdapter(model, adapterDir);
    const { logits, shape } = await forward(model, {
      inputIds: batch.inputIds,
      attentionMask: batch.attentionMask,
    });
    const out: OursJson = {
      case: name,
      model: modelDir,
      adapter: adapterDir,
      adapterLen: meta.adapter_len,
      adapterLayers: meta.adapter_layers,
      ...batch,
      shape,
      logits: Array.from(logits),
      losses,
      tolerance: TOLERANCE,
    };
    await Deno.writeTextFile(join(caseDir, "ours.json"), JSON.stringify(out));
    console.log(
      `prepare ${name}: trained ${TRAIN_STEPS} steps (loss ${losses[0]!.toFixed(5)} → ${
        losses.at(-1)!.toFixed(5)
      }), saved ${adapterDir}`,
    );
  }
}

interface CaseSummary {
  case: string;
  /** Ours → PEFT: PEFT's logits with our adapter vs ours (from the Python side). */
  oursInPeft: number | null;
  /** PEFT → ours: our logits with PEFT's adapter vs PEFT's. */
  peftInOurs: number | null;
  pass: boolean;
  error?: string;
}

async function check(dir: string, summaryPath: string | undefined): Promise<boolean> {
  const summary: CaseSummary[] = [];
  for (const name of CASES) {
    const caseDir = join(dir, name);
    const row: CaseSummary = { case: name, oursInPeft: null, peftInOurs: null, pass: false };
    summary.push(row);
    try {
      const py = JSON.parse(await Deno.readTextFile(join(caseDir, "python_result.json")));
      row.oursInPeft = py.ours_in_peft_rel_error;
      const peft = JSON.parse(await Deno.readTextFile(join(caseDir, "peft.json")));
      const ours: OursJson = JSON.parse(await Deno.readTextFile(join(caseDir, "ours.json")));
      const model = await loadModel(ours.model);
      await loadAdapter(model, join(caseDir, "peft_adapter"));
      const { logits, shape } = await forward(model, {
        inputIds: ours.inputIds,
        attentionMask: ours.attentionMask,
      });
      if (shape.join() !== (peft.shape as number[]).join()) {
        throw new Error(`shape ${shape} vs PEFT's ${peft.shape}`);
      }
      row.peftInOurs = maskedRelError(logits, peft.logits, ours.attentionMask, shape[2]);
      row.pass = row.oursInPeft !== null && row.oursInPeft <= TOLERANCE && row.peftInOurs <= TOLERANCE;
    } catch (e) {
      row.error = (e as Error).message;
    }
  }
  const fmt = (x: number | null) => (x === null ? "-" : x.toExponential(2));
  console.log(`\nPEFT interop (max relative error of logits, tolerance ${TOLERANCE})`);
  console.log(`${"case".padEnd(14)} ${"ours→PEFT".padStart(10)} ${"PEFT→ours".padStart(10)}  result`);
  for (const r of summary) {
    console.log(
      `${r.case.padEnd(14)} ${fmt(r.oursInPeft).padStart(10)} ${fmt(r.peftInOurs).padStart(10)}  ${
        r.pass ? "pass" : `FAIL${r.error ? `: ${r.error}` : ""}`
      }`,
    );
  }
  const ok = summary.every((r) => r.pass);
  if (summaryPath) {
    await Deno.writeTextFile(
      summaryPath,
      JSON.stringify({ tolerance: TOLERANCE, pass: ok, cases: summary }, null, 1),
    );
  }
  return ok;
}

if (import.meta.main) {
  const [mode, dir, summaryPath] = Deno.args;
  if (!mode || !dir || !["prepare", "check", "all"].includes(mode)) {
    console.error("usage: deno run -A bench/peft_interop.ts prepare|check|all <dir> [summary.json]");
    Deno.exit(2);
  }
  if (mode === "prepare" || mode === "all") await prepare(dir);
  if (mode === "all") {
    const script = new URL("./peft_interop.py", import.meta.url).pathname;
    const py = await new Deno.Command("python3", {
      args: [script, "--dir", dir],
      stdout: "inherit",
      stderr: "inherit",
    })
      .output();
    if (!py.success) console.error(`python3 ${script} exited with code ${py.code}`);
  }
  if (mode === "check" || mode === "all") {
    const ok = await check(dir, summaryPath ?? join(dir, "summary.json"));
    Deno.exit(ok ? 0 : 1);
  }
}
