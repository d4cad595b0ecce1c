"""Block layout and the erasure codes: Reed-Solomon (zfec), any k of n = 256 symbols rebuild a block.

Pure: computation only.  Why zfec (see bench/fec_choice.py and the issue note):
it is MDS (exactly k symbols always decode, so feedback "m more" is exact and
a count-based model of a receiver is exact too), it generates any repair id on
demand without per-block encoder state, it releases the GIL, and it has wheels
for Linux and Windows (the WinPE client); raptorq has no Windows wheel.
Measured here: k=128 encodes ~455 MB/s and decodes ~513 MB/s at 5 % loss.

Layout: the image is cut into blocks of ``k`` symbols of ``symbol_size``
bytes; the last block may have fewer source symbols, and the last symbol is
zero-padded.  Symbol ids (ESI) 0..k_b-1 are the source, k_b..255 repair.

Two codes, named in the Offer's ``fec``: ``"rs"`` (this module: zfec, GF(2^8),
k <= 255, every block 256 ids) and ``"rs16"`` (:mod:`mcproto.fec_wide`:
GF(2^16), k up to 32,768, k_b + R ids per block, R the Offer's
``repair_symbols``).  :func:`layout_for` and :func:`codec_for` pick one; both
layouts answer ``n_max(block)`` (distinct symbol ids of a block, after which
ids cycle) and both codecs ``repair``/``decode``, so the sender, the receiver
and the simulator's fleet use one interface.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import zfec

N_MAX = 256  # zfec works over GF(2^8): at most 256 distinct symbols per block
FecName = Literal["rs", "rs16"]
FEC_RS: FecName = "rs"  # zfec, GF(2^8)
FEC_RS16: FecName = "rs16"  # reed-solomon-leopard, GF(2^16) (mcproto.fec_wide)


def rs16_available() -> bool:
    """Whether this Python can run rs16 (``reed-solomon-leopard`` has wheels for CPython 3.10-3.12 only)."""
    try:
        import reed_solomon_leopard  # noqa: F401
    except ImportError:
        return False
    return True


# rs16 where its library installed, else zfec: a machine without it still sends and receives (rs sessions).
DEFAULT_FEC: FecName = FEC_RS16 if rs16_available() else FEC_RS
DEFAULT_K = {FEC_RS: 128, FEC_RS16: 1024}  # source symbols per block, by code (rs16: for ~1.4 KB symbols)


def default_k(fec: str, symbol_size: int = 1400) -> int:
    """Source symbols per block when none is given: 128 for zfec; for rs16 1,024 symbols of ~1.4 KB.

    Larger symbols (jumbo frames) get fewer, so that a block, which a receiver holds in memory while it waits
    for repairs, stays near 1.4 MB: 8,800-byte symbols give k = 162 (not 9 MB blocks).
    """
    if fec == FEC_RS:
        return DEFAULT_K[FEC_RS]
    return max(128, min(DEFAULT_K[FEC_RS16], DEFAULT_K[FEC_RS16] * 1400 // max(1, symbol_size)))


@dataclass(frozen=True, slots=True)
class Layout:
    """How an image maps to blocks and symbols."""

    image_size: int
    symbol_size: int
    k: int

    def __post_init__(self) -> None:
        if not 1 <= self.k < N_MAX:
            raise ValueError(f"k must be in 1..{N_MAX - 1}")
        if self.symbol_size < 1:
            raise ValueError("symbol_size must be positive")

    @property
    def total_symbols(self) -> int:
        return math.ceil(self.image_size / self.symbol_size)

    @property
    def blocks(self) -> int:
        return math.ceil(self.total_symbols / self.k)

    @property
    def block_bytes(self) -> int:
        return self.k * self.symbol_size

    def block_k(self, block: int) -> int:
        """Source symbols in ``block`` (the last block may have fewer)."""
        return min(self.k, self.total_symbols - block * self.k)

    def block_offset(self, block: int) -> int:
        return block * self.block_bytes

    def block_len(self, block: int) -> int:
        """Image bytes in ``block`` (without padding)."""
        return min(self.block_bytes, self.image_size - self.block_offset(block))

    @property
    def fec(self) -> FecName:
        return FEC_RS

    @property
    def repair_ids(self) -> int:
        """Repair ids per block as the Offer carries them (0 for zfec: 256 - k_b, implied)."""
        return 0

    def n_max(self, block: int) -> int:
        """Distinct symbol ids of ``block`` (0..n_max-1); beyond them ids cycle back to 0."""
        return N_MAX


class BlockCodec(Protocol):
    """What the sender and receiver need of a code (:class:`Codec`, :class:`mcproto.fec_wide.Codec`)."""

    def repair(self, source: Sequence[bytes], esis: Sequence[int]) -> list[bytes]: ...

    def decode(self, symbols: Sequence[bytes], esis: Sequence[int], k: int) -> list[bytes]: ...


class Codec:
    """Encoders/decoders per k (only the last block has another k), reused across blocks."""

    def __init__(self) -> None:
        self._enc: dict[int, zfec.Encoder] = {}
        self._dec: dict[int, zfec.Decoder] = {}

    def repair(self, source: Sequence[bytes], esis: Sequence[int]) -> list[bytes]:
        """Symbols ``esis`` (each >= len(source)) of the block whose source symbols are ``source``."""
        k = len(source)
        enc = self._enc.get(k)
        if enc is None:
            enc = self._enc[k] = zfec.Encoder(k, N_MAX)
        return list(enc.encode(list(source), list(esis)))

    def decode(self, symbols: Sequence[bytes], esis: Sequence[int], k: int) -> list[bytes]:
        """The k source symbols from any k distinct symbols."""
        dec = self._dec.get(k)
        if dec is None:
            dec = self._dec[k] = zfec.Decoder(k, N_MAX)
        return list(dec.decode(list(symbols), list(esis)))


def layout_for(fec: FecName | str, image_size: int, symbol_size: int, k: int, repair: int = 0) -> Layout:
    """The layout of a session using code ``fec`` ("rs" or "rs16"); ``repair``: R for rs16 (0: its default).

    Raises ValueError for a code or geometry the code cannot do.
    """
    if fec == FEC_RS:
        if repair:
            raise ValueError("repair_symbols applies to rs16 only (zfec blocks have 256 - k repair ids)")
        return Layout(image_size, symbol_size, k)
    if fec == FEC_RS16:
        if not rs16_available():
            raise ValueError("fec rs16 needs the reed-solomon-leopard package, which has no wheel for this Python: "
                             "use fec rs, or Python 3.11/3.12")
        from mcproto.fec_wide import WideLayout

        return WideLayout(image_size, symbol_size, k, repair)
    raise ValueError(f"unknown FEC {fec!r} (rs or rs16)")


class SessionGeometry(Protocol):
    """The fields of an Offer (:class:`mcproto.messages.Offer`) that define the layout."""

    @property
    def fec(self) -> str: ...
    @property
    def image_size(self) -> int: ...
    @property
    def symbol_size(self) -> int: ...
    @property
    def block_symbols(self) -> int: ...
    @property
    def repair_symbols(self) -> int: ...


def offer_layout(offer: SessionGeometry) -> Layout:
    """The layout an Offer describes."""
    return layout_for(offer.fec, offer.image_size, offer.symbol_size, offer.block_symbols, offer.repair_symbols)


def codec_for(layout: Layout) -> BlockCodec:
    """A codec for ``layout``'s code (a fresh one: codecs keep per-session caches)."""
    if layout.fec == FEC_RS16:
        from mcproto.fec_wide import Codec as WideCodec

        return WideCodec(layout.repair_ids)
    return Codec()


def split_block(data: bytes | memoryview, k: int, symbol_size: int) -> list[bytes]:
    """A block's bytes as k symbols, the last zero-padded."""
    out = [bytes(data[i * symbol_size:(i + 1) * symbol_size]) for i in range(k)]
    if out and len(out[-1]) < symbol_size:
        out[-1] = out[-1] + bytes(symbol_size - len(out[-1]))
    return out
