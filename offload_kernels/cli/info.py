"""``offload-kernels info``: how the package was built and what hardware it sees."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args: argparse.Namespace) -> int:
    from offload_kernels import info

    data = info()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"torch {data['torch']} (CUDA {data['torch_cuda']}), triton {data['triton']}")
    print(f"native extension: {data['extension']}")
    if data.get("devices"):
        for d in data["devices"]:
            print(f"  cuda:{d['index']} {d['name']}  {d['total_memory'] / 2**30:.1f} GiB  "
                  f"sm_{d['compute_capability'].replace('.', '')}  {d['multiprocessors']} SMs")
    else:
        print(f"  no CUDA device: {data.get('device_error')}")
    return 0
