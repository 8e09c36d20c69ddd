/**
 * Conversions between float32 and the 16-bit float formats that checkpoints store: IEEE half precision
 * (f16) and bfloat16 (bf16), both held as their raw bit patterns in `Uint16Array`s because that is how
 * they travel to the GPU and into safetensors files. Narrowing rounds to nearest, ties to even, like
 * PyTorch's `.to(torch.float16)` / `.to(torch.bfloat16)`; widening is exact. Also the two 8-bit float
 * formats safetensors names (`F8_E4M3`, `F8_E5M2`), widened to float32 through 256-entry tables.
 *
 * @module
 */

// One scratch word shared by the scalar conversions: writing a number through the Float32Array view and
// reading the Uint32Array view gives its float32 bit pattern (rounded to float32 first, as JS does).
const scratchF32 = new Float32Array(1);
const scratchU32 = new Uint32Array(scratchF32.buffer);

/**
 * Round a float32 bit pattern to an f16 bit pattern, to nearest with ties to even.
 * NaN stays NaN (quiet, top payload bits kept), overflow becomes ±Infinity, and values below half the
 * smallest f16 subnormal (2^-25) become ±0.
 */
function f32BitsToF16Bits(bits: number): number {
  const sign = (bits >>> 16) & 0x8000;
  const exp = (bits >>> 23) & 0xff;
  const mant = bits & 0x7fffff;
  if (exp === 0xff) return mant !== 0 ? sign | 0x7e00 | (mant >>> 13) : sign | 0x7c00;
  const halfExp = exp - 127 + 15;
  if (halfExp >= 0x1f) return sign | 0x7c00;
  if (halfExp <= 0) {
    // Subnormal in f16 (or zero): shift the mantissa, implicit bit included, right by 14 - halfExp.
    if (halfExp < -10) return sign;
    const full = mant | 0x800000;
    const shift = 14 - halfExp;
    const halfway = 1 << (shift - 1);
    const rest = full & ((1 << shift) - 1);
    let h = full >>> shift;
    if (rest > halfway || (rest === halfway && (h & 1) === 1)) h++;
    return sign | h;
  }
  const rest = mant & 0x1fff;
  let h = (halfExp << 10) | (mant >>> 13);
  // A carry out of the mantissa correctly bumps the exponent, up to Infinity (0x7c00).
  if (rest > 0x1000 || (rest === 0x1000 && (h & 1) === 1)) h++;
  return sign | h;
}

/** Widen an f16 bit pattern to a float32 bit pattern (exact). NaN payloads are kept. */
function f16BitsToF32Bits(h: number): number {
  const sign = (h & 0x8000) << 16;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0x1f) return (sign | 0x7f800000 | (mant << 13)) >>> 0;
  if (exp !== 0) return (sign | ((exp + 112) << 23) | (mant << 13)) >>> 0;
  if (mant === 0) return sign >>> 0;
  // Subnormal f16: normalise. The value is mant * 2^-24; find the leading bit.
  const lead = 31 - Math.clz32(mant); // 0..9
  const e = lead - 24 + 127;
  return (sign | (e << 23) | ((mant << (23 - lead)) & 0x7fffff)) >>> 0;
}

/** Round a float32 bit pattern to a bf16 bit pattern, to nearest with ties to even (PyTorch's rule). */
function f32BitsToBf16Bits(bits: number): number {
  if ((bits & 0x7f800000) === 0x7f800000 && (bits & 0x7fffff) !== 0) return 0x7fc0;
  return ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16) & 0xffff;
}

/**
 * Convert a number to the bit pattern of the nearest f16 (round to nearest, ties to even).
 *
 * The number is first rounded to float32, as when a float32 tensor is cast to float16.
 *
 * @param x The value.
 * @returns The f16 bit pattern, 0..0xffff.
 *
 * @example Round-trip a value
 * ```ts
 * import { f16BitsToF32, f32ToF16Bits } from "./dtype.ts";
 * const bits = f32ToF16Bits(1.5); // 0x3e00
 * console.log(f16BitsToF32(bits)); // 1.5
 * ```
 */
export function f32ToF16Bits(x: number): number {
  scratchF32[0] = x;
  return f32BitsToF16Bits(scratchU32[0]!);
}

/**
 * Convert an f16 bit pattern to its value (exact).
 *
 * @param bits The f16 bit pattern (only the low 16 bits are used).
 * @returns The value as a number.
 */
export function f16BitsToF32(bits: number): number {
  scratchU32[0] = f16BitsToF32Bits(bits & 0xffff);
  return scratchF32[0]!;
}

/**
 * Convert a number to the bit pattern of the nearest bf16 (round to nearest, ties to even).
 *
 * The number is first rounded to float32. Every NaN becomes the canonical quiet NaN 0x7fc0, as in PyTorch.
 *
 * @param x The value.
 * @returns The bf16 bit pattern, 0..0xffff.
 */
