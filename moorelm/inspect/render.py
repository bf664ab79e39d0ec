"""Views of an ``Inspection``: the terminal (ANSI colour), a self-contained HTML page, and
PNG figures (attention grids, the logit lens heat map, drawn with matplotlib).

Every writer refuses to replace an existing file unless ``overwrite`` and writes atomically.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

from moorelm.atomic import atomic_write_bytes, atomic_write_text, check_writable
from moorelm.errors import MoorelmError
from moorelm.inspect.core import Inspection
from moorelm.plots import png_bytes, pyplot

HTML_ATTENTION_TOKENS = 256  # beyond this many tokens the page keeps head means only


def check_output(path: str | Path, overwrite: bool = False) -> Path:
    """An output path that may be written: not an existing file (unless ``overwrite``),
    in an existing folder."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise MoorelmError(f"{path} already exists; choose another path or pass --force")
    if not path.parent.is_dir():
        raise MoorelmError(f"folder {path.parent} does not exist; create it first")
    check_writable(path.parent)  # written after the model has run
    return path


# ----------------------------------------------------------------------------- terminal


def _shown(text: str) -> str:
    """A token's text on one line: newlines, tabs and other control characters escaped."""
    text = text.replace("\n", "\\n").replace("\t", "\\t")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _ansi_colour(prob: float | None) -> str:
    """Background from red (improbable) through yellow to green (likely), 256-colour ANSI."""
    if prob is None:
        return "\x1b[2m"
    level = min(5, max(0, int(prob * 6)))
    red, green = (5, level) if level < 3 else (5 - (level - 3) * 2, 5)
    return f"\x1b[48;5;{16 + 36 * max(red, 0) + 6 * green + 0}m\x1b[30m"


def terminal(result: Inspection, colour: bool = True, table: bool = True) -> str:
    """The text with each token coloured by its probability, then one line per token:
    position, token, probability, rank, surprisal and the top alternatives."""
    lines = []
    if colour:
        lines.append("".join(_ansi_colour(t.prob) + t.text + "\x1b[0m" for t in result.tokens))
    else:
        lines.append("".join(f"[{t.text}]" for t in result.tokens))
    lines.append("")
    if table:
        lines.append(f"{'pos':>4}  {'token':<14} {'prob':>7} {'rank':>6} {'bits':>6}  top alternatives")
        for i, t in enumerate(result.tokens):
            mark = "+" if t.generated else " "
            token = _shown(t.text)[:14]
            if t.logprob is None:
                lines.append(f"{i:>4}{mark} {token:<14} {'':>7} {'':>6} {'':>6}")
                continue
            alts = "  ".join(f"{s!r} {math.exp(lp):.3f}" for s, _, lp in t.top)
            lines.append(f"{i:>4}{mark} {token:<14} {t.prob:>7.4f} {t.rank:>6} "
                         f"{t.surprisal_bits:>6.2f}  {alts}")
        if result.next_top:
            alts = "  ".join(f"{s!r} {math.exp(lp):.3f}" for s, _, lp in result.next_top)
            lines.append(f"next: {alts}")
        if result.truncated:
            lines.append(f"(the first {result.truncated} prompt tokens were dropped to fit "
                         "the context window)")
    return "\n".join(lines)


def lens_table(result: Inspection, last: int = 12) -> str:
    """The logit lens as text: one row per layer (0: embeddings), one column per position
    (the last ``last``), each cell the layer's most likely next token and its probability."""
    T = len(result.tokens)
    cols = list(range(max(0, T - last), T))
    width = 12
    head = f"{'layer':>6} " + " ".join(f"{_shown(result.tokens[c].text)[:width]:>{width}}"
                                       for c in cols)
    rows = [head]
    for layer in range(len(result.lens_texts)):
        name = "embed" if layer == 0 else str(layer)
        cells = [f"{_shown(result.lens_texts[layer][c])[:width - 5]}"
                 f" {float(result.lens_probs[layer, c]):.2f}" for c in cols]
        rows.append(f"{name:>6} " + " ".join(f"{c:>{width}}" for c in cells))
    return "\n".join(rows)


# ----------------------------------------------------------------------------- PNG figures


