#!/usr/bin/env python3
"""Wide-block erasure codes for mcdeploy (issue 3): can a larger block k than zfec's 255 bring the overhead down?

Why: with zfec (GF(2^8) Reed-Solomon, k + repairs <= 256) and k = 128, the sender must send each block until the
unluckiest of 1,000 receivers (loss U[0, 5 %]) holds k symbols; that "block floor" alone costs x1.055 over the bound
image / (1 - p_max).  The floor shrinks like 1/sqrt(k), so blocks of ~1,000+ symbols need a code with more than 256
symbols per block.  This script measures the candidates that install here and computes the floor for large k.

Parts (each library optional: a missing one is reported as skipped):

1. zfec at k = 128 (the baseline, n = 256), measured in the same run;
2. reed-solomon-leopard (Rust reed-solomon-simd: Leopard-style FFT Reed-Solomon over GF(2^16), MDS, systematic,
   up to 32768 + 32768 shards) at k in KS: encode with R repair symbols, decode at 5 % loss;
3. RaptorQ (``raptorq`` / ``raptorq-wheel``: same ``raptorq`` module, cberner's Rust crate) at k in KS: encode,
   decode at 5 % loss, and repair efficiency (symbols needed beyond k at 10 % loss);
4. pyraptorq (ctypes binding of a C++ RaptorQ) and reedsolo (pure Python, c_exp=16) where installed, briefly;
5. the block floor for k in FLOOR_KS: exact expectation E[max_i (k + NegBin_i)] (the same formula as
   ``controller.simulate.block_code_floor``) checked by a numpy Monte-Carlo, per 256 MiB image and 1,000 receivers
   with p_i ~ U[0, 5 %], as payload and wire (v1: 24-byte header + 4-byte CRC; v2 sealed: 40-byte header +
   16-byte tag) overhead against image / (1 - 0.05); RaptorQ's own reception overhead added as a variant.

Throughput is MB/s (10^6 bytes/s) of source data, single thread, median of repetitions within a time budget.

Usage: ``python -m bench.fec_wide [--json] [--quick] [--symbol-size 1392]`` from the repository root, in any venv
that has numpy and some of: zfec, reed-solomon-leopard, raptorq (or raptorq-wheel), pyraptorq, reedsolo.  With
``--json`` the last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

import numpy as np

try:
    import zfec
except ImportError:  # pragma: no cover - depends on the environment
    zfec = None
try:
    import reed_solomon_leopard as rsl
except ImportError:  # pragma: no cover
    rsl = None
try:
    import raptorq
except ImportError:  # pragma: no cover
    raptorq = None
try:
    import pyraptorq
except Exception:  # pragma: no cover - pkg_resources may be missing too
    pyraptorq = None
try:
    import reedsolo
except ImportError:  # pragma: no cover
    reedsolo = None

MB = 1_000_000
MIB = 1024 * 1024
KS = (128, 512, 1024, 2048)
FLOOR_KS = (128, 224, 512, 1024, 2048, 4096)
REPAIR_FRACTION = 0.05
LOSS = 0.05
RECEIVERS = 1000
P_MAX = 0.05
IMAGE = 256 * MIB
V1_OVERHEAD = 24 + 4  # header + CRC-32
V2_OVERHEAD = 40 + 16  # sealed header + Poly1305 tag


def run_timed(fn: Callable[[Any], Any], setup: Callable[[], Any] | None, budget: float, min_reps: int = 3,
              max_reps: int = 100) -> float:
    """Median seconds of fn(setup()) (setup not timed), repeated until ``budget`` seconds are spent."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget and len(times) < max_reps):
        arg = setup() if setup is not None else None
        t0 = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def mb_s(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / MB, 1) if seconds > 0 else float("inf")


def version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def lost_ids(k: int, loss: float, rng: random.Random) -> list[int]:
    """Exactly round(loss * k) distinct source ids (a receiver at ``loss`` misses about that many)."""
    return sorted(rng.sample(range(k), max(1, round(loss * k))))


