#!/usr/bin/env python3
"""Erasure-code library benchmark for mcdeploy: ``raptorq`` (RFC 6330 fountain code) vs ``zfec`` (Reed-Solomon).

Model: an image is cut into blocks; each block is sent as k source symbols plus repair symbols, and a receiver needs
any k (RaptorQ: k plus a tiny overhead) distinct symbols of a block.  Receivers report "block b: m more symbols" and
the sender sends m *fresh* repair symbols, so the cost of generating repair symbols later, on demand, matters too.

Measured on random data for symbol sizes 1,400 (MTU 1500) and 8,800 bytes (jumbo frames):

1. encode throughput (source + ~5 % repair symbols) and the cost of extra repair symbols generated on demand;
2. decode throughput at 0/1/5/10/20 % random loss (0 % = all source symbols arrive: the fast path);
3. RaptorQ repair efficiency: how many symbols beyond k a receiver needs (zfec: exactly k);
4. heap memory held per block (glibc mallinfo2; Linux only), whether the binding releases the GIL, and, for
   context, what one Python ``sendto`` of a datagram costs (loopback only).

Usage: ``python bench/fec_choice.py [--json] [--quick] [--trials N]``.  The libraries are optional: install them into
any venv (``pip install raptorq zfec``); a missing one is skipped with a message.  With ``--json`` the last line of
output is one JSON object holding every figure.  Runtime is well under two minutes on a 2-core machine.

raptorq's Python API (2.0.0) is only ``Encoder.with_defaults(data, symbol_size)``,
``Encoder.get_encoded_packets(repair_count)`` (all k source packets, ESI 0..k-1, then repair ESIs
k..k+repair_count-1; each packet = 4-byte big-endian payload id [SBN:8 | ESI:24] + symbol),
``Decoder.with_defaults(length, symbol_size)`` and ``Decoder.decode(packet)`` (returns the whole object once
decodable, else None).  There is no ``repair_packets(start, count)`` in Python, so fresh repair symbols are had by
asking for more and slicing off the tail; the encoder keeps its intermediate symbols, so that costs one cheap
XOR-combination per repair symbol plus re-emitting the k source packets.  Both ways are measured below ("fresh16"
and "pool").
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import random
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

try:
    import raptorq
except ImportError:  # pragma: no cover - depends on the environment
    raptorq = None
try:
    import zfec
except ImportError:  # pragma: no cover - depends on the environment
    zfec = None

KIB = 1024
MIB = 1024 * 1024
MB = 1_000_000  # throughput is reported in MB/s (10^6 bytes per second) of source data
SYMBOL_SIZES = (1400, 8800)
RQ_BLOCKS = (64 * KIB, 256 * KIB, 1 * MIB, 4 * MIB)
ZFEC_KS = (32, 64, 128)
ZFEC_N = 256  # zfec (GF(2^8) Reed-Solomon): k <= n <= 256
LOSSES = (0.0, 0.01, 0.05, 0.10, 0.20)
REPAIR_FRACTION = 0.05
FRESH = 16  # repair symbols asked for by one "block b: m more symbols" request in the on-demand figures
RQ_OVERHEAD_BLOCK = 1 * MIB
RQ_OVERHEAD_LOSS = 0.10


# --------------------------------------------------------------------------------------------------------- helpers
class Timer:
    """Repeat a measurement until a time budget is spent; report the median (or the mean, for mixed cases)."""

    def __init__(self, budget: float) -> None:
        self.budget = budget

    def run(
        self,
        fn: Callable[[Any], Any],
        setup: Callable[[], Any] | None = None,
        min_reps: int = 3,
        max_reps: int = 200,
        mean: bool = False,
    ) -> tuple[float, Any]:
        times: list[float] = []
        result: Any = None
        start = time.perf_counter()
        while len(times) < min_reps or (time.perf_counter() - start < self.budget and len(times) < max_reps):
            arg = setup() if setup is not None else None
            t0 = time.perf_counter()
            result = fn(arg)
            times.append(time.perf_counter() - t0)
        return (statistics.fmean(times) if mean else statistics.median(times)), result


def mb_s(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / MB, 1) if seconds > 0 else float("inf")


MALLINFO2_FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks")
MALLINFO2_FIELDS += ("uordblks", "fordblks", "keepcost")


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (all fields size_t)."""

    _fields_ = [(name, ctypes.c_size_t) for name in MALLINFO2_FIELDS]