def attention_png(result: Inspection, layer: int | None = None, head: int | None = None,
                  average: bool = False) -> bytes:
    """A grid of attention maps: rows are layers (all kept ones, or ``layer``), columns
    query heads (all, or ``head``; with ``average`` one column of head means). Each map's
    row t is what position t attended to. Grouped-query heads get a column each, titled
    with the key/value head they read."""
    result.check_layer(layer)
    result.check_head(head)
    plt = pyplot()
    layers = [layer] if layer is not None else sorted(result.attention)
    if not layers:
        raise MoorelmError("no attention was kept; inspect with some layers")
    heads: list[int | None] = [None] if average else (
        [head] if head is not None else list(range(result.n_head)))
    group = result.n_head // result.n_kv_head
    labels = [_shown(t.text)[:8] for t in result.tokens]
    T = len(labels)
    cell = 2.2 if T <= 24 else 3.0
    fig, axes = plt.subplots(len(layers), len(heads), squeeze=False,
                             figsize=(cell * len(heads) + 0.5, cell * len(layers) + 0.5))
    for r, li in enumerate(layers):
        for c, h in enumerate(heads):
            ax = axes[r][c]
            ax.imshow(result.attention_map(li, h).numpy(), cmap="viridis", vmin=0, vmax=1,
                      interpolation="nearest")
            kv = "" if h is None or group == 1 else f" (kv {h // group})"
            ax.set_title(f"L{li} " + ("mean" if h is None else f"H{h}") + kv, fontsize=8)
            if T <= 24:
                ax.set_xticks(range(T), labels, rotation=90, fontsize=6)
                ax.set_yticks(range(T), labels, fontsize=6)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
    fig.suptitle("attention (row: query position, column: key position)", fontsize=9)
    return png_bytes(fig, dpi=100, tight=True)


def lens_png(result: Inspection, last: int = 24) -> bytes:
    """The logit lens as a heat map: layers (rows, embeddings at the bottom) by positions
    (the last ``last``); colour = probability the layer gives the model's final choice,
    text = the layer's own most likely next token."""
    plt = pyplot()
    T = len(result.tokens)
    cols = list(range(max(0, T - last), T))
    data = result.lens_final[:, cols].numpy()
    L1 = data.shape[0]
    fig, ax = plt.subplots(figsize=(0.9 * len(cols) + 1.5, 0.35 * L1 + 1.2))
    ax.imshow(data, cmap="magma", vmin=0, vmax=1, aspect="auto", origin="lower",
              interpolation="nearest")
    for layer in range(L1):
        for j, c in enumerate(cols):
            ax.text(j, layer, _shown(result.lens_texts[layer][c])[:6], ha="center",
                    va="center", fontsize=6, color="white" if data[layer, j] < 0.5 else "black")
    ax.set_xticks(range(len(cols)), [_shown(result.tokens[c].text)[:8] for c in cols],
                  rotation=90, fontsize=7)
    ax.set_yticks(range(L1), ["embed"] + [str(i) for i in range(1, L1)], fontsize=7)
    ax.set_xlabel("input token (the cell predicts what follows it)")
    ax.set_ylabel("after layer")
    ax.set_title("logit lens: colour = p(final prediction), text = layer's top token",
                 fontsize=9)
    return png_bytes(fig, dpi=100, tight=True)


def save_attention_png(result: Inspection, path: str | Path, layer: int | None = None,
                       head: int | None = None, average: bool = False,
                       overwrite: bool = False) -> Path:
    path = check_output(path, overwrite)
    atomic_write_bytes(path, attention_png(result, layer, head, average))
    return path


def save_lens_png(result: Inspection, path: str | Path, overwrite: bool = False) -> Path:
    path = check_output(path, overwrite)
    atomic_write_bytes(path, lens_png(result))
    return path


# ----------------------------------------------------------------------------- HTML


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 1.5rem auto; padding: 0 1rem; color: #222; }
#text { font: 1rem/1.9 ui-monospace, monospace; white-space: pre-wrap; background: #fff;
        border: 1px solid #ddd; padding: .6rem; }
