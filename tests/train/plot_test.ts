import assert from "node:assert/strict";
import { lossPlotSvg, niceTicks } from "../../src/train/plot.ts";

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
