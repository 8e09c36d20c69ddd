/**
 * `deno task fuzz --iterations N --seed S`: mutates real files (safetensors headers and bodies,
 * config.json, tokenizer.json, adapter_config.json, training data in jsonl/json/txt) and feeds them to
 * promptgate's loaders. Every input must end in a result or a promptgate error with a message; any
 * other exception, or an input that runs past its time limit, is a failure. Prints one summary line
 * and exits non-zero on any failure.
 *
 * @module
 */

import { parseArgs } from "../../src/_std.ts";
import { Random } from "../../src/train/rng.ts";
import { mutateBytes, mutateJson, mutateSafetensors } from "./mutate.ts";
import type { FuzzRequest, FuzzResponse } from "./worker.ts";

const { values } = parseArgs({
  options: {
    iterations: { type: "string", default: "10000" },
    seed: { type: "string", default: "1" },
    "timeout-ms": { type: "string", default: "5000" },
    verbose: { type: "boolean", default: false },
  },
});
const iterations = Number(values.iterations);
const seed = Number(values.seed);
const timeoutMs = Number(values["timeout-ms"]);
if (!Number.isInteger(iterations) || iterations < 1 || !Number.isInteger(seed) || !(timeoutMs > 0)) {
  console.error("usage: deno task fuzz [--iterations N] [--seed S] [--timeout-ms MS] [--verbose]");
  Deno.exit(2);
}

const root = new URL("../../", import.meta.url).pathname;
const read = (p: string) => Deno.readFile(root + p);
const enc = new TextEncoder(), dec = new TextDecoder();
const corpus = {
  safetensors: [
    await read("tests/fixtures/golden/gpt2_basic/adapter/adapter_model.safetensors"),
    await read("tests/fixtures/golden/llama_basic/adapter/adapter_model.safetensors"),
    await read("tests/fixtures/golden/mistral_gqa/model/model.safetensors"),
  ],
  config: [
    await read("tests/fixtures/golden/llama_basic/model/config.json"),
    await read("tests/fixtures/golden/gpt2_basic/model/config.json"),
    await read("tests/fixtures/golden/mistral_gqa/model/config.json"),
    await read("default/model/config.json"),
  ],
  tokenizer: [await read("default/model/tokenizer.json")],
  adapter_config: [
    await read("tests/fixtures/golden/llama_basic/adapter/adapter_config.json"),
    await read("tests/fixtures/golden/gpt2_pad/adapter/adapter_config.json"),
  ],
  data_jsonl: [enc.encode(
    '{"instruction": "Name the whale.", "input": "", "output": "Moby Dick."}\n{"prompt": "Call me", "completion": " Ishmael."}\n{"text": "It was the best of times."}\n',
  )],
  data_json: [enc.encode('[{"instruction": "Say hi", "output": "hi"}, {"text": "plain"}]')],
  data_txt: [(await read("default/data/moby-dick-eval.txt")).slice(0, 4096)],
};
// weights: tokenizer loads are slow (a 270 KB JSON), so they get a small share
const targets: [FuzzRequest["target"], number][] = [
  ["safetensors", 30],
  ["config", 20],
  ["adapter_config", 15],
  ["data_jsonl", 12],
  ["data_json", 8],
  ["data_txt", 8],
  ["tokenizer", 2],
];
const weightSum = targets.reduce((n, [, w]) => n + w, 0);

const rng = new Random(seed);
const dir = await Deno.makeTempDir({ prefix: "promptgate-fuzz-" });
let worker = new Worker(new URL("./worker.ts", import.meta.url), { type: "module" });
const counts = { ok: 0, typed: 0, failure: 0, timeout: 0 };
const failures: string[] = [];
const t0 = performance.now();

function ask(req: FuzzRequest): Promise<FuzzResponse | "timeout"> {
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      worker.terminate();
      worker = new Worker(new URL("./worker.ts", import.meta.url), { type: "module" });
      resolve("timeout");
    }, timeoutMs);
    worker.onmessage = (e: MessageEvent<FuzzResponse>) => {
      clearTimeout(timer);
      resolve(e.data);
    };
    worker.onerror = (e) => {
      e.preventDefault();
      clearTimeout(timer);
      worker.terminate();
      worker = new Worker(new URL("./worker.ts", import.meta.url), { type: "module" });
      resolve({ outcome: "failure", detail: `worker crashed: ${e.message}` });
    };
    worker.postMessage(req);
  });
}

for (let i = 0; i < iterations; i++) {
  let pick = rng.int(weightSum);
  let target: FuzzRequest["target"] = "config";
  for (const [t, w] of targets) {
    if (pick < w) {
      target = t;
      break;
    }
    pick -= w;
  }
  const seeds = corpus[target];
  const base = seeds[rng.int(seeds.length)]!;
  const bytes = target === "safetensors"
    ? mutateSafetensors(rng, base)
    : target === "data_txt"
    ? mutateBytes(rng, base)
    : rng.int(3) === 0
    ? mutateBytes(rng, base)
    : enc.encode(mutateJson(rng, dec.decode(base)));
  const res = await ask({ target, bytes, dir });
  if (res === "timeout") {
    counts.timeout++;
    failures.push(`#${i} ${target}: no answer within ${timeoutMs} ms`);
    await Deno.writeFile(`${dir}/timeout-${i}.bin`, bytes);
  } else {
    counts[res.outcome]++;
    if (res.outcome === "failure") {
      failures.push(`#${i} ${target}: ${res.detail}`);
      await Deno.writeFile(`${dir}/failure-${i}.bin`, bytes);
    } else if (values.verbose && res.detail) console.log(`#${i} ${target}: ${res.detail}`);
  }
}
worker.terminate();
const secs = ((performance.now() - t0) / 1000).toFixed(1);
for (const f of failures.slice(0, 20)) console.error(f);
const bad = counts.failure + counts.timeout;
if (bad === 0) await Deno.remove(dir, { recursive: true });
console.log(
  `fuzz: ${iterations} inputs in ${secs} s (seed ${seed}): ${counts.ok} accepted, ${counts.typed} refused with ` +
    `a promptgate error, ${counts.failure} failures, ${counts.timeout} timeouts${
      bad ? ` (inputs kept in ${dir})` : ""
    }`,
);
Deno.exit(bad ? 1 : 0);
