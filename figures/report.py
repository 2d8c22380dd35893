"""The report page: one self-contained HTML file of figures (embedded PNG data), key numbers and provenance."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Section", "write_report"]

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
       max-width: 1100px; padding: 1.5em 2em 4em; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.lede { color: #555; margin-top: 0; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #666; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.6em 0; }
td, th { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f6f6f6; font-weight: 600; }
td.value { font-family: ui-monospace, "SFMono-Regular", Menlo, monospace; word-break: break-word;
           max-width: 720px; }
nav a { margin-right: 1em; font-size: 0.9em; }
"""


@dataclass
class Section:
    """One section of the report: a ``title``, a plain-text paragraph, (PNG file, caption) ``figures`` and
    formatted headline ``numbers`` (one row per quantity; with mappings as values, one column per inner key)."""

    title: str
    text: str = ""
    figures: Sequence[tuple[Path, str]] = field(default_factory=list)
    numbers: Mapping[str, str] = field(default_factory=dict)


def write_report(path: str | Path, title: str, lede: str, sections: Sequence[Section], provenance: Mapping) -> Path:
    """Write a self-contained HTML report to ``path``: ``title``, a one-line ``lede``, the sections and a last
    ``provenance`` table (model, weights hash, images, versions, command line, ...)."""
    path = Path(path)
    anchors = [f"s{i}" for i in range(len(sections))]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="lede">{html.escape(lede)}</p>',
        "<nav>"
        + "".join(f'<a href="#{a}">{html.escape(s.title)}</a>' for a, s in zip(anchors, sections))
        + '<a href="#provenance">Provenance</a></nav>',
    ]
    for anchor, section in zip(anchors, sections):
        parts.append(f'<h2 id="{anchor}">{html.escape(section.title)}</h2>')
        if section.text:
            parts.append(f"<p>{html.escape(section.text)}</p>")
        if section.numbers:
            parts.append(_table(section.numbers))
        for figure, caption in section.figures:
            figure = Path(figure)
            data = base64.b64encode(figure.read_bytes()).decode("ascii")
            parts.append(
                f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(caption)} <code>{html.escape(figure.name)}</code></figcaption></figure>"
            )
    parts.append('<h2 id="provenance">Provenance</h2>')
    parts.append(_table(provenance))
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _table(numbers: Mapping) -> str:
    columns = list(dict.fromkeys(key for value in numbers.values() if isinstance(value, Mapping) for key in value))
    header = "<tr><th></th>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in columns) + "</tr>" if columns else ""
    rows = "".join(
        f"<tr><th>{html.escape(str(key))}</th>"
        + "".join(f'<td class="value">{html.escape(str(cell))}</td>'
                  for cell in ([value.get(c, "") for c in columns] if columns else [value]))
        + "</tr>"
        for key, value in numbers.items()
    )
    return f"<table>{header}{rows}</table>"
