/**
 * Tests for src/io/safetensors.ts and src/io/atomic_write.ts: round trips for every writable dtype,
 * byte-identical rewrites of the PEFT golden files (so our header order and padding are the Python
 * library's), reading the golden models, every header validation error, and a sharded bf16 checkpoint.
 */

import assert from "node:assert/strict";
import { join } from "../src/_std.ts";
import { InvalidFileError, PromptgateError } from "../src/errors.ts";
import { writeFileAtomic } from "../src/io/atomic_write.ts";
import { bf16ArrayToF32, f16ArrayToF32, f32ArrayToBf16, f32ArrayToF16 } from "../src/io/dtype.ts";
import {
  openCheckpoint,
  openSafetensors,
  serializeSafetensors,
  type TensorToWrite,
  writeSafetensors,
} from "../src/io/safetensors.ts";

const ROOT = new URL("..", import.meta.url).pathname;
const CASES = ["gpt2_basic", "gpt2_pad", "llama_basic", "llama_gqa_pad", "mistral_gqa"];

/** A golden case folder: the copy under tests/fixtures/golden, else the shared original. */
function goldenDir(name: string): string {
  const local = join(ROOT, "tests/fixtures/golden", name);
  try {
    Deno.statSync(local);
    return local;
  } catch {
    return join(ROOT, "../shared/golden/peft-0.21", name);
  }
}

async function withTempDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "promptgate_st_" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/** Build a safetensors file from a header (text, or a raw length override) and a data section. */
function rawFile(header: string, data: Uint8Array = new Uint8Array(0), lengthField?: bigint): Uint8Array {
  const json = new TextEncoder().encode(header);
  const out = new Uint8Array(8 + json.length + data.length);
  new DataView(out.buffer).setBigUint64(0, lengthField ?? BigInt(json.length), true);
  out.set(json, 8);
  out.set(data, 8 + json.length);
  return out;
}

async function assertInvalid(dir: string, bytes: Uint8Array, pattern: RegExp): Promise<void> {
  const path = join(dir, `bad_${crypto.randomUUID()}.safetensors`);
  await Deno.writeFile(path, bytes);
  await assert.rejects(
    () => openSafetensors(path),
    (error: unknown) => {
      assert.ok(error instanceof InvalidFileError, `expected InvalidFileError, got ${error}`);
      assert.match(error.message, pattern);
      assert.match(error.message, /download or save it again|check the path/);
      return true;
    },
  );
}

Deno.test("round trip: F32, F16, BF16, I32 and I64 tensors read back bit-exact, with metadata", async () => {
  await withTempDir(async (dir) => {
    const f32 = Float32Array.from({ length: 24 }, (_, i) => (i - 11.5) / 7);
    const tensors: Record<string, TensorToWrite> = {
      "a.f32": { dtype: "F32", shape: [2, 3, 4], data: f32 },
      "b.f16": { dtype: "F16", shape: [24], data: f32ArrayToF16(f32) },
      "c.bf16": { dtype: "BF16", shape: [4, 6], data: f32ArrayToBf16(f32) },
      "d.i32": { dtype: "I32", shape: [3], data: Int32Array.from([-2147483648, 0, 2147483647]) },
      "e.i64": { dtype: "I64", shape: [2], data: BigInt64Array.from([-(2n ** 40n), 2n ** 40n + 1n]) },
      "f.scalar": { dtype: "F32", shape: [], data: Float32Array.of(3.25) },
      "g.empty": { dtype: "F32", shape: [0, 5], data: new Float32Array(0) },
    };
    const path = join(dir, "all.safetensors");
    await writeSafetensors(path, tensors, { format: "pt", note: "ünïcode ✓" });
    const st = await openSafetensors(path);
    try {
      assert.deepEqual([...st.metadata], [["format", "pt"], ["note", "ünïcode ✓"]]);
      for (const [name, t] of Object.entries(tensors)) {
        const info = st.tensors.get(name)!;
        assert.equal(info.dtype, t.dtype, name);
        assert.deepEqual(info.shape, t.shape, name);
        assert.equal(info.byteLength, t.data.byteLength, name);
        const elementBytes = t.data.BYTES_PER_ELEMENT;
        assert.equal(info.byteOffset % elementBytes, 0, `${name} is aligned to its element size in the file`);
        const raw = await st.readRaw(name);
        assert.deepEqual(raw, new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength), name);
      }
      // Conversions to f32: exact for every dtype here.
      assert.deepEqual(await st.readTensor("a.f32", "f32"), f32);
      assert.deepEqual(await st.readTensor("b.f16", "f32"), f16ArrayToF32(f32ArrayToF16(f32)));
      assert.deepEqual(await st.readTensor("c.bf16", "f32"), bf16ArrayToF32(f32ArrayToBf16(f32)));
      // Integers convert as float32 rounds them (2^31 - 1 becomes 2^31).
      assert.deepEqual([...await st.readTensor("d.i32", "f32")], [-2147483648, 0, 2147483648]);
      assert.deepEqual([...await st.readTensor("e.i64", "f32")], [-(2 ** 40), 2 ** 40]);
      assert.deepEqual([...await st.readTensor("f.scalar", "f32")], [3.25]);
      assert.equal((await st.readTensor("g.empty", "f32")).length, 0);
      // Conversions to f16 bits: F16 passes through, others round to nearest even.
      assert.deepEqual(await st.readTensor("b.f16", "f16"), f32ArrayToF16(f32));
      assert.deepEqual(await st.readTensor("a.f32", "f16"), f32ArrayToF16(f32));
      assert.deepEqual(
        await st.readTensor("c.bf16", "f16"),
        f32ArrayToF16(bf16ArrayToF32(f32ArrayToBf16(f32))),
      );
    } finally {
      st.close();
    }
  });
});

