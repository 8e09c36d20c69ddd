import assert from "node:assert/strict";
import { join } from "../../src/_std.ts";
import { InvalidFileError } from "../../src/errors.ts";
import {
  BatchIterator,
  buildRows,
  detectChatForm,
  IGNORE_INDEX,
  readDataFile,
  readDataRecords,
  renderPrompt,
  splitRows,
  tokenizeRecords,
} from "../../src/train/data.ts";
import { byteTokenizer } from "./_byte_tokenizer.ts";

async function tmpFile(name: string, text: string): Promise<string> {
  const dir = await Deno.makeTempDir();
  const p = join(dir, name);
  await Deno.writeTextFile(p, text);
  return p;
}

Deno.test("jsonl: Alpaca, prompt/completion and text records are read", async () => {
  const p = await tmpFile(
    "d.jsonl",
    '{"instruction":"Add","input":"1 2","output":"3"}\n\n{"prompt":"Hi","completion":"there"}\n{"text":"plain"}\n',
  );
  const r = await readDataFile(p);
  assert.deepEqual(r.map((x) => x.kind), ["instruction", "instruction", "text"]);
  assert.equal(r[0]!.source, `${p}:1`);
  assert.equal(r[1]!.source, `${p}:3`);
});

const BAD: [string, string][] = [
  ["not json", "not valid JSON"],
  ["[1,2]", "not a JSON object"],
  ['{"instruction":"x"}', 'has "instruction" but no "output"'],
  ['{"output":"x"}', 'has "output" but no "instruction"'],
  ['{"prompt":"x"}', 'has "prompt" but no "completion"'],
  ['{"completion":"x"}', 'has "completion" but no "prompt"'],
  ['{"instruction":1,"output":"x"}', "must be strings"],
  ['{"instruction":"a","output":""}', '"output" is empty'],
  ['{"text":""}', '"text" is empty'],
  ['{"text":5}', '"text" must be a string'],
  ['{"foo":"bar"}', "has none of the known fields"],
];

for (const [line, message] of BAD) {
  Deno.test(`bad line ${line} → file:line and "${message}"`, async () => {
    const p = await tmpFile("d.jsonl", `{"text":"ok"}\n${line}\n`);
    await assert.rejects(readDataFile(p), (e: Error) => {
      assert.ok(e instanceof InvalidFileError);
      assert.ok(e.message.includes(`${p}:2: `), e.message);
      assert.ok(e.message.includes(message), e.message);
      assert.ok(e.message.includes("--on-bad-line skip"), e.message);
      return true;
    });
    const warnings: string[] = [];
    const r = await readDataFile(p, { onBadLine: "skip", warn: (w) => warnings.push(w.where) });
    assert.equal(r.length, 1);
    assert.deepEqual(warnings, [`${p}:2`]);
  });
}

Deno.test("__proto__ keys do not pollute prototypes", async () => {
  const p = await tmpFile("d.jsonl", '{"text":"a","__proto__":{"polluted":1}}\n');
  const r = await readDataFile(p);
  assert.equal(r.length, 1);
  assert.equal(({} as Record<string, unknown>).polluted, undefined);
});

Deno.test("missing path, wrong extension, empty folder and empty data each get a message", async () => {
  await assert.rejects(readDataRecords("/nonexistent/x.jsonl"), /does not exist/);
  await assert.rejects(readDataRecords(await tmpFile("d.csv", "a,b")), /use \.jsonl/);
  await assert.rejects(readDataRecords(await Deno.makeTempDir()), /holds no \.jsonl/);
  const p = await tmpFile("d.jsonl", "oops\n");
  await assert.rejects(
    readDataRecords(p, { onBadLine: "skip" }),
    /no usable record .* after skipping bad lines/,
  );
  await assert.rejects(readDataFile(await tmpFile("d.json", "{")), /is not valid JSON/);
  const bin = await tmpFile("d.txt", "");
  await Deno.writeFile(bin, new Uint8Array([0xff, 0xfe, 0x00]));
  await assert.rejects(readDataFile(bin), /not valid UTF-8/);
});

Deno.test(".json arrays and folders are read in sorted order", async () => {
  const dir = await Deno.makeTempDir();
  await Deno.writeTextFile(join(dir, "b.json"), '[{"text":"b1"},{"text":"b2"}]');
  await Deno.writeTextFile(join(dir, "a.txt"), "alpha");
  await Deno.writeTextFile(join(dir, ".hidden.txt"), "no");
  const { records, files } = await readDataRecords(dir);
  assert.deepEqual(files.map((f) => f.slice(dir.length + 1)), ["a.txt", "b.json"]);
  assert.deepEqual(records.map((r) => r.kind === "text" ? r.text : ""), ["alpha", "b1", "b2"]);
});

