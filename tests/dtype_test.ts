/**
 * Tests for src/io/dtype.ts: f16 and bf16 narrowing rounds to nearest with ties to even (PyTorch's
 * rule), widening is exact, and the edge cases (signed zero, infinities, NaN, subnormals, overflow)
 * come out as IEEE 754 says. Where the runtime has `Math.f16round` / `Float16Array`, f16 conversion is
 * also checked against them, exhaustively over all 65,536 bit patterns.
 */

import assert from "node:assert/strict";
import {
  bf16ArrayToF32,
  bf16BitsToF32,
  f16ArrayToF32,
  f16BitsToF32,
  f32ArrayToBf16,
  f32ArrayToF16,
  f32ToBf16Bits,
  f32ToF16Bits,
  f8E4M3ArrayToF32,
  f8E5M2ArrayToF32,
} from "../src/io/dtype.ts";

/** A float32 given by its bit pattern. */
function f32FromBits(bits: number): number {
  return new Float32Array(new Uint32Array([bits]).buffer)[0]!;
}

const hex = (n: number) => `0x${n.toString(16).padStart(4, "0")}`;

Deno.test("f32ToF16Bits: exact values, signed zero, infinities", () => {
  const cases: [number, number][] = [
    [0, 0x0000],
    [-0, 0x8000],
    [1, 0x3c00],
    [-2, 0xc000],
    [0.5, 0x3800],
    [65504, 0x7bff], // largest finite f16
    [Infinity, 0x7c00],
    [-Infinity, 0xfc00],
    [2 ** -14, 0x0400], // smallest normal
    [2 ** -24, 0x0001], // smallest subnormal
    [1023 * 2 ** -24, 0x03ff], // largest subnormal
  ];
  for (const [x, bits] of cases) assert.equal(hex(f32ToF16Bits(x)), hex(bits), `f32ToF16Bits(${x})`);
});

Deno.test("f32ToF16Bits: ties round to even, overflow rounds to infinity", () => {
  const cases: [number, number][] = [
    [1 + 2 ** -11, 0x3c00], // halfway between 0x3c00 (even) and 0x3c01
    [1 + 3 * 2 ** -11, 0x3c02], // halfway between 0x3c01 and 0x3c02 (even)
    [1 + 2 ** -11 + 2 ** -20, 0x3c01], // just above halfway
    [65519, 0x7bff], // below the 65520 midpoint
    [65520, 0x7c00], // midpoint between 65504 (odd mantissa) and 65536: rounds to even = Infinity
    [1e6, 0x7c00],
    [-1e6, 0xfc00],
    [2 ** -25, 0x0000], // halfway between 0 (even) and the smallest subnormal
    [f32FromBits(0x33000001), 0x0001], // just above 2^-25
    [3 * 2 ** -25, 0x0002], // halfway between subnormals 1 and 2 (even)
    [5 * 2 ** -25, 0x0002], // halfway between subnormals 2 (even) and 3
    [2 ** -26, 0x0000],
    [-(2 ** -26), 0x8000],
    [f32FromBits(0x00000001), 0x0000], // float32 subnormal
    [2 ** -14 - 2 ** -25, 0x0400], // halfway between the largest subnormal (odd) and the smallest normal
  ];
  for (const [x, bits] of cases) assert.equal(hex(f32ToF16Bits(x)), hex(bits), `f32ToF16Bits(${x})`);
});

Deno.test("f32ToF16Bits: NaN stays NaN, quiet, sign kept", () => {
  for (const nanBits of [0x7fc00000, 0x7f800001, 0xffc00000, 0x7fbfffff]) {
    const h = f32ToF16Bits(f32FromBits(nanBits));
    assert.equal(h & 0x7c00, 0x7c00, "exponent all ones");
    assert.notEqual(h & 0x3ff, 0, "non-zero mantissa");
    assert.ok(Number.isNaN(f16BitsToF32(h)));
  }
  assert.ok(Number.isNaN(f16BitsToF32(f32ToF16Bits(NaN))));
});

Deno.test("f16BitsToF32: every f16 bit pattern widens exactly and narrows back to itself", () => {
  const viaTypedArray = typeof (globalThis as { Float16Array?: unknown }).Float16Array === "function";
  const ref = viaTypedArray
    ? new (globalThis as unknown as { Float16Array: new (b: ArrayBuffer) => ArrayLike<number> }).Float16Array(
      Uint16Array.from({ length: 65536 }, (_, i) => i).buffer,
    )
    : null;
  for (let h = 0; h < 65536; h++) {
    const x = f16BitsToF32(h);
    const exp = (h >>> 10) & 0x1f;
    const mant = h & 0x3ff;
    const sign = h & 0x8000 ? -1 : 1;
    let expected: number;
    if (exp === 0x1f) expected = mant === 0 ? sign * Infinity : NaN;
    else if (exp === 0) expected = sign * mant * 2 ** -24;
    else expected = sign * (1 + mant / 1024) * 2 ** (exp - 15);
    if (Number.isNaN(expected)) {
      assert.ok(Number.isNaN(x), `pattern ${hex(h)} should be NaN`);
      continue;
    }
    assert.ok(Object.is(x, expected), `pattern ${hex(h)}: got ${x}, expected ${expected}`);
    assert.equal(f32ToF16Bits(x), h, `round trip of ${hex(h)}`);
    if (ref !== null) assert.ok(Object.is(ref[h], expected), `Float16Array disagrees at ${hex(h)}`);
  }
});

