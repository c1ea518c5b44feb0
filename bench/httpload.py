"""The HTTP client alone, as a physical bound for benchmark 2: ``calls`` greenlets, each sending chat requests
to the sim one after another through cascade's ChatProvider for ``seconds`` (no Celery, no Postgres).

    python -m bench.httpload BASE_URL CALLS SECONDS
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import sys
import time

import gevent

from cascade.config import ModelConfig
from cascade.providers import ChatProvider


def main() -> None:
    url, calls, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    provider = ChatProvider(ModelConfig(name="fast", base_url=url, model="fast"))
    stop = time.monotonic() + seconds

    def loop(i: int) -> None:
        while time.monotonic() < stop:
            provider.complete([{"role": "user", "content": f"Text {i}: load"}], n=1, max_tokens=16, temperature=0.7,
                              response_format=None, headers={"X-Cascade-Model": "fast"})

    gevent.joinall([gevent.spawn(loop, i) for i in range(calls)])
    provider.close()


if __name__ == "__main__":
    main()
