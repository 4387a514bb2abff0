"""Fused-feature read speed of CacheReader.topk on a synthetic cache (20000 text rows, k=11, C=768).

Run from the repository root: `.venv/bin/python benchmarks/cache_read_speed.py` (writes under .work/bench/).
"""

import os
import shutil
import subprocess
import time

import numpy as np

from mcad_cache.cache import CacheLayout, CacheWriter, open_cache

rng = np.random.default_rng(0)
Ni, Nt, K, C, D = 4000, 20000, 11, 768, 256
block = rng.normal(size=(1024, K, C)).astype(np.float32)
for fd in ("fp16", "int8"):
    p = f".work/bench/{fd}.zarr"
    os.makedirs(".work/bench", exist_ok=True)
    shutil.rmtree(p, ignore_errors=True)
    lay = CacheLayout(kind="single", num_images=Ni, num_texts=Nt, emb_dim=D, k=K, fused_dim=C, fused_dtype=fd)
    w = CacheWriter.create(p, layout=lay, manifest={"fingerprint": {}, "logit_scale": 100.0})
    t = time.time()
    for a in range(0, Nt, 1024):
        b = min(a + 1024, Nt)
        w.write_fused("t2i", a, block[: b - a])
        w.write("t2i_idx", a, rng.integers(0, Ni, size=(b - a, K)).astype(np.int32))
    wt = time.time() - t
    w.mark_complete()
    r = open_cache(p)
    rows = rng.integers(0, Nt, size=(41, 64))
    r.topk("t2i", rows[0])
    t = time.time()
    for rr in rows[1:]:
        out = r.topk("t2i", rr)
    dt = (time.time() - t) / 40
    t = time.time()
    for rr in rows[1:]:
        r.topk("t2i", rr, fused=False)
    dn = (time.time() - t) / 40
    size = subprocess.run(["du", "-sh", p], capture_output=True, text=True).stdout.split()[0]
    print(
        f"{fd}: write {wt / Nt * 1000:.2f} ms/row; topk batch of 64 rows: {dt * 1000:.1f} ms with fused "
        f"{out['fused_cls'].shape}, {dn * 1000:.2f} ms without; store {size}"
    )
