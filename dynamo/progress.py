"""Progress of long work on stderr: a tqdm bar on a terminal, a few whole lines otherwise."""

from __future__ import annotations

import sys
import time

__all__ = ["LineProgress", "progress_bar"]


def progress_bar(iterable=None, *, total: int | None = None, desc: str = "", enabled: bool = True, **tqdm_options):
    """A progress bar over ``iterable`` or ``total`` steps; every progress display in dynamo goes through it.

    A tqdm bar (with ``**tqdm_options``) when stderr is a terminal; else a `LineProgress`, one line per tenth of the
    work; silent when not ``enabled``.
    """
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if enabled and not sys.stderr.isatty():
        return LineProgress(iterable, total=total, desc=desc, initial=tqdm_options.get("initial", 0),
                            unit=tqdm_options.get("unit", "it"))
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, **tqdm_options)


class LineProgress:
    """tqdm's ``update``/``set_postfix``/``close`` interface, writing a whole line per tenth of the work."""

    def __init__(self, iterable=None, *, total: int | None = None, desc: str = "", initial: int = 0, unit: str = "it"):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = initial
        self.postfix = ""
        self._started = time.perf_counter()
        self._shown = self._tenth()
        self._closed = False

    def _tenth(self) -> int:
        return int(10 * self.n / self.total) if self.total else 0

    def _write(self) -> None:
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        percent = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        postfix = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done} {self.unit}{percent} in {time.perf_counter() - self._started:.0f} s{postfix}",
              file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._tenth() > self._shown:
            self._shown = self._tenth()
            self._write()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **values) -> None:
        values = {**(ordered_dict or {}), **values}
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def close(self) -> None:
        if not self._closed and (not self.total or self._shown < 10):
            self._write()
        self._closed = True

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
