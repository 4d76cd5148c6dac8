"""One connection as commands see it: its id and the descriptors it sent."""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field

from qmpvm.errors import ConfigError

MAX_PENDING_FDS = 32


@dataclass(slots=True, kw_only=True)
class Client:
    """One connection as commands see it: its id and the descriptors it sent."""

    id: int
    pending_fds: deque[int] = field(default_factory=deque)

    def receive_fds(self, fds: list[int]) -> None:
        for fd in fds:
            self.pending_fds.append(fd)
            while len(self.pending_fds) > MAX_PENDING_FDS:
                os.close(self.pending_fds.popleft())

    def take_fd(self) -> int:
        if not self.pending_fds:
            raise ConfigError("No file descriptor supplied via SCM_RIGHTS")
        return self.pending_fds.popleft()

    def close_pending(self) -> None:
        while self.pending_fds:
            os.close(self.pending_fds.popleft())