Deno.test("alpaca template with masking: labels -100 on BOS + prompt, response + EOS trained", () => {
  const [ex] = tokenizeRecords(byteTokenizer, [{
    kind: "instruction",
    instruction: "Say hi",
    input: "",
    output: "hi",
    source: "x",
  }]);
  const prompt = renderPrompt("alpaca", "Say hi", "").prompt;
  assert.ok(prompt.includes("### Instruction:\nSay hi\n\n### Response:\n"));
  const n = 1 + new TextEncoder().encode(prompt).length;
  assert.equal(ex!.ids.length, n + 3);
  assert.ok(ex!.labels.slice(0, n).every((l) => l === IGNORE_INDEX));
  assert.deepEqual(ex!.labels.slice(n), [104, 105, 2]);
  const [unmasked] = tokenizeRecords(byteTokenizer, [{
    kind: "instruction",
    instruction: "a",
    input: "",
    output: "b",
    source: "x",
  }], {
    maskPrompt: false,
  });
  assert.deepEqual(unmasked!.labels, unmasked!.ids);
});

Deno.test("chat forms are recognised and rendered; unknown templates fall back to role tags", () => {
  assert.equal(detectChatForm("{% for m in messages %}<|im_start|>{{ m.role }}"), "chatml");
  assert.equal(detectChatForm("<|start_header_id|>"), "llama3");
  assert.equal(detectChatForm("[INST] x [/INST]"), "llama2");
  assert.equal(detectChatForm(null), "tagged");
  assert.equal(
    renderPrompt("chat", "hi", "", "chatml").prompt,
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
  );
  assert.equal(renderPrompt("chat", "hi", "", "tagged").prompt, "<|user|>\nhi\n<|assistant|>\n");
  assert.equal(renderPrompt("none", "hi", "there").prompt, "hi\n\nthere");
});

Deno.test("packing cuts a stream into full rows; truncation pads and drops label-less rows", () => {
  const ex = { ids: [...Array(10).keys()], labels: [...Array(10).keys()], source: "x" };
  const packed = buildRows([ex, ex], { seqLen: 8, pack: true, padId: 0 });
  assert.equal(packed.rows.length, 2);
  assert.deepEqual(packed.rows[1]!.ids, [8, 9, 0, 1, 2, 3, 4, 5]);
  const cut = buildRows([ex], { seqLen: 16, pack: false, padId: 99 });
  assert.deepEqual(cut.rows[0]!.mask, [...Array(10).fill(1), ...Array(6).fill(0)]);
  assert.deepEqual(cut.rows[0]!.labels.slice(10), Array(6).fill(IGNORE_INDEX));
  assert.deepEqual(cut.rows[0]!.ids.slice(10), Array(6).fill(99));
  const masked = { ids: [1, 2, 3, 4], labels: [-100, -100, -100, 4], source: "x" };
  const r = buildRows([masked], { seqLen: 3, pack: false, padId: 0 });
  assert.equal(r.truncated, 1);
  assert.equal(r.dropped, 1);
  assert.equal(r.rows.length, 0);
});

Deno.test("the eval split is seeded and disjoint", () => {
  const rows = [...Array(100).keys()];
  const a = splitRows(rows, 0.1, 3), b = splitRows(rows, 0.1, 3), c = splitRows(rows, 0.1, 4);
  assert.equal(a.eval.length, 10);
  assert.deepEqual(a, b);
  assert.notDeepEqual(a.eval, c.eval);
  assert.equal(new Set([...a.train, ...a.eval]).size, 100);
  assert.throws(() => splitRows(rows, 1.5, 0), /--eval-split must be in \[0, 1\)/);
  assert.throws(() => splitRows([1], 0.5, 0), /leaves no training rows/);
});

Deno.test("the batch iterator resumes from its cursor with the same batches", () => {
  const rows = [...Array(7).keys()].map((i) => ({ ids: [i, i], labels: [i, i], mask: [1, 1] }));
  const a = new BatchIterator(rows, 3, 11);
  const seen = [a.next(), a.next()];
  const cursor = a.cursor;
  const rest = [a.next(), a.next(), a.next()].map((b) => b.inputIds);
  const b = new BatchIterator(rows, 3, 11);
  b.restore(cursor);
  assert.deepEqual([b.next(), b.next(), b.next()].map((x) => x.inputIds), rest);
  // every row once per epoch (7 rows: the first epoch ends inside the third batch)
  const firstEpoch = [...seen.flatMap((s) => s.inputIds), ...rest[0]!.slice(0, 1)].map((r) => r[0]);
  assert.deepEqual([...firstEpoch].sort(), [0, 1, 2, 3, 4, 5, 6]);
});
