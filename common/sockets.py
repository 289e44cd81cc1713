"""Socket options the standard library does not name."""

from __future__ import annotations

import socket

SO_RCVBUFFORCE = 33  # asm-generic/socket.h


def grow_receive_buffer(sock: socket.socket, size: int) -> None:
    """Room for a burst of SIZE bytes: past the rmem_max limit when allowed (root,
    CAP_NET_ADMIN), else as far as rmem_max lets it."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
