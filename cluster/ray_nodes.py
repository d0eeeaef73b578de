"""``python -m tunerun.cluster.ray_nodes ADDRESS`` prints how many nodes of that Ray cluster are alive.

The Slurm script polls it until every node has joined, instead of sleeping a fixed time.
"""
from __future__ import annotations

import sys


def main() -> int:
    import ray

    ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False, configure_logging=False)
    print(sum(1 for node in ray.nodes() if node["Alive"]))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
