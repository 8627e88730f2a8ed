"""A report table as Markdown, CSV, LaTeX and a PNG, from one ``Report`` (the numbers are
computed once, in ``table.py``; here they are only formatted)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from dsparse.report.table import P_THRESHOLD, Cell, Report

ARROWS = {True: "↑", False: "↓", None: ""}


def column_decimals(report: Report) -> dict[str, int]:
    """Decimals per column, the same in every row: 2 for Delta_T and for metrics reaching
    10 (angles, percentages), 3 for sparsity, 1 for empty layers (a mean over seeds), else 4."""
    decimals = {}
    for column in report.columns:
        means = [abs(row.cells[column.key].mean) for row in report.rows if row.cells[column.key].values]
        decimals[column.key] = (3 if column.key.startswith("sparsity") else
                                {"delta_t": 2, "empty_layers": 1}.get(column.key, 2 if max(means, default=0) >= 10 else 4))
    return decimals


def cell_text(cell: Cell, key: str, decimals: int, pm: str = "±") -> str:
    if not cell.values:
        return "-"
    sign = "+" if key == "delta_t" else ""
    text = f"{cell.mean:{sign}.{decimals}f}"
    if cell.std is not None and not key.startswith("sparsity") and key != "empty_layers":
        text += f" {pm} {cell.std:.{decimals}f}"
    return text


def _header(report: Report, latex: bool = False) -> list[str]:
    arrows = {True: r"$\uparrow$", False: r"$\downarrow$", None: ""} if latex else ARROWS
    return (["method", *[k.split(".")[-1] for k in report.setting_keys], "init", "seeds"]
            + [f"{c.title} {arrows[c.higher_is_better]}".strip() for c in report.columns])


def _lead(report: Report, row) -> list[str]:
    return [row.label, *[str(row.settings.get(k, "")) for k in report.setting_keys], row.init,
            str(len(row.runs)) if row.runs else "-"]


def notes(report: Report) -> list[str]:
    return [
        "mean ± sample standard deviation over the seeds (one run: no ±); ↑/↓ the better direction",
        "bold: best sparse row of its block (same settings and requested sparsity); "
        f"≈: not different from the best by a two-sided Welch t-test (p ≥ {P_THRESHOLD}, needs 2+ seeds in both)",
        *([] if report.baselines else
          ["Delta_T: against the dense run of the same configuration and seed (docs/design.md, 'Metrics and Delta_T')"]),
        *report.notes,
        *dict.fromkeys(f"{row.label}: {note}" for row in report.rows for note in row.notes),
    ]


def to_markdown(report: Report) -> str:
    header, decimals = _header(report), column_decimals(report)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in report.rows:
        cells = []
        for column in report.columns:
            cell = row.cells[column.key]
            text = cell_text(cell, column.key, decimals[column.key])
            text = f"**{text}**" if cell.best else text + (" ≈" if cell.within_noise else "")
            cells.append(text)
        lines.append("| " + " | ".join(_lead(report, row) + cells) + " |")
    return "\n".join(lines + [""] + [f"- {note}" for note in notes(report)]) + "\n"


def to_records(report: Report) -> list[dict]:
    """The table as plain data (``--json``): per row its label, settings and per column
    mean, std, values, best and within-noise flags."""
    return [{"method": row.label, "kind": row.kind, "settings": row.settings, "init": row.init, "seeds": row.seeds,
             "target": row.target, "notes": row.notes,
             "columns": {c.key: {"mean": None if math.isnan(row.cells[c.key].mean) else row.cells[c.key].mean,
                                 "std": row.cells[c.key].std, "values": row.cells[c.key].values,
                                 "best": row.cells[c.key].best, "within_noise": row.cells[c.key].within_noise}
                         for c in report.columns}}
            for row in report.rows]


def to_csv(report: Report) -> str:
    """Machine-readable: mean, std, n, best and within-noise flags per column."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    lead = ["method", *report.setting_keys, "init", "seeds", "target"]
    writer.writerow(lead + [f"{c.key}{suffix}" for c in report.columns
                            for suffix in ("", "_std", "_n", "_best", "_within_noise")])
    for row in report.rows:
        values = [row.label, *[row.settings.get(k, "") for k in report.setting_keys], row.init,
                  " ".join(map(str, row.seeds)), "" if row.target is None else row.target]
        for column in report.columns:
            cell = row.cells[column.key]
            values += ["" if math.isnan(cell.mean) else cell.mean, "" if cell.std is None else cell.std,
                       len(cell.values), cell.best, cell.within_noise]
        writer.writerow(values)
    return buffer.getvalue()


def _latex_escape(text: str) -> str:
    return text.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")


def to_latex(report: Report) -> str:
    header = [_latex_escape(h) for h in _header(report, latex=True)]
    decimals = column_decimals(report)
    lines = [r"\begin{tabular}{" + "l" * (len(header) - len(report.columns)) + "r" * len(report.columns) + "}",
             r"\toprule", " & ".join(header) + r" \\", r"\midrule"]
    for row in report.rows:
        cells = []
        for column in report.columns:
            cell = row.cells[column.key]
            text = cell_text(cell, column.key, decimals[column.key], pm=r"$\pm$")
            text = rf"\textbf{{{text}}}" if cell.best else text + (r"$^{\approx}$" if cell.within_noise else "")
            cells.append(text)
        lines.append(" & ".join([_latex_escape(t) for t in _lead(report, row)] + cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def to_png(report: Report, path: str | Path) -> Path:
    from dsparse.plots import pyplot, save_png

    plt = pyplot()
    header, decimals = _header(report), column_decimals(report)
    body = []
    for row in report.rows:
        body.append(_lead(report, row) + [cell_text(row.cells[c.key], c.key, decimals[c.key])
                                          + (" ≈" if row.cells[c.key].within_noise else "") for c in report.columns])
    width = max(8.0, 1.25 * len(header))
    figure, axis = plt.subplots(figsize=(width, 0.3 * (len(body) + 1)))
    axis.axis("off")
    table = axis.table(cellText=body, colLabels=header, loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    table.auto_set_column_width(list(range(len(header))))
    lead = len(header) - len(report.columns)
    for r, row in enumerate(report.rows, start=1):
        for c, column in enumerate(report.columns):
            if row.cells[column.key].best:
                table[r, lead + c].get_text().set_fontweight("bold")
    axis.text(0.0, -0.1, "\n".join(notes(report)), fontsize=6, va="top", transform=axis.transAxes)
    return save_png(figure, path, dpi=150)