export function f32ToBf16Bits(x: number): number {
  scratchF32[0] = x;
  return f32BitsToBf16Bits(scratchU32[0]!);
}

/**
 * Convert a bf16 bit pattern to its value (exact: bf16 is the top half of a float32).
 *
 * @param bits The bf16 bit pattern (only the low 16 bits are used).
 * @returns The value as a number.
 */
export function bf16BitsToF32(bits: number): number {
  scratchU32[0] = (bits & 0xffff) << 16;
  return scratchF32[0]!;
}

/**
 * Round every element of a float32 array to f16 bit patterns (round to nearest, ties to even).
 *
 * @param src The float32 values.
 * @returns A new array of f16 bit patterns, same length.
 *
 * @example Upload weights as f16
 * ```ts
 * import { f16ArrayToF32, f32ArrayToF16 } from "./dtype.ts";
 * const half = f32ArrayToF16(new Float32Array([1, 0.1, 65520]));
 * console.log(f16ArrayToF32(half)); // Float32Array [1, 0.0999755859375, Infinity]
 * ```
 */
export function f32ArrayToF16(src: Float32Array): Uint16Array {
  const bits = new Uint32Array(src.buffer, src.byteOffset, src.length);
  const out = new Uint16Array(src.length);
  for (let i = 0; i < bits.length; i++) out[i] = f32BitsToF16Bits(bits[i]!);
  return out;
}

/**
 * Widen every f16 bit pattern of an array to float32 (exact).
 *
 * @param src The f16 bit patterns.
 * @returns A new float32 array, same length.
 */
export function f16ArrayToF32(src: Uint16Array): Float32Array {
  const out = new Uint32Array(src.length);
  for (let i = 0; i < src.length; i++) out[i] = f16BitsToF32Bits(src[i]!);
  return new Float32Array(out.buffer);
}

/**
 * Round every element of a float32 array to bf16 bit patterns (round to nearest, ties to even).
 *
 * @param src The float32 values.
 * @returns A new array of bf16 bit patterns, same length.
 */
export function f32ArrayToBf16(src: Float32Array): Uint16Array {
  const bits = new Uint32Array(src.buffer, src.byteOffset, src.length);
  const out = new Uint16Array(src.length);
  for (let i = 0; i < bits.length; i++) out[i] = f32BitsToBf16Bits(bits[i]!);
  return out;
}

/**
 * Widen every bf16 bit pattern of an array to float32 (exact).
 *
 * @param src The bf16 bit patterns.
 * @returns A new float32 array, same length.
 */
export function bf16ArrayToF32(src: Uint16Array): Float32Array {
  const out = new Uint32Array(src.length);
  for (let i = 0; i < src.length; i++) out[i] = src[i]! << 16;
  return new Float32Array(out.buffer);
}

/**
 * The 256 values of the `F8_E4M3` format (PyTorch's `float8_e4m3fn`: bias 7, subnormals, no infinities,
 * NaN only at 0x7f and 0xff), indexed by bit pattern.
 */
function makeF8E4M3Table(): Float32Array {
  const table = new Float32Array(256);
  for (let b = 0; b < 256; b++) {
    const sign = b & 0x80 ? -1 : 1;
    const exp = (b >>> 3) & 0xf;
    const mant = b & 0x7;
    if (exp === 0xf && mant === 0x7) table[b] = NaN;
    else if (exp === 0) table[b] = sign * (mant / 8) * 2 ** -6;
    else table[b] = sign * (1 + mant / 8) * 2 ** (exp - 7);
  }
  return table;
}

/** The 256 values of the `F8_E5M2` format (the top byte of an f16), indexed by bit pattern. */
function makeF8E5M2Table(): Float32Array {
  const table = new Float32Array(256);
  for (let b = 0; b < 256; b++) table[b] = f16BitsToF32(b << 8);
  return table;
}

let f8E4M3Table: Float32Array | null = null;
let f8E5M2Table: Float32Array | null = null;

/**
 * Widen `F8_E4M3` (float8_e4m3fn) bytes to float32 (exact).
 *
 * @param src The 8-bit patterns.
 * @returns A new float32 array, same length.
 */
export function f8E4M3ArrayToF32(src: Uint8Array): Float32Array {
  const table = (f8E4M3Table ??= makeF8E4M3Table());
  const out = new Float32Array(src.length);
  for (let i = 0; i < src.length; i++) out[i] = table[src[i]!]!;
  return out;
}

/**
 * Widen `F8_E5M2` (float8_e5m2) bytes to float32 (exact).
 *
 * @param src The 8-bit patterns.
 * @returns A new float32 array, same length.
 */
export function f8E5M2ArrayToF32(src: Uint8Array): Float32Array {
  const table = (f8E5M2Table ??= makeF8E5M2Table());
  const out = new Float32Array(src.length);
  for (let i = 0; i < src.length; i++) out[i] = table[src[i]!]!;
  return out;
}
