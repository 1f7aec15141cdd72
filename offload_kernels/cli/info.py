"""``offload-kernels info``: how the package was built and what hardware it sees."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--no-measure", action="store_true",
                        help="skip measuring the link, memory and matmul ceilings (a few seconds)")


def run(args: argparse.Namespace) -> int:
    from offload_kernels import info

    data = info()
    if not args.no_measure:
        from offload_kernels.model import measure_hardware

        hw = measure_hardware()
        data["measured"] = {"device": hw.device, "link_GBps": hw.link_bytes_per_s / 1e9,
                            "memory_GBps": hw.hbm_bytes_per_s / 1e9, "matmul_TFLOPs": hw.matmul_flops / 1e12}
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
    m = data.get("measured")
    if m:
        what = ("pinned host->device copy", "device memory copy") if m["device"].startswith("cuda") else \
            ("host memcpy (no GPU)", "host memory copy")
        print(f"measured on {m['device']}: link {m['link_GBps']:.1f} GB/s ({what[0]}), memory "
              f"{m['memory_GBps']:.0f} GB/s ({what[1]}), matmul {m['matmul_TFLOPs']:.2f} TFLOP/s")
    return 0
