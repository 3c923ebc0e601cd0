"""The image origin for the batch benchmark, in its own process.

``python -m bench.origin DIR COUNT LATENCY`` serves ``/photos/00000.jpg`` ...
``/photos/<COUNT-1>.jpg``, cycling through the ``*.jpg`` files in ``DIR``, each answer after
``LATENCY`` seconds. It prints its port on the first line of stdout and serves until stdin
closes. A process of its own, so that its handler threads do not take the GIL from the
process being measured: a real origin runs on another machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.fixtures.httpserver import LoopbackServer


def main() -> None:
    """Serve until stdin closes."""
    directory, count, latency = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    bodies = [p.read_bytes() for p in sorted(directory.glob("*.jpg"))]
    with LoopbackServer() as server:
        for i in range(count):
            server.add(
                f"/photos/{i:05d}.jpg", bodies[i % len(bodies)], content_type="image/jpeg", latency=latency
            )
        print(server.port, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
