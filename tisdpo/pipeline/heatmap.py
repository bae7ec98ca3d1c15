"""``tisdpo inspect``: token weights of chosen and rejected responses as a colour heat map.

Each completion token is drawn on a diverging colour scale centred at weight 1: red tokens
are up-weighted (> 1), blue ones down-weighted (< 1), white ones left at 1. The prompt is
grey. Tokens the tokenisation cuts (``data.max_length``: the weights stage scored none of
them, its columns hold NaN there) are not drawn; a grey note after the response counts them.
Written as ``inspect.html`` (hover a token for its weight and score c_t) and ``inspect.png``
(matplotlib, no display needed).
"""
from __future__ import annotations

import html
import json
import os

import datasets

from tisdpo.pipeline.context import tokenize_cfg
from tisdpo.train.data import (
    TokenizeConfig, load_preference_dataset, per_token_floats, tokenize_pairs,
)
from tisdpo.train.model import load_tokenizer
from tisdpo.train.records import SOURCE_COLUMN

__all__ = ["inspect_run", "load_pairs", "render_html", "render_png"]

_CONTEXT = 8      # tokens decoded before each token to find its text (O(n) decodes in all)
#: the hover letter and legend of each stored score (``weights/meta.json``'s ``score_kind``)
_SCORES = {
    "c_t": ("c", "score c<sub>t</sub> = log &pi;<sup>+</sup> &minus; log &pi;<sup>&minus;"
                 "</sup>"),
    "cdpo_log_score": ("s", "cDPO's log-score s<sub>t</sub> = log softmax((1+b) z<sup>+</sup>"
                            " &minus; b z<sup>&minus;</sup>)[y<sub>t</sub>]"),
}


def _norm(values):
    from matplotlib.colors import TwoSlopeNorm

    lo = min([1.0 - 1e-6] + values)
    hi = max([1.0 + 1e-6] + values)
    return TwoSlopeNorm(vcenter=1.0, vmin=lo, vmax=hi)


def _colour(cmap, norm, w: float) -> tuple[float, float, float]:
    r, g, b, _ = cmap(norm(w))
    return r, g, b


def _text_colour(rgb) -> str:
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return "#000" if lum > 0.5 else "#fff"


def _token_texts(tokenizer, ids, context=()) -> list[str]:
    """The text each token adds to the decoded text before it (``context``: the ids before
    ``ids``, e.g. the prompt's), so that the texts join to the response as decoded after
    its prompt. Decoding a token alone loses a SentencePiece piece's leading space and
    shows a piece of a multi-byte character (byte-level BPE, byte fallback) as U+FFFD: here
    the tokens of an incomplete character show nothing and the token completing it shows
    the character. The window decoded is a few tokens long, restarted as it grows: O(n)."""
    def dec(seq):
        return tokenizer.decode(seq, clean_up_tokenization_spaces=False)

    window = [int(t) for t in context][-_CONTEXT:]
    shown = dec(window)                 # the window's text already given to tokens
    done = len(window)                  # the window's tokens whose text that is
    out = []
    for k, t in enumerate(int(t) for t in ids):
        window.append(t)
        text = dec(window)
        last = k == len(ids) - 1
        if text.startswith(shown) and (last or not text.endswith("\ufffd")):
            out.append(text[len(shown):])
            shown, done = text, len(window)
            if len(window) > 2 * _CONTEXT:      # restart from the last few tokens, at a
                for j in range(len(window) - _CONTEXT, len(window)):   # character's start
                    head = dec(window[j:])
                    if not head.startswith("\ufffd"):
                        window, shown, done = window[j:], head, len(window) - j
                        break
        elif last:      # a character cut by truncation: its bytes, decoded on their own
            out.append(dec(window[done:]))
        else:       # an incomplete character, or a byte run decoded anew: wait for its end
            out.append("")
    return out


def _cut_note(n: int) -> str:
    """What stands for the ``n`` tokens of a response the tokenisation cut."""
    return f"[+{n} token{'s' if n != 1 else ''} cut by data.max_length]"


