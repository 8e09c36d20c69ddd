/**
 * A loss plot as a self-contained SVG (no dependencies): train and eval loss against the step, with
 * axes, "nice" ticks, a legend, and a title. Redrawn after every log so `loss.svg` in a run folder always
 * shows the run so far.
 *
 * @module
 */

/** One series of points. */
export interface PlotSeries {
  /** Legend label. */
  label: string;
  /** CSS colour. */
  color: string;
  /** `[step, value]` points (non-finite values are skipped). */
  points: ReadonlyArray<readonly [number, number]>;
}

/** Options of {@link lossPlotSvg}. */
export interface PlotOptions {
  /** Width in px (default 640). */
  width?: number;
  /** Height in px (default 400). */
  height?: number;
  /** Title (default "loss"). */
  title?: string;
}

/**
 * About `count` round tick values (1, 2 or 5 × 10^k apart) covering [lo, hi].
 *
 * @param lo Lower bound.
 * @param hi Upper bound.
 * @param count Wanted number of ticks.
 * @returns Tick values in increasing order.
 */
export function niceTicks(lo: number, hi: number, count = 5): number[] {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / Math.max(1, count);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) ?? 10 * mag;
  const out: number[] = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) {
    out.push(Number(v.toPrecision(12)));
  }
  return out;
}

function esc(s: string): string {
  return s.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]!);
}

/**
 * A tick label: up to 4 significant digits, exponent form for very large or small values.
 *
 * @param v The tick value.
 * @returns Its label.
 */
export function fmtTick(v: number): string {
  if (v === 0) return "0";
  const a = Math.abs(v);
  return a >= 1e4 || a < 1e-3 ? v.toExponential(1) : String(Number(v.toPrecision(4)));
}

/** Where everything of a loss chart goes, shared by the SVG and the PNG renderers. */
export interface PlotFrame {
  /** Image width and height in px. */
  readonly W: number;
  /** Image height in px. */
  readonly H: number;
  /** Margins around the plot area. */
  readonly m: {
    readonly left: number;
    readonly right: number;
    readonly top: number;
    readonly bottom: number;
  };
  /** Plot area width. */
  readonly pw: number;
  /** Plot area height. */
  readonly ph: number;
  /** The series with their non-finite points dropped. */
  readonly series: PlotSeries[];
  /** Step → x pixel. */
  sx(x: number): number;
  /** Loss → y pixel. */
  sy(y: number): number;
  /** Y ticks inside the range. */
  readonly yTicks: number[];
  /** X ticks inside the range. */
  readonly xTicks: number[];
}

/**
 * Lays out a loss chart: margins, the data range (y padded by 5%), pixel scales and ticks.
 *
 * @param series The series.
 * @param options Size.
 * @returns The frame both renderers draw into.
 */
export function plotFrame(series: readonly PlotSeries[], options: PlotOptions = {}): PlotFrame {
  const W = options.width ?? 640, H = options.height ?? 400;
  const m = { left: 60, right: 20, top: 36, bottom: 44 };
  const pw = W - m.left - m.right, ph = H - m.top - m.bottom;
  const clean = series.map((s) => ({
    ...s,
    points: s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y)),
  }));
  const all = clean.flatMap((s) => s.points);
  let x0 = Math.min(...all.map((p) => p[0])), x1 = Math.max(...all.map((p) => p[0]));
  let y0 = Math.min(...all.map((p) => p[1])), y1 = Math.max(...all.map((p) => p[1]));
  if (all.length === 0) [x0, x1, y0, y1] = [0, 1, 0, 1];
  if (x1 === x0) [x0, x1] = [x0 - 1, x1 + 1];
  if (y1 === y0) [y0, y1] = [y0 - 0.5, y1 + 0.5];
  const pad = (y1 - y0) * 0.05;
  y0 -= pad;
  y1 += pad;
  return {
    W,
    H,
    m,
    pw,
    ph,
    series: clean,
    sx: (x) => m.left + ((x - x0) / (x1 - x0)) * pw,
    sy: (y) => m.top + ph - ((y - y0) / (y1 - y0)) * ph,
    yTicks: niceTicks(y0, y1, 6).filter((t) => t >= y0 && t <= y1),
    xTicks: niceTicks(x0, x1, 8).filter((t) => t >= x0 && t <= x1),
  };
}

/**
 * Draws series of (step, loss) as an SVG line chart.
 *
 * @param series The series (e.g. train and eval loss).
 * @param options Size and title.
 * @returns The SVG document text.
 * @example Two points of train loss
 * ```ts
 * import { lossPlotSvg } from "./plot.ts";
 * const svg = lossPlotSvg([{ label: "train", color: "#1f77b4", points: [[1, 3.2], [2, 2.9]] }]);
 * console.log(svg.startsWith("<svg"));
 * ```
 */
export function lossPlotSvg(series: readonly PlotSeries[], options: PlotOptions = {}): string {
  const frame = plotFrame(series, options);
  const { W, H, m, pw, ph, sx, sy, series: clean } = frame;
  const r = (v: number): string => v.toFixed(1);
  const parts: string[] = [];
  parts.push(
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" ` +
      `font-family="sans-serif" font-size="12">`,
    `<rect width="${W}" height="${H}" fill="white"/>`,
    `<text x="${W / 2}" y="20" text-anchor="middle" font-size="14">${esc(options.title ?? "loss")}</text>`,
  );
  for (const t of frame.yTicks) {
    parts.push(
      `<line x1="${m.left}" x2="${m.left + pw}" y1="${r(sy(t))}" y2="${r(sy(t))}" stroke="#e5e5e5"/>`,
      `<text x="${m.left - 6}" y="${r(sy(t) + 4)}" text-anchor="end">${fmtTick(t)}</text>`,
    );
  }
  for (const t of frame.xTicks) {
    parts.push(
      `<line x1="${r(sx(t))}" x2="${r(sx(t))}" y1="${m.top + ph}" y2="${m.top + ph + 5}" stroke="#333"/>`,
      `<text x="${r(sx(t))}" y="${m.top + ph + 18}" text-anchor="middle">${fmtTick(t)}</text>`,
    );
  }
  parts.push(
    `<line x1="${m.left}" x2="${m.left}" y1="${m.top}" y2="${m.top + ph}" stroke="#333"/>`,
    `<line x1="${m.left}" x2="${m.left + pw}" y1="${m.top + ph}" y2="${m.top + ph}" stroke="#333"/>`,
    `<text x="${m.left + pw / 2}" y="${H - 8}" text-anchor="middle">step</text>`,
  );
  clean.forEach((s, i) => {
    if (s.points.length === 1) {
      const [x, y] = s.points[0]!;
      parts.push(`<circle cx="${r(sx(x))}" cy="${r(sy(y))}" r="3" fill="${esc(s.color)}"/>`);
    } else if (s.points.length > 1) {
      const pts = s.points.map(([x, y]) => `${r(sx(x))},${r(sy(y))}`).join(" ");
      parts.push(`<polyline fill="none" stroke="${esc(s.color)}" stroke-width="1.5" points="${pts}"/>`);
    }
    const ly = m.top + 8 + i * 16;
    parts.push(
      `<line x1="${m.left + pw - 90}" x2="${m.left + pw - 70}" y1="${ly}" y2="${ly}" stroke="${
        esc(s.color)
      }" stroke-width="2"/>`,
      `<text x="${m.left + pw - 64}" y="${ly + 4}">${esc(s.label)}</text>`,
    );
  });
  parts.push("</svg>");
  return parts.join("\n") + "\n";
}