Deno.test("writer layout matches the Python library: dtype order, then name, header padded to 8 bytes", () => {
  const bytes = serializeSafetensors({
    "z": { dtype: "F16", shape: [1], data: Uint16Array.of(0x3c00) },
    "b": { dtype: "I64", shape: [1], data: BigInt64Array.of(7n) },
    "a": { dtype: "F32", shape: [1], data: Float32Array.of(1) },
    "c": { dtype: "F32", shape: [1], data: Float32Array.of(2) },
    "y": { dtype: "BF16", shape: [1], data: Uint16Array.of(0x3f80) },
    "x": { dtype: "I32", shape: [1], data: Int32Array.of(5) },
  });
  const n = Number(new DataView(bytes.buffer).getBigUint64(0, true));
  assert.equal(n % 8, 0);
  const header = new TextDecoder().decode(bytes.subarray(8, 8 + n));
  assert.equal(
    header.trimEnd(),
    '{"b":{"dtype":"I64","shape":[1],"data_offsets":[0,8]},' +
      '"a":{"dtype":"F32","shape":[1],"data_offsets":[8,12]},' +
      '"c":{"dtype":"F32","shape":[1],"data_offsets":[12,16]},' +
      '"x":{"dtype":"I32","shape":[1],"data_offsets":[16,20]},' +
      '"y":{"dtype":"BF16","shape":[1],"data_offsets":[20,22]},' +
      '"z":{"dtype":"F16","shape":[1],"data_offsets":[22,24]}}',
  );
  assert.match(header, /^[^ ]* *$/, "padding is spaces at the end");
  // The Rust crate's own test vector: one F32 tensor "attn.0" of shape [1,2,3] → a 64-byte header.
  const rust = serializeSafetensors({
    "attn.0": { dtype: "F32", shape: [1, 2, 3], data: Float32Array.from([0, 1, 2, 3, 4, 5]) },
  });
  assert.equal(rust[0], 64);
  assert.equal(rust.length, 8 + 64 + 24);
  // Empty file with metadata: the crate writes `{"__metadata__":{"framework":"pt"}}` padded to 40 bytes.
  const empty = serializeSafetensors({}, { framework: "pt" });
  assert.equal(new TextDecoder().decode(empty.subarray(8)), '{"__metadata__":{"framework":"pt"}}     ');
});

Deno.test("golden PEFT files rewrite byte-identically (adapter, base model, golden tensors)", async () => {
  for (const name of CASES) {
    const dir = goldenDir(name);
    for (
      const file of ["adapter/adapter_model.safetensors", "model/model.safetensors", "golden.safetensors"]
    ) {
      const path = join(dir, file);
      const original = await Deno.readFile(path);
      const st = await openSafetensors(path);
      try {
        const tensors: Record<string, TensorToWrite> = {};
        for (const [tname, info] of st.tensors) {
          const raw = await st.readRaw(tname);
          if (info.dtype === "F32") {
            tensors[tname] = { dtype: "F32", shape: info.shape, data: new Float32Array(raw.buffer) };
          } else if (info.dtype === "I32") {
            tensors[tname] = { dtype: "I32", shape: info.shape, data: new Int32Array(raw.buffer) };
          } else {
            assert.fail(`unexpected dtype ${info.dtype} in ${path}`);
          }
        }
        const meta = st.metadata.size > 0 ? Object.fromEntries(st.metadata) : undefined;
        assert.deepEqual(serializeSafetensors(tensors, meta), original, `${name}/${file}`);
      } finally {
        st.close();
      }
    }
  }
});

