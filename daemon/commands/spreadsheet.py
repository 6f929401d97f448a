"""CSV that a spreadsheet opens safely: cells that would start a formula are neutralized.

File names and site names come from another hospital; a name such as ``=HYPERLINK(...)`` or
``@SUM(1+1).png`` becomes a live formula when the CSV is opened in Excel or LibreOffice (CSV
injection). Following OWASP's guidance, a text cell that starts with ``=``, ``+``, ``-``, ``@``, a
tab or a carriage return gets a leading ``'``: the spreadsheet shows the text, and a program
reading the CSV sees the name with that one extra character in front. Numbers are left alone.
The review queue, which hematologists open in Excel, is written as UTF-8 with a byte-order mark
(Excel reads UTF-8 without one as the local code page); `review import` reads either.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
EXCEL_BOM = "\ufeff"


def safe_cell(value: Any) -> Any:
    """`value`, with a leading ``'`` if it is text that a spreadsheet would read as a formula."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def safe_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Every cell of `row` through `safe_cell`."""
    return {key: safe_cell(value) for key, value in row.items()}
