/**
 * The loss plot as a PNG, for viewers that do not show SVG (chat apps, some notebooks, image previews):
 * the same chart as `lossPlotSvg` (train and eval loss against the step, grid, ticks, legend, title)
 * rasterised in TypeScript — lines drawn pixel by pixel, labels in a built-in 3×5 pixel font scaled 2× —
 * and encoded as an 8-bit RGB PNG (one IDAT chunk, compressed with `node:zlib`). No dependencies.
 *
 * @module
 */

import { deflateSync } from "../_std.ts";
import { fmtTick, plotFrame, type PlotOptions, type PlotSeries } from "./plot.ts";

/** 3×5 glyphs, rows top to bottom; upper case is drawn as lower case, unknown characters as a gap. */
const GLYPHS: Record<string, string> = {
  "0": "111101101101111",
  "1": "010110010010111",
  "2": "111001111100111",
  "3": "111001111001111",
  "4": "101101111001001",
  "5": "111100111001111",
  "6": "111100111101111",
  "7": "111001001001001",
  "8": "111101111101111",
  "9": "111101111001111",
  "a": "000011101101011",
  "b": "100110101101110",
  "c": "000011100100011",
  "d": "001011101101011",
  "e": "000111111100011",
  "f": "011100110100100",
  "g": "011101011001110",
  "h": "100110101101101",
  "i": "010000010010010",
  "j": "001000001101010",
  "k": "100101110110101",
  "l": "110010010010111",
  "m": "000111111101101",
  "n": "000110101101101",
  "o": "000010101101010",
  "p": "000110101110100",
  "q": "000011101011001",
  "r": "000011100100100",
  "s": "000011110011110",
  "t": "010111010010001",
  "u": "000101101101011",
  "v": "000101101111010",
  "w": "000101111111111",
  "x": "000101010010101",
  "y": "000101011001110",
  "z": "000111011110111",
  ".": "000000000000010",
  "-": "000000111000000",
  "—": "000000111000000",
  "+": "000010111010000",
  "/": "001001010100100",
  "_": "000000000000111",
  ":": "000010000010000",
  "(": "010100100100010",
  ")": "010001001001010",
};

const SCALE = 2;
const ADVANCE = 4 * SCALE;

type Rgb = readonly [number, number, number];

function parseColor(css: string): Rgb {
  const m = /^#([0-9a-f]{6})$/i.exec(css.trim());
  if (!m) return [0, 0, 0];
  const n = parseInt(m[1]!, 16);
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}

/** An RGB canvas with the few drawing operations the chart needs. */
class Canvas {
  readonly pixels: Uint8Array;
  constructor(readonly width: number, readonly height: number) {
    this.pixels = new Uint8Array(width * height * 3).fill(255);
  }
  set(x: number, y: number, c: Rgb): void {
    x = Math.round(x);
    y = Math.round(y);
    if (x < 0 || y < 0 || x >= this.width || y >= this.height) return;
    const i = (y * this.width + x) * 3;
    this.pixels[i] = c[0];
    this.pixels[i + 1] = c[1];
    this.pixels[i + 2] = c[2];
  }
  rect(x: number, y: number, w: number, h: number, c: Rgb): void {
    for (let j = 0; j < h; j++) for (let i = 0; i < w; i++) this.set(x + i, y + j, c);
  }
  /** A line `width` pixels thick (square pen), sampled every half pixel along its length. */
  line(x0: number, y0: number, x1: number, y1: number, c: Rgb, width = 1): void {
    const n = Math.max(1, Math.ceil(2 * Math.hypot(x1 - x0, y1 - y0)));
    const off = Math.floor((width - 1) / 2);
    for (let s = 0; s <= n; s++) {
      const x = Math.round(x0 + ((x1 - x0) * s) / n), y = Math.round(y0 + ((y1 - y0) * s) / n);
      this.rect(x - off, y - off, width, width, c);
    }
  }
  /** Text whose left, centre or right edge is at x, with its glyphs' top at y. */
  text(s: string, x: number, y: number, c: Rgb, anchor: "start" | "middle" | "end" = "start"): void {
    const w = s.length * ADVANCE - SCALE;
    let cx = anchor === "start" ? x : anchor === "middle" ? x - w / 2 : x - w;
    cx = Math.round(cx);
    for (const ch of s) {
      const g = GLYPHS[ch.toLowerCase()];
      if (g) {
        for (let r = 0; r < 5; r++) {
          for (let col = 0; col < 3; col++) {
            if (g[r * 3 + col] === "1") this.rect(cx + col * SCALE, y + r * SCALE, SCALE, SCALE, c);
          }
        }
      }
      cx += ADVANCE;
    }
  }
}

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