Deno.test("golden models: shapes match the configs and values match a direct byte parse", async () => {
  for (const name of CASES) {
    const dir = join(goldenDir(name), "model");
    const config = JSON.parse(await Deno.readTextFile(join(dir, "config.json")));
    const bytes = await Deno.readFile(join(dir, "model.safetensors"));
    const ckpt = await openCheckpoint(dir);
    try {
      assert.deepEqual(ckpt.files, [join(dir, "model.safetensors")]);
      assert.equal(ckpt.metadata.get("format"), "pt");
      const embed = name.startsWith("gpt2") ? "transformer.wte.weight" : "model.embed_tokens.weight";
      const hidden = config.hidden_size ?? config.n_embd;
      assert.deepEqual(ckpt.tensors.get(embed)?.shape, [config.vocab_size, hidden]);
      // Read every tensor concurrently: reads on one file handle must not interleave.
      const names = [...ckpt.tensors.keys()];
      const values = await Promise.all(names.map((n) => ckpt.readTensor(n, "f32")));
      names.forEach((n, i) => {
        const info = ckpt.tensors.get(n)!;
        const direct = new Float32Array(
          bytes.slice(info.byteOffset, info.byteOffset + info.byteLength).buffer,
        );
        assert.deepEqual(values[i], direct, n);
        assert.ok(values[i]!.every(Number.isFinite), `${n} is finite`);
      });
    } finally {
      ckpt.close();
    }
  }
});

Deno.test("header validation: every malformed header is rejected with a message naming the problem", async () => {
  await withTempDir(async (dir) => {
    const f32x2 = new Uint8Array(8);
    const ok = (extra = "") => `{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}${extra}}`;
    await assertInvalid(dir, new Uint8Array(5), /shorter than the 8-byte header length/);
    await assertInvalid(dir, rawFile(ok(), f32x2, 2n ** 60n), /header length 1152921504606846976 is larger/);
    await assertInvalid(
      dir,
      rawFile(ok(), f32x2, BigInt(ok().length + 9)),
      /larger than the rest of the file/,
    );
    await assertInvalid(dir, rawFile('{"a": {"dtype": "F32",', f32x2), /not valid JSON/);
    await assertInvalid(dir, rawFile("[1, 2]"), /not a JSON object/);
    await assertInvalid(dir, rawFile("{}  x"), /not valid JSON/);
    await assertInvalid(
      dir,
      rawFile('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', new Uint8Array(4)),
      /past the end of the data section \(4 bytes\)/,
    );
    await assertInvalid(
      dir,
      rawFile(
        '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}',
        new Uint8Array(12),
      ),
      /"a" \[0, 8\] and "b" \[4, 12\] overlap/,
    );
    await assertInvalid(
      dir,
      rawFile(
        '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"z":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},' +
          '"b":{"dtype":"F32","shape":[1],"data_offsets":[6,10]}}',
        new Uint8Array(12),
      ),
      /"a" \[0, 8\] and "b" \[6, 10\] overlap/,
    );
    await assertInvalid(
      dir,
      rawFile('{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', f32x2),
      /F32 with shape \[3\], which is 12 bytes, but its data_offsets \[0, 8\] span 8 bytes/,
    );
    await assertInvalid(
      dir,
      rawFile('{"a":{"dtype":"F32","shape":[67108864,67108864,67108864],"data_offsets":[0,8]}}', f32x2),
      /element count overflows/,
    );
    await assertInvalid(
      dir,
      rawFile('{"a":{"dtype":"F64","shape":[4503599627370496],"data_offsets":[0,8]}}', f32x2),
      /byte size overflows/,
    );
    await assertInvalid(
      dir,
      rawFile(
        '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
        f32x2,
      ),
      /duplicate key "a"/,
    );
    await assertInvalid(
      dir,
      rawFile('{"a":{"dtype":"F4","shape":[2],"data_offsets":[0,8]}}', f32x2),
      /dtype "F4"; known dtypes are F64, F32, F16, BF16/,
    );
    await assertInvalid(
      dir,
      rawFile('{"__proto__":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', f32x2),
      /forbidden key "__proto__"/,
    );
    await assertInvalid(
      dir,
      rawFile(ok(',"__metadata__":{"__proto__":"x"}'), f32x2),
      /forbidden key "__proto__"/,
    );
    await assertInvalid(
      dir,
      rawFile(ok(',"__metadata__":{"format":1}'), f32x2),
      /entry "format" is 1, not a string/,
    );
    await assertInvalid(
      dir,
      rawFile(ok(',"__metadata__":"pt"'), f32x2),
      /"__metadata__" is "pt", not an object/,
    );
    await assertInvalid(
      dir,
      rawFile('{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}', f32x2),
      /dimensions must be integers >= 0/,
    );
    await assertInvalid(
      dir,
      rawFile('{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}', f32x2),
      /end before begin/,
    );
    await assertInvalid(
      dir,
      rawFile('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}}', f32x2),
      /expected \[begin, end\]/,
    );
    const badUtf8 = rawFile('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', f32x2);
    badUtf8[10] = 0xff;
    await assertInvalid(dir, badUtf8, /not valid UTF-8/);
  });
});