def load_pairs(cfg, *, data: str | None = None, split: str = "eval", pairs: int = 6,
               start: int = 0) -> list[dict]:
    """Up to ``pairs`` weighted pairs: prompt and per-side tokens, weights and scores, and
    per side (``chosen_cut``, ``rejected_cut``) how many tokens the tokenisation cut (the
    weights stage scored none of them: NaN there; drawn as a note after the tokens)."""
    wdir = os.path.join(cfg.run_dir, "weights")
    if data is None:
        path = os.path.join(wdir, split)
        if not os.path.isdir(path):
            raise ValueError(f"no weighted data at {path}: run `tisdpo weights` first or pass "
                             f"--data")
        raw = datasets.load_from_disk(path)
        where = path                                   # errors name this folder's record
    else:
        raw = load_preference_dataset(data, source_prefix="--data ")   # errors name the line
        where = None
    for col in ("chosen_weight", "rejected_weight"):
        if col not in raw.column_names:
            raise ValueError(f"the records have no {col!r} column (columns: "
                             f"{raw.column_names}); run `tisdpo weights` first")
    meta_path = os.path.join(wdir, "meta.json")
    score_kind = "c_t"
    if data is None and os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
        tok_cfg = TokenizeConfig(**meta["tokenize"])
        score_kind = meta.get("score_kind", "c_t")
    else:
        tok_cfg = tokenize_cfg(cfg, cfg.policy.method)
    if not 0 <= start < len(raw):
        raise ValueError(f"start={start} is outside the {len(raw)} records")
    if not (isinstance(pairs, int) and pairs >= 1):
        raise ValueError(f"pairs={pairs!r}: show at least 1 pair")
    raw = raw.select(range(start, min(start + pairs, len(raw))))
    if where is not None:
        if SOURCE_COLUMN in raw.column_names:
            raw = raw.remove_columns(SOURCE_COLUMN)
        raw = raw.add_column(SOURCE_COLUMN, [f"{where} record {start + i}"
                                             for i in range(len(raw))])
    tokenizer = load_tokenizer(cfg.model)
    tok, _ = tokenize_pairs(raw, tokenizer, tok_cfg)
    out = []
    for rec in tok:
        i = int(rec["record_index"])
        item = {"index": start + i, "prompt": tokenizer.decode(rec["prompt_ids"]),
                "score_kind": score_kind}
        for side in ("chosen", "rejected"):
            ids = rec[f"{side}_ids"]
            scores = raw[i].get(f"{side}_score")
            whole = len(raw[i][f"{side}_weight"])          # the tokens past ids were cut
            if scores is not None:                       # NaN there: the stage cut them too
                scores = per_token_floats(scores, raw[i].get(SOURCE_COLUMN) or
                                          f"record {start + i}", f"{side}_score", whole,
                                          len(ids))
            texts = _token_texts(tokenizer, ids, rec["prompt_ids"])
            item[side] = [
                {"text": text, "weight": float(w),
                 "score": None if scores is None else scores[k]}
                for k, (text, w) in enumerate(zip(texts, rec[f"{side}_weight"]))]
            item[f"{side}_cut"] = whole - len(ids)
        out.append(item)
    return out


def render_html(items: list[dict], path: str, title: str = "TIS-DPO token weights") -> str:
    import matplotlib

    cmap = matplotlib.colormaps["coolwarm"]
    norm = _norm([t["weight"] for it in items for s in ("chosen", "rejected") for t in it[s]])
    letter, legend = _SCORES.get(items[0].get("score_kind", "c_t") if items else "c_t",
                                 _SCORES["c_t"])
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>",
        "body{font-family:sans-serif;max-width:70em;margin:2em auto;line-height:1.9}",
        ".tok{font-family:monospace;white-space:pre;padding:1px 0;border-radius:2px}",
        ".prompt{color:#777;font-family:monospace;white-space:pre-wrap}",
        ".side{font-weight:bold;display:inline-block;width:6em}",
        ".cut{color:#777;font-style:italic}",
        ".pair{border-bottom:1px solid #ddd;padding:0.5em 0}</style></head><body>",
        f"<h2>{html.escape(title)}</h2>",
        f"<p>Colour: token weight on a diverging scale centred at 1 (blue {norm.vmin:.2f} "
        f"&middot; white 1 &middot; red {norm.vmax:.2f}). Hover a token for its weight and "
        f"{legend}.</p>",
    ]
    for it in items:
        parts.append(f"<div class='pair'><div>pair {it['index']}: "
                     f"<span class='prompt'>{html.escape(it['prompt'])}</span></div>")
        for side in ("chosen", "rejected"):
            spans = []
            for t in it[side]:
                rgb = _colour(cmap, norm, t["weight"])
                bg = "#%02x%02x%02x" % tuple(int(255 * c) for c in rgb)
                tip = f"w={t['weight']:.3f}" + ("" if t["score"] is None
                                               else f", {letter}={t['score']:.3f}")
                spans.append(f"<span class='tok' style='background:{bg};color:"
                             f"{_text_colour(rgb)}' title='{tip}'>"
                             f"{html.escape(t['text'])}</span>")
            if it.get(f"{side}_cut"):
                spans.append(f"<span class='cut'> {_cut_note(it[f'{side}_cut'])}</span>")
            parts.append(f"<div><span class='side'>{side}</span>{''.join(spans)}</div>")
        parts.append("</div>")
    parts.append("</body></html>")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(parts))
    return path


