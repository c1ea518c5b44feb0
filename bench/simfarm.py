"""`cascade sim` in several processes listening on one port (SO_REUSEPORT), so that a benchmark's model server
has as many interpreters as it needs and is never what limits the rate:

    python -m bench.simfarm --port 8900 --config sim.yaml      # run it K times: the kernel spreads connections

Each child serves as ``cascade sim --reuse-port`` does. Each process keeps its own counters, so ``/stats`` of
the shared port answers for one process only: measure the sims by their CPU instead.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from bench.harness import Scratch

__all__ = ["SimFarm", "start"]


@dataclass(frozen=True)
class SimFarm:
    """``count`` sim processes behind one URL."""

    url: str
    pids: list[int]


def start(box: Scratch, models: dict[str, dict[str, Any]], count: int) -> SimFarm:  # Any: SimModel fields
    """Start ``count`` sims serving ``models`` on one free port; returns once every one of them listens."""
    from bench.harness import free_port

    path = box.workdir / "simfarm.yaml"
    path.write_text(yaml.safe_dump({"seed": 1, "models": models, "unknown_models": "default"}))
    port = free_port()
    names = [f"simfarm-{i}" for i in range(count)]
    procs = [box.start([sys.executable, "-m", "bench.simfarm", "--port", str(port), "--config", str(path)], name)
             for name in names]

    box.wait_logged(dict(zip(names, procs, strict=True)), "listening on", 30, f"{count} sims on port {port}")
    return SimFarm(f"http://127.0.0.1:{port}/v1", [p.pid for p in procs])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.simfarm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--config", required=True, help="sim config (YAML), as for `cascade sim --config`")
    args = parser.parse_args(argv)
    from cascade import sim

    sim.serve(host=args.host, port=args.port, config_path=args.config, seed=None, replay=None, reuse_port=True)


if __name__ == "__main__":
    main()
