"""Wide blocks: Reed-Solomon over GF(2^16), any k of k + R symbols rebuild a block of up to 32,768 source symbols.

Pure: computation only.  A drop-in sibling of :mod:`mcproto.fec` (same ``Codec.repair``/``Codec.decode``
calls, a ``Layout`` subclass) for blocks larger than zfec's 255 source symbols.  Why wide blocks (issue 3,
``bench/fec_wide.py``): with 1,000 receivers at loss U[0, 5 %] the sender must send each block until the
unluckiest receiver holds k symbols; that floor costs x1.057 over image / (1 - p_max) at k = 128 but x1.016 at
k = 1024 and x1.011 at k = 2048.

The code: ``reed-solomon-leopard`` (MIT; a small pyo3 binding of the Rust crate ``reed-solomon-simd``, MIT, an
O(n log n) FFT Reed-Solomon after Leopard-RS, SIMD picked at run time with a scalar fallback).  Why it: it is MDS
like zfec (exactly k symbols always decode, so the "m more" feedback and the simulator's count-based fleet stay
exact), systematic (source symbols go out as they are; only repair symbols are computed), has cp311 wheels for
manylinux x86_64 and win_amd64 (the WinPE client) with no dependencies, and is fast: at 1,392-byte symbols and
k = 1024 it encodes ~3 GB/s (R = 256) and decodes ~0.7 GB/s at 5 % loss on one core (zfec k = 128: ~0.4 GB/s).

Differences from zfec that the protocol must respect:

* the repair symbols of a block depend on R (more exactly on the power of two >= R), not only on their id: the
  sender and every receiver must agree on one R per session (``Layout.repair``; the Offer must carry it);
* a repair symbol is not made alone: one ``encode`` makes all R of a block (about 0.6 ms for k = 1024, R = 256;
  1.4 ms for the default R = k = 1024, on this loaded 2-core machine).
  :class:`Codec` keeps the last few blocks' repair symbols, so the sender's many small requests for the same
  block cost one encode;
* symbol sizes must be even (1,392, 1,400 and 8,800 are);
* the binding holds the GIL while it computes (zfec releases it);
* wheels exist for CPython 3.10-3.12 only (0.2.1, November 2024): a move to 3.13 needs a new release or a fork.

Layout: as :mod:`mcproto.fec` (the image cut into blocks of ``k`` symbols, the last block may have fewer, the last
symbol zero-padded); symbol ids (ESI) 0..k_b-1 are the source, k_b..k_b+R-1 repair, for every block the same R.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from mcproto.fec import FecName, Layout, split_block

try:
    import reed_solomon_leopard as rsl
except ImportError:  # no wheel for this Python (3.13+ at 0.2.1): rs16 sessions are refused, rs still works
    rsl = None

K_MAX = 32768  # reed-solomon-simd: any 1..32768 original with 1..32768 recovery shards
R_MAX = 32768
R_MIN = 64
_CACHE_BLOCKS = 8
_CACHE_BYTES = 32 << 20  # and at most this much source + repair data held (large symbols, large R)

__all__ = ["K_MAX", "R_MAX", "Codec", "WideLayout", "default_repair", "split_block"]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def default_repair(k: int) -> int:
    """A session's repair ids per block for blocks of ``k`` source symbols: the power of two >= k (at least 64).

    As many repair ids as source ids, like zfec's k = 128 of n = 256: a receiver with bursts of loss, or one far
    behind, is served fresh ids for a long time before they must cycle.  Once they cycle (through the source ids
    too), a receiver already holds most of what is sent, and its last few symbols take many rounds: with
    R = k / 4 a receiver under bursty loss (simulate --burst 0.5,20) could need more than 30 s for one block.
    Fewer ids would not save much: one encode makes all R (about 1.4 ms for k = R = 1024, ~1 GB/s; R = 256: 0.6 ms).
    A power of two because repair values depend only on the power of two >= R (ids beyond R would be free, but
    unusable).
    """
    if not 1 <= k <= K_MAX:
        raise ValueError(f"k must be in 1..{K_MAX}")
    return min(R_MAX, max(R_MIN, _next_pow2(k)))


@dataclass(frozen=True, slots=True)
class WideLayout(Layout):
    """A :class:`mcproto.fec.Layout` with k up to 32,768 and a session-wide number of repair ids per block."""

    repair: int = 0  # 0: default_repair(k)

    def __post_init__(self) -> None:
        if not 1 <= self.k <= K_MAX:
            raise ValueError(f"k must be in 1..{K_MAX}")
        if self.symbol_size < 2 or self.symbol_size % 2:
            raise ValueError("symbol_size must be even and positive (GF(2^16) works on 16-bit words)")
        if self.repair == 0:
            object.__setattr__(self, "repair", default_repair(self.k))
        if not 1 <= self.repair <= R_MAX:
            raise ValueError(f"repair must be in 1..{R_MAX}")

    @property
    def fec(self) -> FecName:
        return "rs16"

    @property
    def repair_ids(self) -> int:
        return self.repair

    def n_max(self, block: int) -> int:
        """Distinct symbol ids of ``block``: its source symbols and the session's R repair ids."""
        return self.block_k(block) + self.repair