def render_png(items: list[dict], path: str, title: str = "TIS-DPO token weights",
               width_chars: int = 110) -> str:
    """The same heat map drawn with matplotlib (monospace tokens on coloured boxes)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    cmap = matplotlib.colormaps["coolwarm"]
    norm = _norm([t["weight"] for it in items for s in ("chosen", "rejected") for t in it[s]])
    lines: list[list[tuple[str, tuple | None]]] = []
    prompt_rows: set[int] = set()
    for it in items:
        head = f"pair {it['index']}: {it['prompt']}".replace("\n", "\\n")   # one text row
        for k in range(0, len(head), width_chars):                          # each, wrapped
            prompt_rows.add(len(lines))
            lines.append([(head[k:k + width_chars], None)])
        for side in ("chosen", "rejected"):
            row: list[tuple[str, tuple | None]] = [(f"{side:>9} ", None)]
            used = 10
            for t in it[side]:
                text = t["text"].replace("\n", "\\n") or " "
                if used + len(text) > width_chars:
                    lines.append(row)
                    row, used = [(" " * 10, None)], 10
                row.append((text, _colour(cmap, norm, t["weight"])))
                used += len(text)
            if it.get(f"{side}_cut"):                   # grey, as the prompt
                note = " " + _cut_note(it[f"{side}_cut"])
                if used + len(note) > width_chars:
                    lines.append(row)
                    row = [(" " * 10, None)]
                row.append((note, "cut"))
            lines.append(row)
        lines.append([])
    char_w, line_h = 0.085, 0.26          # inches at fontsize 9
    fig = Figure(figsize=(width_chars * char_w + 0.6, len(lines) * line_h + 1.4))
    FigureCanvasAgg(fig)
    height = len(lines) * line_h + 1.4
    ax = fig.add_axes((0, 0.9 / height, 1, 1 - 0.9 / height))   # 1 data unit = 1 inch
    ax.set_xlim(0, width_chars * char_w + 0.6)
    ax.set_ylim(-(len(lines) * line_h + 0.2), 0.3)
    ax.axis("off")
    # parse_math=False: '$' in a text is literal (no mathtext; an unmatched '$x^$' raised)
    ax.text(0.3, 0.1, title, fontsize=11, weight="bold", va="center", parse_math=False)
    for n, row in enumerate(lines):
        x, y = 0.3, -(n + 1) * line_h
        for text, rgb in row:
            w = len(text) * char_w
            if rgb == "cut":
                ax.text(x, y, text, family="monospace", fontsize=9, va="center",
                        parse_math=False, color="#777", style="italic")
                x += w
                continue
            if rgb is not None:
                ax.add_patch(Rectangle(
                    (x, y - line_h * 0.42), w, line_h * 0.84, facecolor=rgb, linewidth=0))
            ax.text(x, y, text, family="monospace", fontsize=9, va="center", parse_math=False,
                    color="#777" if n in prompt_rows else
                    (_text_colour(rgb) if rgb is not None else "#000"))
            x += w
    cax = fig.add_axes((0.3, 0.45 / height, 0.4, 0.15 / height))
    sm = ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, cax=cax, orientation="horizontal", label="token weight")
    fig.savefig(path, dpi=110)
    return path


def inspect_run(cfg, *, data: str | None = None, split: str = "eval", pairs: int = 6,
                start: int = 0, out_dir: str | None = None) -> list[str]:
    """Write ``inspect.html`` and ``inspect.png``; returns their paths."""
    items = load_pairs(cfg, data=data, split=split, pairs=pairs, start=start)
    out_dir = out_dir or os.path.join(cfg.run_dir, "inspect")
    os.makedirs(out_dir, exist_ok=True)
    return [render_html(items, os.path.join(out_dir, "inspect.html")),
            render_png(items, os.path.join(out_dir, "inspect.png"))]
