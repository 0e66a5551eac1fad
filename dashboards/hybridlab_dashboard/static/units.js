"use strict";
// hybridlab's one rule for writing sizes (hybridlab/units.py, whose docstring explains it); the
// rule's base and units arrive from Python in each study's JSON as `units`.

function formatScaled(n, rule) {
  if (!Number.isFinite(n)) return String(n);
  let step = 0;
  // Half up, spelled out, as in Python: toFixed alone would round ties differently there.
  let shown = Math.floor(n + 0.5);
  while (Math.abs(shown) >= rule.base && step < rule.units.length - 1) {
    n /= rule.base;
    step += 1;
    shown = Math.floor(n * 10 + 0.5) / 10;
  }
  const text = step ? shown.toFixed(1).replace(/\.0$/, "") : String(shown);
  return `${text}${rule.separator}${rule.units[step]}`;
}