.tok { border-radius: 3px; padding: 1px 0; cursor: pointer; position: relative; }
.tok.gen { outline: 1px dashed #555; }
.tok.sel { outline: 2px solid #000; }
#tip { position: fixed; display: none; background: #222; color: #eee; font: .8rem ui-monospace, monospace;
       padding: .4rem .6rem; border-radius: 4px; pointer-events: none; white-space: pre; z-index: 9; }
table.lens { border-collapse: collapse; font: .75rem ui-monospace, monospace; }
table.lens td, table.lens th { border: 1px solid #eee; padding: 2px 4px; white-space: pre; }
.controls { margin: .8rem 0; display: flex; gap: 1rem; align-items: center; }
img { max-width: 100%; }
"""

_SCRIPT = """
const D = JSON.parse(document.getElementById('data').textContent);
const text = document.getElementById('text'), tip = document.getElementById('tip');
const esc = (s) => s.replace(/\\n/g, '\\\\n').replace(/\\t/g, '\\\\t');
function colour(p) {  // red (improbable) -> yellow -> green (likely)
  if (p === null) return '#eee';
  return 'hsl(' + Math.round(120 * p) + ', 75%, 75%)';
}
let selected = null;
D.tokens.forEach((t, i) => {
  const s = document.createElement('span');
  s.className = 'tok' + (t.generated ? ' gen' : '');
  s.textContent = t.text;
  s.dataset.i = i;
  s.dataset.prob = t.logprob === null ? '' : Math.exp(t.logprob).toFixed(4);
  s.style.background = colour(t.logprob === null ? null : Math.exp(t.logprob));
  s.addEventListener('mousemove', (e) => {
    let lines = ['#' + i + ' ' + JSON.stringify(t.text) + (t.generated ? ' (generated)' : '')];
    if (t.logprob !== null) {
      lines.push('p = ' + Math.exp(t.logprob).toFixed(4) + '   rank ' + t.rank +
                 '   ' + (-t.logprob / Math.LN2).toFixed(2) + ' bits');
      lines.push('alternatives:');
      t.top.forEach((a) => lines.push('  ' + JSON.stringify(a.text).padEnd(16) + ' ' +
                                      Math.exp(a.logprob).toFixed(4)));
    }
    tip.textContent = lines.join('\\n');
    tip.style.display = 'block';
    tip.style.left = (e.clientX + 12) + 'px';
    tip.style.top = (e.clientY + 12) + 'px';
  });
  s.addEventListener('mouseleave', () => { tip.style.display = 'none'; });
  s.addEventListener('click', () => { selected = i; showAttention(); });
  text.appendChild(s);
});
const layerSel = document.getElementById('layer'), headSel = document.getElementById('head');
function weights(layer, head, q) {
  const L = D.attention[layer];
  if (!L) return null;
  if (D.attention_mean_only || head === 'mean') {
    if (D.attention_mean_only) return L[q];
    const row = new Array(D.tokens.length).fill(0);
    L.forEach((h) => h[q].forEach((w, k) => { row[k] += w / L.length; }));
    return row;
  }
  return L[+head][q];
}
function showAttention() {
  const spans = text.querySelectorAll('.tok');
  spans.forEach((s) => s.classList.remove('sel'));
  if (selected === null) {
    spans.forEach((s, i) => {
      const p = D.tokens[i].logprob;
      s.style.background = colour(p === null ? null : Math.exp(p));
    });
    return;
  }
  const w = weights(layerSel.value, headSel.value, selected);
  spans[selected].classList.add('sel');
  const top = Math.max(...w.slice(0, selected + 1));
  spans.forEach((s, k) => {
    const a = k <= selected ? w[k] / (top || 1) : 0;
    s.style.background = 'rgba(30, 90, 255, ' + a.toFixed(3) + ')';
    s.dataset.attention = k <= selected ? w[k].toFixed(4) : '0';
  });
  document.getElementById('mode').textContent = 'attention of token #' + selected +
    ' (' + JSON.stringify(D.tokens[selected].text) + '), layer ' + layerSel.value +
    ', ' + (headSel.value === 'mean' ? 'mean of heads' : 'head ' + headSel.value);
}
layerSel.addEventListener('change', showAttention);
headSel.addEventListener('change', showAttention);
document.getElementById('reset').addEventListener('click', () => {
  selected = null; showAttention();
  document.getElementById('mode').textContent = 'colour = probability';
});
"""


def html_page(result: Inspection, title: str = "moorelm inspect",
              attention_png_bytes: bytes | None = None, lens_png_bytes: bytes | None = None) -> str:
    """A self-contained page: the tokens coloured by probability (hover: probability, rank,
    alternatives; click: colour the text by that token's attention, layer and head chosen
    above it), the logit lens table, and optional PNG figures inlined."""
    data = result.to_dict()
    T = len(result.tokens)
    mean_only = T > HTML_ATTENTION_TOKENS
    att = {}
    for layer, w in result.attention.items():
        w = w.mean(dim=0) if mean_only else w
        att[str(layer)] = [[[round(float(x), 4) for x in row] for row in h.tolist()]
                           for h in (w[None] if mean_only else w)]
        if mean_only:
            att[str(layer)] = att[str(layer)][0]
    data["attention"] = att
    data["attention_mean_only"] = mean_only
    layers = "".join(f'<option value="{layer}">{layer}</option>' for layer in sorted(result.attention))
    heads = '<option value="mean">mean</option>' + ("" if mean_only else "".join(
        f'<option value="{h}">{h}'
        + (f" (kv {h // (result.n_head // result.n_kv_head)})" if result.n_kv_head < result.n_head else "")
        + "</option>" for h in range(result.n_head)))
    lens_rows = []
    for layer in range(len(result.lens_texts) - 1, -1, -1):
        cells = []
        for c in range(T):
            p = float(result.lens_final[layer, c])
            cells.append(f'<td style="background: hsl(220, 70%, {100 - 45 * p:.0f}%)" '
                         f'title="p(final)={p:.3f}, p(top)={float(result.lens_probs[layer, c]):.3f}">'
                         f'{html.escape(_shown(result.lens_texts[layer][c]))}</td>')
        name = "embed" if layer == 0 else str(layer)
        lens_rows.append(f"<tr><th>{name}</th>{''.join(cells)}</tr>")
    header = "".join(f"<th>{html.escape(_shown(t.text))}</th>" for t in result.tokens)
    figures = ""
    for alt, png in (("attention maps", attention_png_bytes), ("logit lens", lens_png_bytes)):
        if png:
            figures += (f'<h2>{alt}</h2><img alt="{alt}" src="data:image/png;base64,'
                        f'{base64.b64encode(png).decode()}">')
    payload = json.dumps(data, ensure_ascii=True).replace("</", "<\\/")
    truncated = (f"<p>The first {result.truncated} prompt tokens were dropped to fit the "
                 "context window.</p>" if result.truncated else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{T} tokens ({result.prompt_tokens} prompt, {T - result.prompt_tokens} generated, dashed).
Colour = the model's probability of each token given the ones before it (red: surprising,
green: expected). Hover a token for its alternatives; click it to see what it attended to.</p>
{truncated}
<div class="controls"><label>layer <select id="layer">{layers}</select></label>
<label>head <select id="head">{heads}</select></label>
<button id="reset">show probabilities</button> <span id="mode">colour = probability</span></div>
<div id="text"></div><div id="tip"></div>
<h2>logit lens</h2>
<p>What each layer's residual stream predicts next, read through the final norm and head
(top row: the model's output). Shade = probability of the model's final prediction.</p>
<div style="overflow-x: auto"><table class="lens"><tr><th>layer</th>{header}</tr>
{''.join(lens_rows)}</table></div>
{figures}
<script type="application/json" id="data">{payload}</script>
<script>{_SCRIPT}</script>
</body></html>
"""


def save_html(result: Inspection, path: str | Path, title: str = "moorelm inspect",
              figures: bool = True, overwrite: bool = False) -> Path:
    """Write ``html_page`` (with the attention grid and lens PNGs inlined when ``figures``)."""
    path = check_output(path, overwrite)
    att = lens = None
    if figures:
        many = len(result.attention) * result.n_head > 64
        att = attention_png(result, average=many)
        lens = lens_png(result)
    atomic_write_text(path, html_page(result, title, att, lens))
    return path