Deno.test("f32ToF16Bits agrees with Math.f16round on 200,000 random float32 values", (t) => {
  const f16round = (Math as { f16round?: (x: number) => number }).f16round;
  if (f16round === undefined) {
    t.step({ name: "skipped: Math.f16round not available", ignore: true, fn: () => {} });
    return;
  }
  let seed = 12345;
  const bits = new Uint32Array(1);
  const f = new Float32Array(bits.buffer);
  for (let i = 0; i < 200_000; i++) {
    seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0;
    // Spread exponents over the whole f16 range and beyond (2^-30 .. 2^20).
    const exp = 97 + (seed % 51);
    bits[0] = ((seed & 0x80000000) | (exp << 23) | ((seed * 2654435761) >>> 9)) >>> 0;
    const x = f[0]!;
    const got = f16BitsToF32(f32ToF16Bits(x));
    assert.ok(Object.is(got, f16round(x)), `x=${x}: got ${got}, Math.f16round gives ${f16round(x)}`);
  }
});

Deno.test("f32ToBf16Bits: rounding ties to even, NaN, infinities, subnormals, overflow", () => {
  const cases: [number, number][] = [
    [0, 0x0000],
    [-0, 0x8000],
    [1, 0x3f80],
    [-1.5, 0xbfc0],
    [f32FromBits(0x3f808000), 0x3f80], // halfway between 0x3f80 (even) and 0x3f81
    [f32FromBits(0x3f818000), 0x3f82], // halfway between 0x3f81 and 0x3f82 (even)
    [f32FromBits(0x3f808001), 0x3f81], // just above halfway
    [f32FromBits(0x3f807fff), 0x3f80], // just below halfway
    [Infinity, 0x7f80],
    [-Infinity, 0xff80],
    [f32FromBits(0x7f7fffff), 0x7f80], // largest float32 rounds up to Infinity, as in PyTorch
    [f32FromBits(0x00000001), 0x0000], // smallest float32 subnormal
    [f32FromBits(0x00008000), 0x0000], // subnormal tie to even
    [f32FromBits(0x00018000), 0x0002], // subnormal tie to even (up)
    [f32FromBits(0x00010000), 0x0001], // smallest bf16 subnormal, exact
  ];
  for (const [x, bits] of cases) assert.equal(hex(f32ToBf16Bits(x)), hex(bits), `f32ToBf16Bits(${x})`);
  assert.equal(hex(f32ToBf16Bits(NaN)), "0x7fc0");
  assert.equal(hex(f32ToBf16Bits(f32FromBits(0xff800001))), "0x7fc0", "every NaN becomes PyTorch's 0x7fc0");
});

Deno.test("bf16BitsToF32: exact for every pattern (the top half of a float32)", () => {
  for (let b = 0; b < 65536; b++) {
    const x = bf16BitsToF32(b);
    const expected = f32FromBits(b << 16);
    if (Number.isNaN(expected)) assert.ok(Number.isNaN(x));
    else {
      assert.ok(Object.is(x, expected), `pattern ${hex(b)}`);
      assert.equal(f32ToBf16Bits(x), b, `round trip of ${hex(b)}`);
    }
  }
});

Deno.test("array conversions equal the scalar conversions element by element", () => {
  const src = new Float32Array(4096);
  let seed = 7;
  for (let i = 0; i < src.length; i++) {
    seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
    src[i] = ((seed / 2 ** 32) - 0.5) * 2 ** ((i % 40) - 20);
  }
  src[0] = NaN;
  src[1] = -Infinity;
  src[2] = -0;
  const half = f32ArrayToF16(src);
  const brain = f32ArrayToBf16(src);
  for (let i = 0; i < src.length; i++) {
    assert.equal(half[i], f32ToF16Bits(src[i]!));
    assert.equal(brain[i], f32ToBf16Bits(src[i]!));
  }
  const halfBack = f16ArrayToF32(half);
  const brainBack = bf16ArrayToF32(brain);
  for (let i = 0; i < src.length; i++) {
    assert.ok(Object.is(halfBack[i], Math.fround(f16BitsToF32(half[i]!))));
    assert.ok(Object.is(brainBack[i], bf16BitsToF32(brain[i]!)));
  }
  // A subarray view with a non-zero byte offset converts only its own elements.
  const view = src.subarray(3, 10);
  assert.deepEqual([...f32ArrayToF16(view)], [...half.subarray(3, 10)]);
});

Deno.test("float8 tables: F8_E4M3 (e4m3fn) and F8_E5M2 values", () => {
  const e4m3 = f8E4M3ArrayToF32(Uint8Array.from([0x00, 0x01, 0x08, 0x38, 0x7e, 0xfe, 0x7f, 0xff, 0x80]));
  assert.deepEqual([...e4m3.subarray(0, 6)], [0, 2 ** -9, 2 ** -6, 1, 448, -448]);
  assert.ok(Number.isNaN(e4m3[6]!) && Number.isNaN(e4m3[7]!));
  assert.ok(Object.is(e4m3[8], -0));
  const e5m2 = f8E5M2ArrayToF32(Uint8Array.from([0x00, 0x01, 0x3c, 0x7b, 0x7c, 0xfc, 0x7d]));
  assert.deepEqual([...e5m2.subarray(0, 6)], [0, 2 ** -16, 1, 57344, Infinity, -Infinity]);
  assert.ok(Number.isNaN(e5m2[6]!));
});
