"""Time, through one seam: every wait and timestamp of the agent goes through a Clock, so tests can drive time.

`monotonic()` measures intervals and deadlines, `wall()` stamps what others read (start times, records), and
`sleep()` waits. Code that must also wake on an event waits on the event itself (`Event.wait`), with a timeout
computed from `monotonic()`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

__all__ = ["Clock", "SYSTEM_CLOCK"]


@dataclass(frozen=True)
class Clock:
    monotonic: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep


SYSTEM_CLOCK = Clock()
