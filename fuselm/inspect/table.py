"""The default view of `fuselm inspect`: one row per kernel, columns aligned.

The parameter list comes last, unpadded: it is the widest column (a paged attention
reads seven tensors), and a row that wraps then wraps after everything else lined up.
"""
from __future__ import annotations

HEADER = ("kernel", "launches", "fused ops", "model lines", "source", "params")


def kernel_table(kernels: list) -> str:
    """The table of `KernelEntry`s, then a line of totals."""
    rows = [HEADER] + [_row(entry) for entry in kernels]
    launches = sum(len(entry.launches) for entry in kernels)
    footer = f"{len(kernels)} kernels, {launches} launches per forward"
    return format_columns(rows, right=(1,)) + footer + "\n"


def _row(entry) -> tuple:
    return (entry.name, str(len(entry.launches)), " ".join(entry.ops) or "-",
            compact_lines(entry.source_lines) or "-", entry.source_file or "(torch fallback)",
            " ".join(entry.params) or "-")


def format_columns(rows: list, gap: str = "  ", right=()) -> str:
    """Rows of strings as aligned columns, left unless the column's index is in
    `right` (numbers); a last left-aligned column is not padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = set(right)

    def cell(text: str, i: int) -> str:
        return text.rjust(widths[i]) if i in right else text.ljust(widths[i])

    return "\n".join(gap.join(cell(text, i) for i, text in enumerate(row)).rstrip() for row in rows) + "\n"


def compact_lines(lines: tuple) -> str:
    """('llama.py:76', 'llama.py:77', 'mlp.py:9') -> 'llama.py:76,77 mlp.py:9'."""
    by_file: dict = {}
    for line in lines:
        file, _, number = line.rpartition(":")
        if not file or not number.isdigit():
            file, number = line, ""
        by_file.setdefault(file, [])
        if number:
            by_file[file].append(number)
    return " ".join(f"{file}:{','.join(numbers)}" if numbers else file for file, numbers in by_file.items())
