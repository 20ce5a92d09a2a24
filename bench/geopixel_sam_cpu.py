"""GeoPixel's SAM-2 mask head at its real size (Hiera-L, 256-wide heads, text_hidden_fcs 4096) on the CPU.

Random weights loaded the way the real checkpoint is (module built on ``meta``, tensors assigned
in the target dtype by ``sam2.load_state``), one 1024 x 1024 tile, one ``[SEG]``. Each dtype runs in
a process of its own so that its peak resident memory (ru_maxrss) is its own:

    python bench/geopixel_sam_cpu.py [--dtype float32 bfloat16] [--repeat 2]

Prints one JSON line per dtype: seconds to load, to encode the tile (each repeat; wall and CPU
time of all threads), to decode the mask, and the peak resident memory in MiB (and after imports).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def measure(dtype_name: str, repeat: int) -> dict:
    """Load, encode ``repeat`` times and decode once in this process; the figures."""
    import numpy as np
    import torch

    from geochat_qgis.core.models.geopixel.sam2 import GeoPixelSam2, checkpoint_shapes, load_state
    from geochat_qgis.core.models.geopixel.sam2_config import Sam2Config

    dtype = getattr(torch, dtype_name)
    config = Sam2Config()
    base_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    with torch.device("meta"):
        module = GeoPixelSam2(config)
    generator = torch.Generator().manual_seed(0)
    tensors = {name: (torch.randn(shape, generator=generator) * 0.02).to(dtype)
               for name, shape in checkpoint_shapes(config).items()}
    load_state(module, tensors)
    del tensors
    load_s = time.perf_counter() - start
    tile = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    encode_s, encode_cpu_s = [], []
    for _ in range(repeat):
        start, cpu = time.perf_counter(), time.process_time()
        features = module.encode_tiles([tile])
        encode_s.append(round(time.perf_counter() - start, 2))
        encode_cpu_s.append(round(time.process_time() - cpu, 2))
    start = time.perf_counter()
    masks = module.decode(features, 0, torch.randn(1, config.hidden_size))[2]
    decode_s = time.perf_counter() - start
    assert masks.shape == (1, 1024, 1024)
    return {"dtype": dtype_name, "threads": torch.get_num_threads(), "load_s": round(load_s, 2),
            "encode_s": encode_s, "encode_cpu_s": encode_cpu_s, "decode_s": round(decode_s, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "rss_after_imports_mib": round(base_mib),
            "params_m": round(sum(p.numel() for p in module.parameters()) / 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=2, help="encodes of the tile (the first warms up)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.dtype[0], args.repeat)))
        return
    for dtype in args.dtype:
        subprocess.run([sys.executable, __file__, "--child", "--dtype", dtype, "--repeat", str(args.repeat)],
                       check=True)


if __name__ == "__main__":
    main()
