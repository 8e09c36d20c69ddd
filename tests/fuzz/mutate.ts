/**
 * Mutators for the fuzzer: byte-level (bit flips, interesting bytes, insertions, deletions,
 * truncation, splices), JSON-aware (values replaced by hostile ones: huge or negative numbers, wrong
 * types, `__proto__`/`constructor` keys, deep nesting) and safetensors-aware (the 8-byte header length,
 * shapes, offsets and dtypes rewritten to the values that break naive readers).
 *
 * @module
 */

import type { Random } from "../../src/train/rng.ts";

const INTERESTING_BYTES = [0, 1, 0x7f, 0x80, 0xff, 0x22, 0x5c, 0x7b, 0x7d, 0x5b, 0x5d, 0x2c, 0x3a, 0x0a];
const HOSTILE_VALUES: unknown[] = [
  -1,
  0,
  2 ** 53,
  2 ** 60,
  1e308,
  -1e308,
  0.5,
  "",
  "x".repeat(1000),
  null,
  true,
  [],
  {},
  [1, 2, 3],
  { "__proto__": { polluted: 1 } },
  "../../etc/passwd",
  "a\u0000b",
  "\ud800",
];

/**
 * Byte-level mutation of `data` (a new array).
 *
 * @param rng Random source.
 * @param data Input bytes.
 * @returns Mutated bytes.
 */
export function mutateBytes(rng: Random, data: Uint8Array): Uint8Array {
  let out: Uint8Array<ArrayBuffer> = data.slice();
  const rounds = 1 + rng.int(4);
  for (let r = 0; r < rounds; r++) {
    const pos = out.length ? rng.int(out.length) : 0;
    switch (rng.int(7)) {
      case 0: // bit flip
        if (out.length) out[pos]! ^= 1 << rng.int(8);
        break;
      case 1: // interesting byte
        if (out.length) out[pos] = INTERESTING_BYTES[rng.int(INTERESTING_BYTES.length)]!;
        break;
      case 2: { // insert random bytes
        const n = 1 + rng.int(16);
        const ins = Uint8Array.from({ length: n }, () => rng.int(256));
        out = concat(out.subarray(0, pos), ins, out.subarray(pos));
        break;
      }
      case 3: { // delete a range
        const n = 1 + rng.int(Math.max(1, Math.min(64, out.length - pos)));
        out = concat(out.subarray(0, pos), out.subarray(pos + n));
        break;
      }
      case 4: // truncate
        out = out.slice(0, pos);
        break;
      case 5: { // duplicate a chunk
        const n = 1 + rng.int(64);
        out = concat(out.subarray(0, pos), out.subarray(pos, pos + n), out.subarray(pos));
        break;
      }
      default: // overwrite 4 bytes with a 32-bit boundary value
        if (out.length >= pos + 4) {
          new DataView(out.buffer, out.byteOffset).setUint32(
            pos,
            [0, 0xffffffff, 0x7fffffff, 0x80000000][rng.int(4)]!,
            true,
          );
        }
    }
  }
  return out;
}

function concat(...parts: Uint8Array[]): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/**
 * JSON-aware mutation: parse, replace/insert/delete values at random paths, stringify; falls back to
 * bytes when the input does not parse.
 *
 * @param rng Random source.
 * @param text JSON text.
 * @returns Mutated text.
 */
export function mutateJson(rng: Random, text: string): string {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    return new TextDecoder().decode(mutateBytes(rng, new TextEncoder().encode(text)));
  }
  const rounds = 1 + rng.int(3);
  for (let r = 0; r < rounds; r++) value = mutateValue(rng, value, 0);
  let out = JSON.stringify(value);
  if (rng.int(8) === 0) {
    out = `{"__proto__": {"polluted": true}, "constructor": {"prototype": {"x": 1}}, "a": ${out}}`;
  }
  if (rng.int(16) === 0) out = "[".repeat(5000) + "]".repeat(5000);
  return out;
}

function mutateValue(rng: Random, v: unknown, depth: number): unknown {
  if (Array.isArray(v) && v.length && rng.int(3)) {
    const i = rng.int(v.length);
    v[i] = mutateValue(rng, v[i], depth + 1);
    return v;
  }
  if (v && typeof v === "object" && !Array.isArray(v) && rng.int(4)) {
    const o = v as Record<string, unknown>;
    const keys = Object.keys(o);
    if (keys.length) {
      const k = keys[rng.int(keys.length)]!;
      switch (rng.int(4)) {
        case 0:
          delete o[k];
          return o;
        case 1:
          o[`${k}_${rng.int(9)}`] = o[k];
          return o;
        default:
          o[k] = mutateValue(rng, o[k], depth + 1);
          return o;
      }
    }
  }
  if (typeof v === "number" && rng.int(2)) return [v * 2 ** 40, -v, v + 0.5, Math.floor(v / 3)][rng.int(4)];
  return structuredClone(HOSTILE_VALUES[rng.int(HOSTILE_VALUES.length)]);
}

/**
 * Safetensors-aware mutation: rewrites the header length or the JSON header (shapes, offsets,
 * dtypes), or mutates the bytes.
 *
 * @param rng Random source.
 * @param data A valid safetensors file.
 * @returns Mutated bytes.
 */
export function mutateSafetensors(rng: Random, data: Uint8Array): Uint8Array {
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  if (data.length < 8 || rng.int(4) === 0) return mutateBytes(rng, data);
  const n = Number(view.getBigUint64(0, true));
  if (rng.int(6) === 0) {
    const out = data.slice();
    const values = [2n ** 60n, 2n ** 64n - 1n, BigInt(data.length), 0n, BigInt(n + 1), BigInt(n - 1)];
    new DataView(out.buffer).setBigUint64(0, values[rng.int(values.length)]!, true);
    return out;
  }
  let header: Record<string, { dtype: string; shape: number[]; data_offsets: number[] }>;
  try {
    header = JSON.parse(new TextDecoder().decode(data.subarray(8, 8 + n)));
  } catch {
    return mutateBytes(rng, data);
  }
  const names = Object.keys(header).filter((k) => k !== "__metadata__");
  const name = names[rng.int(Math.max(1, names.length))];
  const t = name ? header[name] : undefined;
  if (t) {
    switch (rng.int(6)) {
      case 0:
        t.shape = t.shape.map(() => [2 ** 31, 2 ** 53, -1, 0, 3][rng.int(5)]!);
        break;
      case 1:
        t.data_offsets = [t.data_offsets[0]!, t.data_offsets[1]! + [1, 1e9, -1][rng.int(3)]!];
        break;
      case 2:
        t.data_offsets = [0, t.data_offsets[1]!]; // overlap with the first tensor
        break;
      case 3:
        t.dtype = ["F32", "F64", "F16", "BF16", "I8", "Q4", "", "BOOL"][rng.int(8)]!;
        break;
      case 4:
        t.shape = [...t.shape, 2 ** 20, 2 ** 20, 2 ** 20];
        break;
      default:
        (header as Record<string, unknown>)[rng.int(2) ? "__proto__" : `${name}`] = { ...t };
    }
  }
  const json = new TextEncoder().encode(JSON.stringify(header));
  const out = new Uint8Array(8 + json.length + (data.length - 8 - n));
  new DataView(out.buffer).setBigUint64(0, BigInt(json.length), true);
  out.set(json, 8);
  out.set(data.subarray(8 + n), 8 + json.length);
  return out;
}