class Codec:
    """Repair and decode for one session's R (every block, the last included, has R repair ids).

    Interface of :class:`mcproto.fec.Codec`: ``repair(source, esis)`` and ``decode(symbols, esis, k)``.
    """

    def __init__(self, repair: int) -> None:
        if not 1 <= repair <= R_MAX:
            raise ValueError(f"repair must be in 1..{R_MAX}")
        self.repair_count = repair
        self.encodes = 0  # whole-block encodes done (for tests and benchmarks)
        # A few recent blocks' repair symbols, keyed by the identity of the source list (the sender keeps each
        # block's list while it works on it); the list itself is held so that its id cannot be reused.
        self._cache: OrderedDict[int, tuple[Sequence[bytes], list[bytes]]] = OrderedDict()

    def repair(self, source: Sequence[bytes], esis: Sequence[int]) -> list[bytes]:
        """Symbols ``esis`` (each in k..k+R-1, k = len(source)) of the block whose source symbols are ``source``."""
        k = len(source)
        r = self.repair_count
        for e in esis:
            if not k <= e < k + r:
                raise ValueError(f"repair id {e} outside {k}..{k + r - 1}")
        if not esis:
            return []
        rec = self._repairs(source)
        return [rec[e - k] for e in esis]

    def decode(self, symbols: Sequence[bytes | bytearray | memoryview], esis: Sequence[int], k: int) -> list[bytes]:
        """The k source symbols from at least k symbols with distinct ids (any k of them suffice)."""
        if len(symbols) != len(esis):
            raise ValueError("symbols and esis differ in length")
        if len(set(esis)) != len(esis):
            raise ValueError("duplicate symbol ids")
        if len(esis) < k:
            raise ValueError(f"need {k} symbols, have {len(esis)}")
        r = self.repair_count
        original: dict[int, bytes] = {}
        recovery: dict[int, bytes] = {}
        size = None
        for e, s in zip(esis, symbols, strict=True):
            if size is None:
                size = len(s)
            elif len(s) != size:
                raise ValueError("symbols differ in size")
            if 0 <= e < k:
                original[e] = bytes(s)
            elif k <= e < k + r:
                recovery[e - k] = bytes(s)
            else:
                raise ValueError(f"symbol id {e} outside 0..{k + r - 1}")
        if len(original) == k:
            return [original[i] for i in range(k)]
        # exactly k symbols: reed-solomon-simd would accept more, but any k decode and fewer is less work
        keep = sorted(recovery)[: k - len(original)]
        restored = rsl.decode(k, r, original, {j: recovery[j] for j in keep})
        original.update(restored)
        return [original[i] for i in range(k)]

    def _repairs(self, source: Sequence[bytes]) -> list[bytes]:
        key = id(source)
        hit = self._cache.get(key)
        if hit is not None and hit[0] is source:
            self._cache.move_to_end(key)
            return hit[1]
        data = [s if isinstance(s, bytes) else bytes(s) for s in source]
        rec = rsl.encode(data, self.repair_count)
        self.encodes += 1
        self._cache[key] = (source, rec)
        per_block = (len(data) + len(rec)) * (len(data[0]) if data else 0)
        keep = max(1, min(_CACHE_BLOCKS, _CACHE_BYTES // max(1, per_block)))
        while len(self._cache) > keep:
            self._cache.popitem(last=False)
        return rec