# --------------------------------------------------------------------------------------------------------- codecs
def bench_zfec(k: int, size: int, budget: float, rng: random.Random) -> dict[str, Any]:
    n = 256
    src = [os.urandom(size) for _ in range(k)]
    r = math.ceil(REPAIR_FRACTION * k)
    enc, dec = zfec.Encoder(k, n), zfec.Decoder(k, n)
    t_enc = run_timed(lambda _: enc.encode(src, tuple(range(k, k + r))), None, budget)
    lost = lost_ids(k, LOSS, rng)
    rep = enc.encode(src, tuple(range(k, k + len(lost))))
    keep = [i for i in range(k) if i not in set(lost)]
    blocks = [src[i] for i in keep] + rep
    nums = keep + list(range(k, k + len(lost)))
    out = dec.decode(blocks, nums)
    ok = list(out) == src
    t_dec = run_timed(lambda _: dec.decode(blocks, nums), None, budget)
    return {"k": k, "n_max": n, "repair": r, "encode_mb_s": mb_s(k * size, t_enc),
            "decode_5pct_mb_s": mb_s(k * size, t_dec), "bit_exact": ok, "extra_symbols_needed": 0}


def bench_rsl(k: int, size: int, budget: float, rng: random.Random) -> dict[str, Any]:
    """reed-solomon-leopard: encode() makes all R repair symbols of a block at once (their values depend on
    next_pow2(R), so sender and receiver must agree on one R per session); decode() needs exactly k."""
    src = [os.urandom(size) for _ in range(k)]
    out: dict[str, Any] = {"k": k}
    r5 = math.ceil(REPAIR_FRACTION * k)
    r_sess = min(k, max(64, next_pow2(k // 4)))  # a session-wide R: k/4 repair ids (>= 64), see mcproto/fec_wide.py
    for label, r in (("r5pct", r5), ("r_session", r_sess), ("r_k", k)):
        t = run_timed(lambda _, r=r: rsl.encode(src, r), None, budget)
        out[f"encode_{label}_mb_s"] = mb_s(k * size, t)
        out[f"repair_{label}"] = r
    # one repair symbol on demand = a whole-block encode: cost per fresh symbol when asking for 16 at a time
    out["encode_mb_s"] = out["encode_r_session_mb_s"]
    # decode at 5 % source loss with R = r_sess
    rec = rsl.encode(src, r_sess)
    lost = lost_ids(k, LOSS, rng)
    lost_set = set(lost)
    original = {i: src[i] for i in range(k) if i not in lost_set}
    picks = rng.sample(range(r_sess), len(lost))
    recovery = {j: rec[j] for j in picks}
    restored = rsl.decode(k, r_sess, original, recovery)
    out["bit_exact"] = sorted(restored) == lost and all(restored[i] == src[i] for i in lost)
    t = run_timed(lambda _: rsl.decode(k, r_sess, original, recovery), None, budget)
    out["decode_5pct_mb_s"] = mb_s(k * size, t)
    # worst case for the decoder: only repair symbols used for as many as R allows
    many = min(r_sess, k)
    lost_many = rng.sample(range(k), many)
    orig_many = {i: src[i] for i in range(k) if i not in set(lost_many)}
    rec_many = dict(enumerate(rec[:many]))
    t = run_timed(lambda _: rsl.decode(k, r_sess, orig_many, rec_many), None, budget)
    out["decode_max_loss_mb_s"] = mb_s(k * size, t)
    out["decode_max_loss_fraction"] = round(many / k, 3)
    # per-call decode cost hardly depends on how many are lost (an FFT over the whole codeword)
    out["n_max"] = k + r_sess
    out["extra_symbols_needed"] = 0
    out["systematic"] = True  # the source symbols are sent as they are; only recovery shards are computed
    return out


def rq_packets(data: bytes, size: int, repair: int) -> list[bytes]:
    enc = raptorq.Encoder.with_defaults(data, size)
    return enc.get_encoded_packets(repair)


def bench_raptorq(k: int, size: int, budget: float, rng: random.Random, trials: int) -> dict[str, Any]:
    data = os.urandom(k * size)
    r5 = math.ceil(REPAIR_FRACTION * k)
    t_enc = run_timed(lambda _: rq_packets(data, size, r5), None, budget)
    pk = rq_packets(data, size, k // 2 + 16)
    sbn_ok = all(p[0] == 0 for p in pk)  # one source block: our block = RaptorQ source block
    systematic = all(pk[i][4:] == data[i * size:(i + 1) * size] for i in range(k))

    def feed(order: list[int]) -> tuple[bytes | None, int]:
        dec = raptorq.Decoder.with_defaults(len(data), size)
        for n, i in enumerate(order, 1):
            res = dec.decode(pk[i])
            if res is not None:
                return res, n
        return None, len(order)

    def arrival(loss: float) -> list[int]:
        return [i for i in range(len(pk)) if rng.random() >= loss]

    order5 = arrival(LOSS)
    res, _ = feed(order5)
    ok = res == data
    t_dec = run_timed(lambda _: feed(order5), None, budget)
    extras: list[int] = []
    for _ in range(trials):
        _, n = feed(arrival(0.10))
        extras.append(n - k)
    hist = {str(e): extras.count(e) for e in sorted(set(extras))}
    return {"k": k, "n_max": 2**24, "repair": r5, "encode_mb_s": mb_s(k * size, t_enc),
            "decode_5pct_mb_s": mb_s(k * size, t_dec), "bit_exact": ok, "systematic": systematic,
            "single_source_block": sbn_ok, "extra_symbols_hist_10pct_loss": hist,
            "extra_symbols_mean": round(statistics.fmean(extras), 3), "trials": trials}


def bench_pyraptorq(k: int, size: int, budget: float) -> dict[str, Any]:
    data = os.urandom(k * size)
    r5 = math.ceil(REPAIR_FRACTION * k)

    def encode(_: Any) -> list[bytes]:
        enc = pyraptorq.Encoder(data, size)
        return [enc.gen_symbol(i) for i in range(k + r5)]

    t_enc = run_timed(encode, None, budget, min_reps=1, max_reps=5)
    syms = encode(None)
    systematic = all(syms[i] == data[i * size:(i + 1) * size] for i in range(k))
    lost = set(lost_ids(k, LOSS, random.Random(7)))
    recv = [i for i in range(k + r5) if i not in lost]

    def decode(_: Any) -> bytes | None:
        dec = pyraptorq.Decoder(k, size, len(data))
        for i in recv:
            dec.add_symbol(i, syms[i])
        return dec.try_decode()

    res = decode(None)
    t_dec = run_timed(decode, None, budget, min_reps=1, max_reps=5)
    return {"k": k, "encode_mb_s": mb_s(k * size, t_enc), "decode_5pct_mb_s": mb_s(k * size, t_dec),
            "bit_exact": res == data, "systematic": systematic}


def bench_reedsolo(k: int, size: int) -> dict[str, Any]:
    """One GF(2^16) codeword (one 16-bit column of a block) in pure Python, extrapolated to size/2 columns."""
    r5 = math.ceil(REPAIR_FRACTION * k)
    rs = reedsolo.RSCodec(r5, nsize=k + r5, c_exp=16)
    msg = [random.randrange(65536) for _ in range(k)]
    t0 = time.perf_counter()
    cw = rs.encode(msg)
    t_enc = time.perf_counter() - t0
    cw = list(cw)
    era = random.Random(3).sample(range(k), min(r5, round(LOSS * k)))
    for i in era:
        cw[i] = 0
    t0 = time.perf_counter()
    dec = rs.decode(cw, erase_pos=era)[0]
    t_dec = time.perf_counter() - t0
    columns = size // 2
    return {"k": k, "encode_mb_s": mb_s(k * size, t_enc * columns), "decode_5pct_mb_s": mb_s(k * size, t_dec * columns),
            "bit_exact": list(dec) == msg, "note": "one codeword timed, extrapolated to symbol_size/2 codewords"}


# --------------------------------------------------------------------------------------------------------- floor
def floor_exact(p: np.ndarray, k: int, tol: float = 1e-10, extra_pmf: tuple[float, ...] = (1.0,)) -> float:
    """E[max_i T_i]: transmissions of one block until every receiver holds what it needs to decode.

    T_i = k + e + F, F ~ NegBin(k + e, 1 - p_i) failures before the (k + e)-th success, where e (the code's
    reception overhead: 0 for an MDS code) has pmf ``extra_pmf``.  The expectation is sum_t P(max > t).
    """
    p = p[p > 0]
    if p.size == 0:
        return float(k)
    logq, logp = np.log1p(-p), np.log(p)
    need = [(k + e, w) for e, w in enumerate(extra_pmf) if w > 0]
    pmfs = [np.zeros(p.size) for _ in need]  # running CDFs of T_i for each e
    expected = float(k)  # max >= k always: sum over t < k of P(max > t) = k
    for t in range(k, k + 200_000):
        cdf = np.zeros(p.size)
        for j, (n, w) in enumerate(need):
            f = t - n  # failures when the n-th success is transmission t + 1... P(T = t) with T counted from 1
            if f >= 0:
                logpmf = math.lgamma(n + f) - math.lgamma(n) - math.lgamma(f + 1) + n * logq + f * logp
                pmfs[j] = np.minimum(1.0, pmfs[j] + np.exp(logpmf))
            cdf += w * pmfs[j]
        tail = 1.0 - float(np.exp(np.sum(np.log(np.maximum(cdf, 1e-300)))))  # P(max_i T_i > t)
        if tail < tol:
            break
        expected += tail
    return expected


def floor_mc(p: np.ndarray, k: int, blocks: int, rng: np.random.Generator) -> float:
    """Monte-Carlo of the MDS case: per block, max over receivers of the transmissions until k arrive."""
    return float((k + rng.negative_binomial(k, 1 - p, size=(blocks, p.size)).max(axis=1)).mean())


# RaptorQ's reception overhead per RFC 6330's figures: decoding fails with k + e symbols with probability about
# 10^-2 * 10^-2e, so P(e = 0) = 0.99, P(e = 1) = 0.0099, P(e = 2) = 0.000099, P(e = 3) ~ 10^-6.
RFC6330_EXTRA_PMF = (0.99, 0.0099, 0.000099, 0.000001)


def overhead_table(symbol_size: int, ks: tuple[int, ...], mc_blocks: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    p = rng.uniform(0, P_MAX, RECEIVERS)
    p[-1] = P_MAX  # the simulator's real receivers span the range up to p_max exactly
    total_symbols = math.ceil(IMAGE / symbol_size)
    bound = IMAGE / (1 - P_MAX)
    v1 = (symbol_size + V1_OVERHEAD) / symbol_size
    v2 = (symbol_size + V2_OVERHEAD) / symbol_size
    rows = []
    for k in ks:
        full, last = divmod(total_symbols, k)
        sizes = {k: full} | ({last: 1} if last else {})
        fl = sum(c * floor_exact(p, kk) for kk, c in sizes.items())
        rq = sum(c * floor_exact(p, kk, extra_pmf=RFC6330_EXTRA_PMF) for kk, c in sizes.items())
        payload = fl * symbol_size / bound
        rq_payload = rq * symbol_size / bound
        rows.append({
            "k": k, "blocks": full + bool(last), "floor_per_block": round(floor_exact(p, k), 2),
            "mc_floor_per_block": round(floor_mc(p, k, mc_blocks, rng), 2), "payload_vs_bound": round(payload, 5),
            "wire_v1_vs_bound": round(payload * v1, 5), "wire_v2_vs_bound": round(payload * v2, 5),
            "raptorq_payload_vs_bound": round(rq_payload, 5), "raptorq_wire_v1_vs_bound": round(rq_payload * v1, 5),
        })
    return rows


# --------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--quick", action="store_true", help="shorter time budgets and fewer trials")
    ap.add_argument("--symbol-size", type=int, default=1392, help="bytes per symbol (default 1392: v2 in 1500 MTU)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-floor", action="store_true", help="skip the block-floor table")
    args = ap.parse_args(argv)
    size = args.symbol_size
    budget = 0.3 if args.quick else 1.0
    rng = random.Random(args.seed)
    res: dict[str, Any] = {
        "symbol_size": size, "python": platform.python_version(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "versions": {d: version(d) for d in ("zfec", "reed-solomon-leopard", "raptorq", "raptorq-wheel", "pyraptorq",
                                             "reedsolo", "numpy")},
        "skipped": [],
    }

    def say(msg: str) -> None:
        print(msg, flush=True)

    if zfec is not None:
        res["zfec"] = [bench_zfec(k, size, budget, rng) for k in (128, 224)]
        for r in res["zfec"]:
            say(f"zfec       k={r['k']:5d} encode {r['encode_mb_s']:8.1f} MB/s"
                f"  decode@5% {r['decode_5pct_mb_s']:8.1f} MB/s  exact={r['bit_exact']}")
    else:
        res["skipped"].append("zfec: not installed")
    if rsl is not None:
        res["reed_solomon_leopard"] = []
        for k in KS:
            r = bench_rsl(k, size, budget, rng)
            res["reed_solomon_leopard"].append(r)
            say(f"rs-leopard k={k:5d} encode R={r['repair_r5pct']}: {r['encode_r5pct_mb_s']:8.1f}"
                f"  R={r['repair_r_session']}: {r['encode_r_session_mb_s']:8.1f}  R=k: {r['encode_r_k_mb_s']:8.1f} MB/s"
                f"  decode@5% {r['decode_5pct_mb_s']:8.1f}  @{r['decode_max_loss_fraction']:.0%} "
                f"{r['decode_max_loss_mb_s']:8.1f} MB/s  exact={r['bit_exact']}")
    else:
        res["skipped"].append("reed-solomon-leopard: not installed")
    if raptorq is not None:
        res["raptorq"] = []
        for k in KS:
            trials = max(10, (100 if args.quick else 400) * 128 // k)
            r = bench_raptorq(k, size, budget, rng, trials)
            res["raptorq"].append(r)
            say(f"raptorq    k={k:5d} encode {r['encode_mb_s']:8.1f} MB/s  decode@5% {r['decode_5pct_mb_s']:8.1f} MB/s"
                f"  extra symbols {r['extra_symbols_hist_10pct_loss']} (mean {r['extra_symbols_mean']})"
                f"  exact={r['bit_exact']} systematic={r['systematic']}")
    else:
        res["skipped"].append("raptorq: not installed")
    if pyraptorq is not None:
        res["pyraptorq"] = []
        for k in (128, 1024):
            r = bench_pyraptorq(k, size, budget)
            res["pyraptorq"].append(r)
            say(f"pyraptorq  k={k:5d} encode {r['encode_mb_s']:8.1f} MB/s  decode@5% {r['decode_5pct_mb_s']:8.1f} MB/s"
                f"  exact={r['bit_exact']} systematic={r['systematic']}")
    else:
        res["skipped"].append("pyraptorq: not installed")
    if reedsolo is not None:
        r = bench_reedsolo(1024, size)
        res["reedsolo_gf65536"] = r
        say(f"reedsolo   k= 1024 encode {r['encode_mb_s']:8.3f} MB/s  decode@5% {r['decode_5pct_mb_s']:8.3f} MB/s "
            f"(pure Python, extrapolated)")
    else:
        res["skipped"].append("reedsolo: not installed")

    if not args.no_floor:
        rows = overhead_table(size, FLOOR_KS, 60 if args.quick else 200, args.seed)
        res["floor"] = {"receivers": RECEIVERS, "loss": [0, P_MAX], "p_max": P_MAX, "image_bytes": IMAGE,
                        "v1_bytes_per_symbol": V1_OVERHEAD, "v2_bytes_per_symbol": V2_OVERHEAD,
                        "raptorq_extra_pmf": RFC6330_EXTRA_PMF, "rows": rows}
        say(f"\nblock floor, {RECEIVERS} receivers p~U[0,{P_MAX:.0%}], {IMAGE // MIB} MiB, symbol {size} B:")
        say(f"{'k':>6} {'floor/blk':>10} {'MC':>10} {'payload':>9} {'wire v1':>9} {'wire v2':>9} {'RQ v1':>9}")
        for r in rows:
            say(f"{r['k']:>6} {r['floor_per_block']:>10} {r['mc_floor_per_block']:>10} {r['payload_vs_bound']:>9}"
                f" {r['wire_v1_vs_bound']:>9} {r['wire_v2_vs_bound']:>9} {r.get('raptorq_wire_v1_vs_bound', '-'):>9}")
    for s in res["skipped"]:
        say(f"skipped: {s}")
    if args.json:
        print(json.dumps(res, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
