"""What commands print: per-epoch table rows, and progress that suits where the output goes.

On a terminal, progress is a tqdm bar. Redirected to a file (a log, CI, nohup), a bar's carriage-return redraws
would fill it, so progress is then a plain line every PLAIN_INTERVAL seconds instead.
"""

import sys
import time

from tabulate import tabulate
from tqdm import tqdm

PLAIN_INTERVAL = 30.0  # seconds between progress lines when stderr is not a terminal


def table_row(values: list, columns: list[str], floatfmt: list[str], header: bool) -> str:
    """One epoch's row; fixed float widths keep the columns aligned from row to row without a header."""
    table = tabulate([values], columns, tablefmt="simple", floatfmt=floatfmt)
    return table if header else table.splitlines()[2]


class PlainProgress:
    """Iterates like tqdm and takes set_postfix, but writes a plain line once `interval` seconds have passed
    since the last one (so a loop shorter than that stays silent)."""

    def __init__(self, iterable, desc: str, total: int | None, unit: str, interval: float, stream):
        self.iterable, self.desc, self.unit, self.interval, self.stream = iterable, desc, unit, interval, stream
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.postfix = ""

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def __iter__(self):
        start = last = time.monotonic()
        for i, item in enumerate(self.iterable, 1):
            yield item
            now = time.monotonic()
            if now - last >= self.interval:
                last = now
                of = f"/{self.total}" if self.total else ""
                extra = f" ({self.postfix})" if self.postfix else ""
                print(f"{self.desc}: {i}{of} {self.unit} after {now - start:.0f} s{extra}", file=self.stream,
                      flush=True)


def progress(iterable, desc: str, enabled: bool = True, unit: str = "it", total: int | None = None,
             stream=None, interval: float = PLAIN_INTERVAL):
    """A tqdm bar on a terminal, plain lines every `interval` seconds otherwise, nothing when not `enabled`."""
    stream = stream or sys.stderr
    if stream.isatty():
        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, disable=not enabled, file=stream)
    if not enabled:
        return PlainProgress(iterable, desc, total, unit, float("inf"), stream)
    return PlainProgress(iterable, desc, total, unit, interval, stream)