def _load_mallinfo2() -> Callable[[], _MallInfo2] | None:
    try:
        libc = ctypes.CDLL(None)
        fn = libc.mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError, TypeError):
        return None
    fn.restype = _MallInfo2
    fn.argtypes = []
    return fn


_MALLINFO2 = _load_mallinfo2()


def heap_in_use() -> int | None:
    """Bytes handed out by malloc (glibc mallinfo2: uordblks + hblkhd), which also counts Rust and C allocations.

    Unlike RSS it is not hidden by memory that the allocator already holds; None where glibc is not available.
    """
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


def mem_delta_per_item(make: Callable[[], Any], count: int) -> int | None:
    """Average heap growth per object while `count` objects made by `make` are alive."""
    gc.collect()
    before = heap_in_use()
    if before is None:
        return None
    keep = [make() for _ in range(count)]
    after = heap_in_use() or before
    del keep
    gc.collect()
    return max(0, after - before) // count


def thread_speedup(work: Callable[[], Any], units: int, rounds: int = 3) -> float:
    """Wall-time speedup of running `units` calls of `work` on two threads instead of one (2.0 = GIL released).

    Best of `rounds`, since a 2-core machine is easily disturbed.
    """

    def loop(n: int) -> None:
        for _ in range(n):
            work()

    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        loop(units)
        single = time.perf_counter() - t0
        threads = [threading.Thread(target=loop, args=(units // 2,)) for _ in range(2)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        best = max(best, single / (time.perf_counter() - t0))
    return round(best, 2)


def dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def survivors(count: int, loss: float, rng: random.Random) -> list[int]:
    """Indices (in transmission order) of the packets that survive independent random loss."""
    return [i for i in range(count) if rng.random() >= loss]


def arrival_order(idx: list[int], k: int, rng: random.Random) -> list[int]:
    """What a receiver gets: the first k survivors in random order, then the later survivors as they come."""
    head = idx[:k]
    rng.shuffle(head)
    return head + idx[k:]


def repairs_for(k: int, loss: float, slack: int) -> int:
    """Repair symbols to send so that k of them (plus `slack`) survive `loss` with high probability."""
    expected_needed = k * loss / (1.0 - loss)
    return math.ceil(expected_needed + 4.0 * math.sqrt(k * loss + 1.0) + slack)


# --------------------------------------------------------------------------------------------------------- raptorq
def rq_esi(packet: bytes) -> int:
    return int.from_bytes(packet[1:4], "big")


def bench_raptorq_block(timer: Timer, symbol: int, block: int, rng: random.Random) -> dict[str, Any]:
    data = os.urandom(block)
    k = math.ceil(block / symbol)
    r5 = max(1, math.ceil(k * REPAIR_FRACTION))
    row: dict[str, Any] = {"symbol_size": symbol, "block_bytes": block, "k": k, "repair_5pct": r5}

    # 1. encode: Encoder construction (solves for the intermediate symbols) + emitting k + 5 % packets.
    t_init, enc = timer.run(lambda _: raptorq.Encoder.with_defaults(data, symbol))
    t_all, pkts = timer.run(lambda _: raptorq.Encoder.with_defaults(data, symbol).get_encoded_packets(r5))
    assert len(pkts) == k + r5 and all(p[0] == 0 for p in pkts), "expected one source block per encoder"
    first_repair = rq_esi(pkts[k])  # raptorq 2.0.0: repair symbol r (0-based) has ESI k + r
    row |= {
        "first_repair_esi": first_repair,
        "encoder_init_ms": round(t_init * 1e3, 3),
        "encode_ms": round(t_all * 1e3, 3),
        "encode_mb_s": mb_s(block, t_all),
    }

    # 1b. on-demand repair symbols from a live encoder.
    big = max(k, 64)
    t0, _ = timer.run(lambda _: enc.get_encoded_packets(0))
    tb, _ = timer.run(lambda _: enc.get_encoded_packets(big))
    row["repair_marginal_us"] = round(max(0.0, tb - t0) / big * 1e6, 2)  # per extra repair symbol in one call
    row["source_reemit_us"] = round(t0 * 1e6, 1)  # emitting the k source packets again (paid on every call)
    already = k // 4  # fresh symbols for a later pass: repairs [already, already+FRESH)
    tf, fresh = timer.run(lambda _: enc.get_encoded_packets(already + FRESH)[-FRESH:])
    assert rq_esi(fresh[0]) == first_repair + already
    row["fresh16_us_per_symbol"] = round(tf / FRESH * 1e6, 2)

    def pool_serve(_: Any) -> int:
        # Sender-side cache: grow the repair pool geometrically, serve FRESH-symbol requests from it.
        pool: list[bytes] = enc.get_encoded_packets(r5)[k:]
        served = r5
        while served < k:
            if served + FRESH > len(pool):
                pool = enc.get_encoded_packets(max(2 * len(pool), served + FRESH))[k:]
            served += FRESH
        return served

    tp, served = timer.run(pool_serve, min_reps=2)
    row["pool_us_per_symbol"] = round(tp / served * 1e6, 2)

    # 2. decode with random loss; 0 % loss = all k source symbols arrive (fast path, no solve).
    for loss in LOSSES:
        extra = repairs_for(k, loss, slack=8) if loss > 0 else 0
        sent = enc.get_encoded_packets(extra)

        def setup(sent: list[bytes] = sent, loss: float = loss) -> list[bytes]:
            while True:
                idx = survivors(len(sent), loss, rng)
                if len(idx) >= k + 8 or (loss == 0 and len(idx) == k):
                    break
            return [sent[i] for i in arrival_order(idx[: k + 8], k, rng)]

        def decode(got: list[bytes]) -> tuple[bytes | None, int]:
            dec = raptorq.Decoder.with_defaults(block, symbol)
            for n, p in enumerate(got, 1):
                out = dec.decode(p)
                if out is not None:
                    return out, n
            return None, len(got)

        t_dec, (out, _used) = timer.run(decode, setup, mean=True)
        assert out == data, f"raptorq decode mismatch at {loss:.0%} loss"
        key = f"{round(loss * 100)}"
        row[f"decode_ms_{key}"] = round(t_dec * 1e3, 3)
        row[f"decode_mb_s_{key}"] = mb_s(block, t_dec)
    # Fast path?  All k source symbols vs. k-1 source symbols + 1 repair symbol.
    sent = enc.get_encoded_packets(1)
    t_src, _ = timer.run(decode, lambda: sent[:k])
    t_one, (out, _used) = timer.run(decode, lambda: [*sent[: k - 2], sent[k], sent[k - 2]])
    assert out == data
    row["all_source_decode_us"] = round(t_src * 1e6, 1)
    row["one_missing_decode_us"] = round(t_one * 1e6, 1)
    row["fast_path"] = t_src < 0.5 * t_one
    return row


def raptorq_overhead(symbol: int, trials: int, rng: random.Random) -> dict[str, Any]:
    """Symbols beyond k that a RaptorQ receiver needs, over `trials` random-loss patterns (1 MiB blocks)."""
    block = RQ_OVERHEAD_BLOCK
    data = os.urandom(block)
    k = math.ceil(block / symbol)
    enc = raptorq.Encoder.with_defaults(data, symbol)
    sent = enc.get_encoded_packets(repairs_for(k, RQ_OVERHEAD_LOSS, slack=16))
    extras: list[int] = []
    failures = 0
    t0 = time.perf_counter()
    for _ in range(trials):
        got = [sent[i] for i in arrival_order(survivors(len(sent), RQ_OVERHEAD_LOSS, rng), k, rng)]
        dec = raptorq.Decoder.with_defaults(block, symbol)
        for n, p in enumerate(got, 1):
            out = dec.decode(p)
            if out is not None:
                assert out == data
                extras.append(n - k)
                break
        else:
            failures += 1
    elapsed = time.perf_counter() - t0
    count = len(extras) or 1
    return {
        "symbol_size": symbol,
        "block_bytes": block,
        "k": k,
        "loss": RQ_OVERHEAD_LOSS,
        "trials": trials,
        "mean_extra": round(sum(extras) / count, 4),
        "max_extra": max(extras, default=None),
        "frac_extra_0": round(sum(e == 0 for e in extras) / count, 4),
        "frac_extra_1": round(sum(e == 1 for e in extras) / count, 4),
        "frac_extra_2plus": round(sum(e >= 2 for e in extras) / count, 4),
        "pct_extra_0": round(100 * sum(e == 0 for e in extras) / count, 2),
        "pct_extra_1": round(100 * sum(e == 1 for e in extras) / count, 2),
        "pct_extra_2plus": round(100 * sum(e >= 2 for e in extras) / count, 2),
        "undecoded": failures,
        "seconds": round(elapsed, 2),
    }


def raptorq_memory(symbol: int, block: int) -> dict[str, Any]:
    data = os.urandom(block)
    k = math.ceil(block / symbol)
    count = max(2, min(16, (64 * MIB) // block))
    enc_bytes = mem_delta_per_item(lambda: raptorq.Encoder.with_defaults(data, symbol), count)
    src = raptorq.Encoder.with_defaults(data, symbol).get_encoded_packets(0)[: k - 1]

    def partial_decoder() -> Any:
        dec = raptorq.Decoder.with_defaults(block, symbol)
        for p in src:
            dec.decode(p)
        return dec

    dec_bytes = mem_delta_per_item(partial_decoder, count)
    return {
        "symbol_size": symbol,
        "block_bytes": block,
        "encoder_bytes": enc_bytes,
        "encoder_x_block": round(enc_bytes / block, 2) if enc_bytes is not None else None,
        "decoder_k_minus_1_bytes": dec_bytes,
        "decoder_x_block": round(dec_bytes / block, 2) if dec_bytes is not None else None,
    }


# ------------------------------------------------------------------------------------------------------------ zfec
def bench_zfec_block(timer: Timer, symbol: int, k: int, rng: random.Random) -> dict[str, Any]:
    block = k * symbol
    data = os.urandom(block)
    r5 = max(1, math.ceil(k * REPAIR_FRACTION))
    max_repairs = ZFEC_N - k
    encoder = zfec.Encoder(k, ZFEC_N)
    decoder = zfec.Decoder(k, ZFEC_N)
    row: dict[str, Any] = {
        "symbol_size": symbol,
        "k": k,
        "block_bytes": block,
        "repair_5pct": r5,
        "max_repairs": max_repairs,
    }

    def split(_: Any = None) -> list[bytes]:
        return [data[i * symbol : (i + 1) * symbol] for i in range(k)]

    def encode(_: Any) -> list[bytes]:
        src = split()  # the source symbols are sent as they are (systematic code); only repairs cost GF math
        return src + encoder.encode(src, tuple(range(k, k + r5)))

    t_enc, _ = timer.run(encode)
    row["encode_ms"] = round(t_enc * 1e3, 3)
    row["encode_mb_s"] = mb_s(block, t_enc)

    src = split()
    fresh = min(FRESH, max_repairs)
    ids = tuple(range(k + max_repairs - fresh, k + max_repairs))  # any ids, generated independently
    t_rep, _ = timer.run(lambda _: encoder.encode(src, ids))
    row["repair_us_per_symbol"] = round(t_rep / fresh * 1e6, 2)

    for loss in LOSSES:
        n_rep = min(max_repairs, repairs_for(k, loss, slack=0)) if loss > 0 else 0
        sent = src + (encoder.encode(src, tuple(range(k, k + n_rep))) if n_rep else [])

        def setup(sent: list[bytes] = sent, loss: float = loss) -> tuple[list[bytes], list[int]]:
            while True:  # a receiver decodes once it holds any k: all surviving sources + the first repairs
                idx = survivors(len(sent), loss, rng)[:k]
                if len(idx) == k:
                    break
            idx = arrival_order(idx, k, rng)
            return [sent[i] for i in idx], idx

        def decode(arg: tuple[list[bytes], list[int]]) -> bytes:
            blocks, nums = arg
            return b"".join(decoder.decode(blocks, nums))

        t_dec, out = timer.run(decode, setup, mean=True)
        assert out == data, f"zfec decode mismatch at {loss:.0%} loss"
        key = f"{round(loss * 100)}"
        row[f"decode_ms_{key}"] = round(t_dec * 1e3, 3)
        row[f"decode_mb_s_{key}"] = mb_s(block, t_dec)
    # Fast path?  All k source symbols vs. k-1 source symbols + 1 repair symbol.
    rep1 = encoder.encode(src, (k,))[0]
    t_src, _ = timer.run(decode, lambda: (src, list(range(k))))
    t_one, out = timer.run(decode, lambda: ([*src[:-1], rep1], [*range(k - 1), k]))
    assert out == data
    row["all_source_decode_us"] = round(t_src * 1e6, 1)
    row["one_missing_decode_us"] = round(t_one * 1e6, 1)
    row["fast_path"] = t_src < 0.5 * t_one
    return row


def zfec_memory(k: int) -> dict[str, Any]:
    enc_bytes = mem_delta_per_item(lambda: zfec.Encoder(k, ZFEC_N), 64)
    dec_bytes = mem_delta_per_item(lambda: zfec.Decoder(k, ZFEC_N), 64)
    return {"k": k, "n": ZFEC_N, "encoder_object_bytes": enc_bytes, "decoder_object_bytes": dec_bytes}


# ----------------------------------------------------------------------------------------------------- context
def sendto_cost(symbol: int, count: int) -> float:
    """Microseconds per Python ``sendto`` of one (symbol + 4 header bytes) datagram to a loopback socket."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", 0))  # never read: once its buffer is full the kernel drops, sendto still succeeds
        addr = rx.getsockname()
        payload = os.urandom(symbol + 4)
        send = tx.sendto
        t0 = time.perf_counter()
        for _ in range(count):
            send(payload, addr)
        return round((time.perf_counter() - t0) / count * 1e6, 2)
    finally:
        tx.close()
        rx.close()


# -------------------------------------------------------------------------------------------------------- output
def fmt_table(title: str, rows: list[dict[str, Any]], cols: list[tuple[str, str, int]]) -> str:
    lines = [title]
    lines.append(" ".join(f"{head:>{width}}" for head, _, width in cols))
    for row in rows:
        cells = []
        for _, key, width in cols:
            value = row.get(key)
            if isinstance(value, bool):
                text = "yes" if value else "no"
            elif isinstance(value, float):
                digits = 0 if abs(value) >= 1000 else 1 if abs(value) >= 10 else 2 if abs(value) >= 0.01 else 4
                text = f"{value:.{digits}f}" if value else "0"
            elif value is None:
                text = "-"
            else:
                text = str(value)
            cells.append(f"{text:>{width}}")
        lines.append(" ".join(cells))
    return "\n".join(lines)


DECODE_COLS = [(f"dec{round(x * 100)}%", f"decode_mb_s_{round(x * 100)}", 8) for x in LOSSES]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print all figures as one JSON object on the last line")
    parser.add_argument("--quick", action="store_true", help="smaller time budget and fewer trials (smoke test)")
    parser.add_argument("--trials", type=int, default=None, help="RaptorQ overhead trials per symbol size (200)")
    parser.add_argument("--seed", type=int, default=1, help="seed for the loss patterns")
    args = parser.parse_args(argv)

    timer = Timer(0.04 if args.quick else 0.2)
    trials = args.trials if args.trials is not None else (30 if args.quick else 200)
    rng = random.Random(args.seed)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "env": {
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "platform": platform.platform(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "raptorq_version": dist_version("raptorq", "raptorq-wheel") if raptorq else None,
            "zfec_version": dist_version("zfec") if zfec else None,
        },
        "units": "MB = 10^6 bytes of source data; *_us per symbol; decode_mb_s_N = decode at N % random loss",
    }
    print(f"fec_choice: Python {result['env']['python']} on {result['env']['platform']}, {os.cpu_count()} CPUs")
    sendto = {s: sendto_cost(s, 4000 if args.quick else 20000) for s in SYMBOL_SIZES}
    result["python_sendto_us"] = {str(s): us for s, us in sendto.items()}

    def add_sender_ceiling(rows: list[dict[str, Any]]) -> None:
        # One core doing the encode (source + 5 % repair) and one sendto per symbol, nothing else.
        for row in rows:
            seconds = row["encode_ms"] / 1e3 + (row["k"] + row["repair_5pct"]) * sendto[row["symbol_size"]] / 1e6
            row["sender_ceiling_mb_s"] = mb_s(row["block_bytes"], seconds)

    if raptorq is None:
        print("raptorq: not installed, skipped (pip install raptorq)")
    else:
        print(f"raptorq {result['env']['raptorq_version']}: benchmarking ...", flush=True)
        rows = [bench_raptorq_block(timer, s, b, rng) for s in SYMBOL_SIZES for b in RQ_BLOCKS]
        add_sender_ceiling(rows)
        overhead = [raptorq_overhead(s, trials, rng) for s in SYMBOL_SIZES]
        memory = [raptorq_memory(s, b) for s in SYMBOL_SIZES for b in (1 * MIB, 4 * MIB)]
        data = os.urandom(1 * MIB)
        rq_enc = raptorq.Encoder.with_defaults(data, 1400)
        rq_pkts = rq_enc.get_encoded_packets(38)
        rq_got = rq_pkts[1:]  # source symbol 0 missing: a real solve

        def rq_decode() -> None:
            dec = raptorq.Decoder.with_defaults(len(data), 1400)
            for p in rq_got:
                if dec.decode(p) is not None:
                    break

        gil = {
            "encode": thread_speedup(lambda: raptorq.Encoder.with_defaults(data, 1400).get_encoded_packets(38), 16),
            "decode": thread_speedup(rq_decode, 16),
        }
        result["raptorq"] = {"blocks": rows, "overhead": overhead, "memory": memory, "two_thread_speedup": gil}
        print()
        print(
            fmt_table(
                "RaptorQ - one Encoder per block; MB/s of source data; decN% = decode MB/s at N % random loss",
                rows,
                [
                    ("sym", "symbol_size", 5),
                    ("block", "block_bytes", 8),
                    ("k", "k", 5),
                    ("enc MB/s", "encode_mb_s", 8),
                    ("init ms", "encoder_init_ms", 8),
                    ("send MB/s", "sender_ceiling_mb_s", 9),
                    *DECODE_COLS,
                    ("allsrc us", "all_source_decode_us", 9),
                    ("1miss us", "one_missing_decode_us", 9),
                ],
            )
        )
        print()
        print(
            fmt_table(
                "RaptorQ on-demand repair symbols (live encoder), microseconds per repair symbol",
                rows,
                [
                    ("sym", "symbol_size", 5),
                    ("block", "block_bytes", 8),
                    ("marginal", "repair_marginal_us", 9),
                    ("re-emit k src us", "source_reemit_us", 16),
                    ("fresh16@k/4", "fresh16_us_per_symbol", 12),
                    ("pool(2x)", "pool_us_per_symbol", 9),
                ],
            )
        )
        print()
        print(
            fmt_table(
                f"RaptorQ symbols needed beyond k ({RQ_OVERHEAD_BLOCK // MIB} MiB blocks, "
                f"{RQ_OVERHEAD_LOSS:.0%} random loss)",
                overhead,
                [
                    ("sym", "symbol_size", 5),
                    ("k", "k", 5),
                    ("trials", "trials", 6),
                    ("mean", "mean_extra", 7),
                    ("max", "max_extra", 4),
                    ("% =0", "pct_extra_0", 7),
                    ("% =1", "pct_extra_1", 7),
                    ("% >=2", "pct_extra_2plus", 7),
                    ("undecoded", "undecoded", 9),
                ],
            )
        )
        print()
        print(
            fmt_table(
                "RaptorQ heap held per block (mallinfo2): live Encoder; Decoder holding k-1 symbols",
                memory,
                [
                    ("sym", "symbol_size", 5),
                    ("block", "block_bytes", 8),
                    ("enc bytes", "encoder_bytes", 10),
                    ("x block", "encoder_x_block", 7),
                    ("dec bytes", "decoder_k_minus_1_bytes", 10),
                    ("x block", "decoder_x_block", 7),
                ],
            )
        )
        print(
            f"RaptorQ two-thread speedup (1 MiB, 1400 B): encode {gil['encode']}, decode {gil['decode']} "
            "(about 1.0 = the binding holds the GIL; use processes, not threads)"
        )
        print()

    if zfec is None:
        print("zfec: not installed, skipped (pip install zfec)")
    else:
        print(f"zfec {result['env']['zfec_version']}: benchmarking ...", flush=True)
        rows = [bench_zfec_block(timer, s, k, rng) for s in SYMBOL_SIZES for k in ZFEC_KS]
        add_sender_ceiling(rows)
        memory = [zfec_memory(k) for k in ZFEC_KS]
        src = [os.urandom(1400) for _ in range(64)]
        zenc = zfec.Encoder(64, ZFEC_N)
        zrep = zenc.encode(src, tuple(range(64, 80)))
        zblocks, znums = [*src[16:], *zrep], [*range(16, 80)]  # 16 of 64 source symbols missing
        zdec = zfec.Decoder(64, ZFEC_N)
        gil = {
            "encode": thread_speedup(lambda: zenc.encode(src, tuple(range(64, 128))), 64),
            "decode": thread_speedup(lambda: zdec.decode(zblocks, znums), 64),
        }
        result["zfec"] = {"blocks": rows, "memory": memory, "two_thread_speedup": gil}
        print()
        print(
            fmt_table(
                f"zfec (n <= {ZFEC_N}); MB/s of source data; decN% = decode MB/s at N % random loss",
                rows,
                [
                    ("sym", "symbol_size", 5),
                    ("k", "k", 4),
                    ("block", "block_bytes", 8),
                    ("enc MB/s", "encode_mb_s", 8),
                    ("send MB/s", "sender_ceiling_mb_s", 9),
                    ("rep us/sym", "repair_us_per_symbol", 10),
                    ("max rep", "max_repairs", 7),
                    *DECODE_COLS,
                    ("allsrc us", "all_source_decode_us", 9),
                    ("1miss us", "one_missing_decode_us", 9),
                ],
            )
        )
        mem_text = ", ".join(
            f"k={m['k']}: Encoder {m['encoder_object_bytes']} B, Decoder {m['decoder_object_bytes']} B" for m in memory
        )
        print(f"zfec objects (heap; the symbols themselves are the caller's buffers): {mem_text}")
        print(
            f"zfec two-thread speedup (k=64, 1400 B): encode {gil['encode']}, decode {gil['decode']} "
            "(about 2.0 = the GIL is released)"
        )
        print()

    print(
        "Context: loopback sendto from Python, one datagram (symbol + 4 B): "
        + ", ".join(f"{s} B: {us} us -> <= {round((s + 4) / us)} MB/s per core" for s, us in sendto.items())
        + ".  send MB/s above = one core doing only encode + one sendto per symbol."
    )
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(f"total {result['seconds']} s")
    if args.json:
        print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
