#!/usr/bin/env python
"""What the secure round's cryptography costs a client and the server (common/secagg.py
alone, no transport), for a cohort of K of the default model's size: round keys,
sharing, receiving, masking, bit-packing, the rotation, the server's unmasking.
    usage: .venv/bin/python scripts/secagg-crypto-bench.py [K]     (from the repository root)
"""

import sys
import time

import numpy as np

from common import ddp
from common.secagg import Advert, Params, Participant, View, unmask


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(k: int, dim: int = 39_700) -> None:
    ps, t_keys = timed(lambda: [Participant(cid=i, server_round=1, bits=16) for i in range(k)])
    adverts = [Advert(i, p.advertise(), 600) for i, p in enumerate(ps)]
    params = Params(server_round=1, threshold=k * 9 // 10, bits=16, scale=1000.0, clip=0.2,
                    dim=dim, noise_multiplier=8.0)
    view = View(params, tuple(adverts))
    boxes, t_share = timed(lambda: {i: p.share(view) for i, p in enumerate(ps)})
    _, t_recv = timed(lambda: [p.receive({i: boxes[i][j] for i in range(k)})
                               for j, p in enumerate(ps)])
    release = np.zeros(ddp.padded_dim(dim), dtype=np.int64)
    masked, t_mask = timed(lambda: {i: p.masked(release) for i, p in enumerate(ps)})
    _, t_pack = timed(lambda: [ddp.pack(v, 16) for v in masked.values()])
    rotation = view.rotation()
    _, t_rot = timed(lambda: rotation.inverse(rotation.forward(np.ones(dim))))
    for p in ps:
        p.confirm(list(range(k)))
    revealed = [p.reveal(list(range(k))) for p in ps]
    total, t_unmask = timed(lambda: unmask(masked, revealed, {a.partition: a.keys for a in adverts},
                                           server_round=1, bits=16, threshold=params.threshold))
    ms = 1e3
    print(f"K={k}, {dim} parameters, per client: keys {t_keys / k * ms:.1f} ms, share "
          f"{t_share / k * ms:.1f} ms, receive {t_recv / k * ms:.1f} ms, mask "
          f"{t_mask / k * ms:.1f} ms, pack {t_pack / k * ms:.1f} ms; rotation forward and "
          f"back {t_rot * ms:.1f} ms; server unmask {t_unmask * ms:.1f} ms; the sum of zero "
          f"releases is zero: {not total.any()}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