/**
 * CRC-32 (ISO-HDLC, as PNG chunks use).
 *
 * @param bytes The data.
 * @returns The checksum.
 */
export function crc32(bytes: Uint8Array): number {
  let c = 0xffffffff;
  for (const b of bytes) c = CRC_TABLE[(c ^ b) & 255]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function chunk(type: string, data: Uint8Array): Uint8Array {
  const out = new Uint8Array(12 + data.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, data.length);
  for (let i = 0; i < 4; i++) out[4 + i] = type.charCodeAt(i);
  out.set(data, 8);
  view.setUint32(8 + data.length, crc32(out.subarray(4, 8 + data.length)));
  return out;
}

/**
 * Encodes RGB pixels (row-major, 3 bytes each) as a PNG file.
 *
 * @param width Width in pixels.
 * @param height Height in pixels.
 * @param rgb The pixels, `width * height * 3` bytes.
 * @returns The PNG file's bytes.
 */
export function encodePng(width: number, height: number, rgb: Uint8Array): Uint8Array {
  if (rgb.length !== width * height * 3) {
    throw new RangeError(`encodePng: ${rgb.length} bytes for ${width}×${height}`);
  }
  const ihdr = new Uint8Array(13);
  const v = new DataView(ihdr.buffer);
  v.setUint32(0, width);
  v.setUint32(4, height);
  ihdr.set([8, 2, 0, 0, 0], 8); // 8 bits, RGB, deflate, no filter method variants, no interlace
  const raw = new Uint8Array(height * (1 + width * 3));
  for (let y = 0; y < height; y++) {
    raw[y * (1 + width * 3)] = 0; // filter: none
    raw.set(rgb.subarray(y * width * 3, (y + 1) * width * 3), y * (1 + width * 3) + 1);
  }
  const parts = [
    new Uint8Array([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk("IHDR", ihdr),
    chunk("IDAT", new Uint8Array(deflateSync(raw))),
    chunk("IEND", new Uint8Array(0)),
  ];
  const out = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

/**
 * Draws series of (step, loss) as a PNG line chart: the layout of `lossPlotSvg` (same margins, ticks and
 * legend), labels in a small built-in pixel font.
 *
 * @param series The series (e.g. train and eval loss).
 * @param options Size and title.
 * @returns The PNG file's bytes.
 * @example Two points of train loss
 * ```ts
 * import { lossPlotPng } from "./plot_png.ts";
 * const png = lossPlotPng([{ label: "train", color: "#1f77b4", points: [[1, 3.2], [2, 2.9]] }]);
 * console.log(png[1] === 0x50); // "P" of the PNG signature
 * ```
 */
export function lossPlotPng(series: readonly PlotSeries[], options: PlotOptions = {}): Uint8Array {
  const frame = plotFrame(series, options);
  const { W, H, m, pw, ph, sx, sy } = frame;
  const clean = frame.series.map((s) => ({ ...s, rgb: parseColor(s.color) }));
  const cv = new Canvas(W, H);
  const grid: Rgb = [229, 229, 229], ink: Rgb = [51, 51, 51];
  cv.text(options.title ?? "loss", W / 2, 10, ink, "middle");
  for (const t of frame.yTicks) {
    cv.line(m.left, sy(t), m.left + pw, sy(t), grid);
    cv.text(fmtTick(t), m.left - 6, sy(t) - 5, ink, "end");
  }
  for (const t of frame.xTicks) {
    cv.line(sx(t), m.top + ph, sx(t), m.top + ph + 5, ink);
    cv.text(fmtTick(t), sx(t), m.top + ph + 9, ink, "middle");
  }
  cv.line(m.left, m.top, m.left, m.top + ph, ink);
  cv.line(m.left, m.top + ph, m.left + pw, m.top + ph, ink);
  cv.text("step", m.left + pw / 2, H - 16, ink, "middle");
  clean.forEach((s, i) => {
    if (s.points.length === 1) {
      const [x, y] = s.points[0]!;
      cv.rect(sx(x) - 2, sy(y) - 2, 5, 5, s.rgb);
    }
    for (let k = 1; k < s.points.length; k++) {
      const [ax, ay] = s.points[k - 1]!, [bx, by] = s.points[k]!;
      cv.line(sx(ax), sy(ay), sx(bx), sy(by), s.rgb, 2);
    }
    const ly = m.top + 8 + i * 16;
    cv.line(m.left + pw - 90, ly, m.left + pw - 70, ly, s.rgb, 2);
    cv.text(s.label, m.left + pw - 64, ly - 5, ink);
  });
  return encodePng(W, H, cv.pixels);
}
