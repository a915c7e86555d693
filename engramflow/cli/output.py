"""Printing stored values safely: as a rich table (every cell plain text, never markup), CSV or JSON."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence
from datetime import date, datetime
from enum import Enum
from typing import Any

from rich.markup import escape
from rich.text import Text


class Format(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


def plain(value: Any) -> Text:
    """A stored value as text rich prints as is: `[/bold]` in a subject is shown, never interpreted."""
    return Text("" if value is None else str(value))


def error_line(message: object) -> str:
    """`error: <message>` for `Console.print`, the message escaped."""
    return f"[red]error:[/red] {escape(str(message))}"


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return value


def print_rows(columns: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str = "table", title: str | None = None,
               console: Any = None) -> None:
    """Print `rows` under `columns` as a rich table (cells plain text), CSV, or a JSON list of objects."""
    if fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
        return
    if fmt == "json":
        records = [{c: _json_value(v) for c, v in zip(columns, row, strict=True)} for row in rows]
        sys.stdout.write(json.dumps(records, ensure_ascii=False, default=str, indent=1) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=plain(title) if title else None)
    for column in columns:
        table.add_column(plain(column))
    for row in rows:
        table.add_row(*(plain(v) for v in row))
    (console or Console()).print(table)