Deno.test("header validation: a header over 100 MB is refused before it is read", async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, "huge.safetensors");
    const file = await Deno.open(path, { write: true, create: true });
    const length = new Uint8Array(8);
    new DataView(length.buffer).setBigUint64(0, 100_000_001n, true);
    await file.write(length);
    await file.truncate(8 + 100_000_001); // sparse: no disk space used
    file.close();
    await assert.rejects(() => openSafetensors(path), (e: unknown) => {
      assert.ok(e instanceof InvalidFileError);
      assert.match(e.message, /over the 100000000-byte limit/);
      return true;
    });
  });
});

Deno.test("a missing file and a missing tensor give errors that say what to do", async () => {
  await assert.rejects(() => openSafetensors("/nonexistent/x.safetensors"), /does not exist; check the path/);
  const st = await openSafetensors(join(goldenDir("llama_basic"), "model/model.safetensors"));
  try {
    await assert.rejects(() => st.readTensor("model.layers.9.mlp.up_proj.weight", "f32"), (e: unknown) => {
      assert.ok(e instanceof PromptgateError);
      assert.match(e.message, /is not in .*Similar names: model\.layers\.0\.mlp\.up_proj\.weight/);
      return true;
    });
  } finally {
    st.close();
  }
  await assert.rejects(() => st.readRaw("model.norm.weight"), /was closed/);
});

Deno.test("the writer refuses data that does not match the dtype or shape", () => {
  assert.throws(
    () => serializeSafetensors({ a: { dtype: "F32", shape: [3], data: new Float32Array(2) } }),
    /shape \[3\] \(3 elements\) but 2 values/,
  );
  assert.throws(
    () =>
      serializeSafetensors({
        a: { dtype: "BF16", shape: [2], data: new Float32Array(2) as unknown as Uint16Array },
      }),
    /must be a Uint16Array \(bf16 bit patterns\)/,
  );
  assert.throws(
    () => serializeSafetensors({ __metadata__: { dtype: "F32", shape: [1], data: new Float32Array(1) } }),
    /reserved/,
  );
});

/** Write the golden llama model as two bf16 shards with an index, as transformers' save_pretrained does. */
async function writeBf16Shards(
  src: string,
  dir: string,
  indexOverride?: (weightMap: Record<string, string>) => Record<string, string>,
): Promise<Map<string, Float32Array>> {
  const st = await openSafetensors(src);
  const originals = new Map<string, Float32Array>();
  const shards: Record<string, TensorToWrite>[] = [{}, {}];
  const weightMap: Record<string, string> = {};
  let i = 0;
  for (const [name, info] of st.tensors) {
    const values = await st.readTensor(name, "f32");
    originals.set(name, values);
    const shard = i++ % 2;
    shards[shard]![name] = { dtype: "BF16", shape: info.shape, data: f32ArrayToBf16(values) };
    weightMap[name] = `model-0000${shard + 1}-of-00002.safetensors`;
  }
  st.close();
  for (let s = 0; s < 2; s++) {
    await writeSafetensors(join(dir, `model-0000${s + 1}-of-00002.safetensors`), shards[s]!, {
      format: "pt",
    });
  }
  const index = {
    metadata: { total_size: 12345 },
    weight_map: indexOverride ? indexOverride(weightMap) : weightMap,
  };
  await writeFileAtomic(join(dir, "model.safetensors.index.json"), JSON.stringify(index, null, 2));
  return originals;
}

