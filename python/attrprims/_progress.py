"""Progress bars: tqdm on a terminal when asked and installed, nothing otherwise (logs and CI stay clean)."""

import sys


class Progress:
    """A tqdm bar when `enabled` is True, stderr is a terminal and tqdm imports; otherwise every call does nothing.

    Usable as a context manager (closes the bar on exit, errors included).
    """

    def __init__(self, enabled, total, desc: str, unit: str, *, initial: int = 0, leave: bool = True):
        self.bar = None
        if enabled is True and sys.stderr is not None and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, leave=leave)

    def update(self, count: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
