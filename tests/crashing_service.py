"""`stainbridge ...` in a process that kills itself with SIGKILL when it decodes a file holding MARKER.

A stand-in for a file that crashes a decoder or runs the service out of memory (the kernel's OOM
killer sends SIGKILL too): nothing is caught, nothing is cleaned up. Test-only: the package never
imports this module; tests start it as ``python -m tests.crashing_service run --config FILE``.
"""

from __future__ import annotations

import os
import signal
import struct
import sys
import zlib

MARKER = b"stainbridge-test: this file kills the process that decodes it"


def killer_png(cell_png: bytes) -> bytes:
    """`cell_png` (a valid PNG) with MARKER in a tEXt chunk before IEND: still a valid, decodable image."""
    body = b"Comment\x00" + MARKER
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    end = cell_png.rindex(b"IEND") - 4
    return cell_png[:end] + chunk + cell_png[end:]


def main() -> int:
    from stainbridge.daemon.cli import main as stainbridge
    from stainbridge.daemon.intake import decoding

    decode_open = decoding.decode_open

    def decode_or_die(handle, name, **kwargs):
        handle.seek(0)
        if MARKER in handle.read():
            os.kill(os.getpid(), signal.SIGKILL)
        handle.seek(0)
        return decode_open(handle, name, **kwargs)

    decoding.decode_open = decode_or_die
    return stainbridge()


if __name__ == "__main__":
    sys.exit(main())