Deno.test("sharded bf16 checkpoint: one view over both shards, values equal the f32 golden within bf16 rounding", async () => {
  await withTempDir(async (dir) => {
    const originals = await writeBf16Shards(join(goldenDir("llama_basic"), "model/model.safetensors"), dir);
    const ckpt = await openCheckpoint(dir);
    try {
      assert.equal(ckpt.files.length, 2);
      assert.equal(ckpt.tensors.size, originals.size);
      assert.equal(ckpt.metadata.get("total_size"), "12345");
      for (const [name, want] of originals) {
        const info = ckpt.tensors.get(name)!;
        assert.equal(info.dtype, "BF16");
        assert.match(info.file, /model-0000[12]-of-00002\.safetensors$/);
        const got = await ckpt.readTensor(name, "f32");
        // Exactly the bf16 rounding of the original, so within half a bf16 ulp (8 significant bits: 2^-8 relative).
        assert.deepEqual(got, bf16ArrayToF32(f32ArrayToBf16(want)), name);
        for (let i = 0; i < want.length; i++) {
          assert.ok(Math.abs(got[i]! - want[i]!) <= Math.abs(want[i]!) * 2 ** -8, `${name}[${i}]`);
        }
        const half = await ckpt.readTensor(name, "f16");
        assert.deepEqual(half, f32ArrayToF16(got), `${name} as f16`);
      }
    } finally {
      ckpt.close();
    }
  });
});

Deno.test("sharded checkpoint: unsafe or inconsistent shard names in the index are rejected", async () => {
  const src = join(goldenDir("llama_basic"), "model/model.safetensors");
  const cases: [string, (m: Record<string, string>) => Record<string, string>, RegExp][] = [
    [
      "parent",
      (m) => ({ ...m, "model.norm.weight": "../model-00001-of-00002.safetensors" }),
      /path separator/,
    ],
    ["dotdot", (m) => ({ ...m, "model.norm.weight": ".." }), /contains '\.\.'/],
    ["absolute", (m) => ({ ...m, "model.norm.weight": "/etc/passwd" }), /path separator/],
    ["nul", (m) => ({ ...m, "model.norm.weight": "model\u0000.safetensors" }), /NUL/],
    ["number", (m) => ({ ...m, "model.norm.weight": 3 as unknown as string }), /is not a file name/],
    ["wrong shard", (m) => {
      const shard = m["model.norm.weight"]!;
      const other = shard.includes("00001")
        ? "model-00002-of-00002.safetensors"
        : "model-00001-of-00002.safetensors";
      return { ...m, "model.norm.weight": other };
    }, /does not hold it/],
  ];
  for (const [label, override, pattern] of cases) {
    await withTempDir(async (dir) => {
      await writeBf16Shards(src, dir, override);
      await assert.rejects(() => openCheckpoint(dir), (e: unknown) => {
        assert.ok(e instanceof InvalidFileError, label);
        assert.match(e.message, pattern, label);
        return true;
      });
    });
  }
});

Deno.test("checkpoint folder without safetensors weights: the error says what is needed", async () => {
  await withTempDir(async (dir) => {
    await assert.rejects(
      () => openCheckpoint(dir),
      /no model\.safetensors or model\.safetensors\.index\.json/,
    );
    await Deno.writeFile(join(dir, "pytorch_model.bin"), new Uint8Array(4));
    await assert.rejects(
      () => openCheckpoint(dir),
      /only has PyTorch \.bin weights.*safe_serialization=True/,
    );
  });
});

Deno.test("writeFileAtomic: replaces the file whole, leaves no temp files, keeps the old file on failure", async () => {
  await withTempDir(async (dir) => {
    const path = join(dir, "state.json");
    await writeFileAtomic(path, "first");
    await writeFileAtomic(path, [new TextEncoder().encode("sec"), new TextEncoder().encode("ond")]);
    assert.equal(await Deno.readTextFile(path), "second");
    async function* failing(): AsyncGenerator<Uint8Array> {
      yield new TextEncoder().encode("partial");
      throw new Error("disk on fire");
    }
    await assert.rejects(() => writeFileAtomic(path, failing()), (e: unknown) => {
      assert.ok(e instanceof PromptgateError);
      assert.match(e.message, /could not write .*state\.json: disk on fire/);
      return true;
    });
    assert.equal(await Deno.readTextFile(path), "second");
    const names = [];
    for await (const entry of Deno.readDir(dir)) names.push(entry.name);
    assert.deepEqual(names, ["state.json"]);
    await assert.rejects(() => writeFileAtomic(join(dir, "missing/x.json"), "x"), /folder .*missing exists/);
  });
});
