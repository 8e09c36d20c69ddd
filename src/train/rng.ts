/**
 * A small seeded random generator (mulberry32 for uniforms, Box–Muller for normals) whose whole state
 * is one integer, so a checkpoint can save it and a resumed run continues the same stream.
 *
 * @module
 */

/** Seeded random numbers with a saveable state. */
export class Random {
  /** The generator state (save it to resume). */
  state: number;
  #spare: number | null = null;

  /**
   * @param seed Any integer.
   * @example Draw three normals
   * ```ts
   * import { Random } from "./rng.ts";
   * const r = new Random(42);
   * console.log([r.normal(), r.normal(), r.normal()]);
   * ```
   */
  constructor(seed: number) {
    this.state = seed >>> 0;
  }

  /** @returns A uniform draw in [0, 1). */
  uniform(): number {
    let t = (this.state = (this.state + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }

  /** @returns A standard normal draw. */
  normal(): number {
    if (this.#spare !== null) {
      const s = this.#spare;
      this.#spare = null;
      return s;
    }
    const u = Math.max(this.uniform(), 1e-300);
    const v = this.uniform();
    const r = Math.sqrt(-2 * Math.log(u));
    this.#spare = r * Math.sin(2 * Math.PI * v);
    return r * Math.cos(2 * Math.PI * v);
  }

  /**
   * @param n Exclusive upper bound.
   * @returns An integer in [0, n).
   */
  int(n: number): number {
    return Math.floor(this.uniform() * n);
  }

  /**
   * Shuffles an array in place (Fisher–Yates).
   *
   * @param a The array.
   * @returns The same array.
   */
  shuffle<T>(a: T[]): T[] {
    for (let i = a.length - 1; i > 0; i--) {
      const j = this.int(i + 1);
      [a[i], a[j]] = [a[j]!, a[i]!];
    }
    return a;
  }

  /** @returns The full state, for checkpoints. */
  save(): { state: number; spare: number | null } {
    return { state: this.state, spare: this.#spare };
  }

  /**
   * Restores a state from {@link Random.save}.
   *
   * @param s The saved state.
   */
  restore(s: { state: number; spare: number | null }): void {
    this.state = s.state >>> 0;
    this.#spare = s.spare;
  }
}
