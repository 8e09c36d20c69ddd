import assert from "node:assert/strict";
import { lossPlotSvg, niceTicks } from "../../src/train/plot.ts";
import { crc32, encodePng, lossPlotPng } from "../../src/train/plot_png.ts";
import { inflateSync } from "../../src/_std.ts";

/** Reads a PNG back: checks the signature and every chunk's CRC, inflates the pixels (RGB, filter 0). */
function decodePng(png: Uint8Array): { width: number; height: number; rgb: Uint8Array } {
  assert.deepEqual([...png.subarray(0, 8)], [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
  const view = new DataView(png.buffer, png.byteOffset, png.byteLength);
  let o = 8, width = 0, height = 0;
  const idat: Uint8Array[] = [];
  for (;;) {
    const len = view.getUint32(o);
    const type = String.fromCharCode(...png.subarray(o + 4, o + 8));
    assert.equal(view.getUint32(o + 8 + len), crc32(png.subarray(o + 4, o + 8 + len)), `${type} CRC`);
    const data = png.subarray(o + 8, o + 8 + len);
    if (type === "IHDR") {
      width = new DataView(data.buffer, data.byteOffset).getUint32(0);
      height = new DataView(data.buffer, data.byteOffset).getUint32(4);
      assert.deepEqual([...data.subarray(8)], [8, 2, 0, 0, 0]);
    }
    if (type === "IDAT") idat.push(data);
    o += 12 + len;
    if (type === "IEND") break;
  }
  assert.equal(o, png.length);
  const raw = new Uint8Array(
    inflateSync(idat.length === 1 ? idat[0]! : new Uint8Array(idat.flatMap((d) => [...d]))),
  );
  const rgb = new Uint8Array(width * height * 3);
  for (let y = 0; y < height; y++) {
    assert.equal(raw[y * (1 + width * 3)], 0);
    rgb.set(raw.subarray(y * (1 + width * 3) + 1, (y + 1) * (1 + width * 3)), y * width * 3);
  }
  return { width, height, rgb };
}

Deno.test("ticks are round numbers covering the range", () => {
  assert.deepEqual(niceTicks(0, 10, 5), [0, 2, 4, 6, 8, 10]);
  assert.deepEqual(niceTicks(2.13, 2.71, 5), [2.2, 2.4, 2.6]);
});

Deno.test("the SVG has a polyline per series with every finite point, axes and a legend", () => {
  const svg = lossPlotSvg([
    { label: "train", color: "#1f77b4", points: [[1, 3], [2, 2.5], [3, NaN], [4, 2]] },
    { label: "eval <x>", color: "#d62728", points: [[0, 3.1]] },
  ]);
  assert.ok(svg.startsWith("<svg"));
  const poly = svg.match(/points="([^"]+)"/)![1]!.split(" ");
  assert.equal(poly.length, 3);
  assert.ok(svg.includes("<circle"));
  assert.ok(svg.includes("eval &lt;x&gt;"));
  assert.ok(svg.includes(">step</text>"));
  assert.ok(lossPlotSvg([]).includes("</svg>"));
});

Deno.test("encodePng round-trips pixels through a valid PNG (signature, IHDR, CRCs, zlib IDAT)", () => {
  const rgb = Uint8Array.from({ length: 7 * 3 * 3 }, (_, i) => (i * 37) % 256);
  const back = decodePng(encodePng(7, 3, rgb));
  assert.deepEqual([back.width, back.height], [7, 3]);
  assert.deepEqual(back.rgb, rgb);
  assert.equal(crc32(new TextEncoder().encode("123456789")), 0xcbf43926); // the CRC-32 check value
});

Deno.test("the PNG plot draws each series in its colour where the SVG puts it, on white, with axes", () => {
  const series = [
    { label: "train", color: "#1f77b4", points: [[0, 3], [10, 2]] as [number, number][] },
    { label: "eval", color: "#d62728", points: [[5, 2.5]] as [number, number][] },
  ];
  const { width, height, rgb } = decodePng(lossPlotPng(series, { width: 320, height: 200 }));
  assert.deepEqual([width, height], [320, 200]);
  const at = (x: number, y: number) => [...rgb.subarray((y * width + x) * 3, (y * width + x) * 3 + 3)];
  assert.deepEqual(at(1, 1), [255, 255, 255]);
  // plot area: left 60, right 20, top 36, bottom 44 (as the SVG); y padded by 5% of the range
  const pw = 320 - 80, ph = 200 - 80, y0 = 2 - 0.05, y1 = 3 + 0.05;
  const sx = (x: number) => Math.round(60 + (x / 10) * pw),
    sy = (y: number) => Math.round(36 + ph - ((y - y0) / (y1 - y0)) * ph);
  assert.deepEqual(at(sx(5), sy(2.5)), [214, 39, 40], "eval point"); // drawn after train, on top
  assert.deepEqual(at(sx(2.5), sy(2.75)), [31, 119, 180], "train line midway");
  assert.deepEqual(at(60, 36 + ph - 10), [51, 51, 51], "y axis");
  const colours = new Set<string>();
  for (let i = 0; i < rgb.length; i += 3) colours.add(`${rgb[i]},${rgb[i + 1]},${rgb[i + 2]}`);
  assert.ok(colours.has("51,51,51") && colours.has("229,229,229"), "ink and grid");
});
