"""What commands print: per-epoch table rows that stay aligned without repeating the header."""

from tabulate import tabulate


def table_row(values: list, columns: list[str], floatfmt: list[str], header: bool) -> str:
    """One epoch's row; fixed float widths keep the columns aligned from row to row without a header."""
    table = tabulate([values], columns, tablefmt="simple", floatfmt=floatfmt)
    return table if header else table.splitlines()[2]
