"""Which received blocks may be committed: the bookkeeping between FEC blocks and manifest chunks.

Pure: no I/O.  The transport delivers FEC blocks (k symbols, ~180 KB); the signed
manifest vouches for fixed-size chunks (1 MiB or more) that do not line up with
blocks.  A block is *committed* (claimed in the resume journal) only when every
chunk it overlaps has been checked against the manifest, because a receiver
holding the session key (an enrolled but malicious client) can forge symbols that
decode into a wrong block: the AEAD cannot tell, only the controller's signature
can.  When a chunk fails its check, every block overlapping it is given back to
the receiver to be received again (:meth:`ChunkMap.rejected`).

The adapter drives it: :meth:`written` after a block's bytes reached the output
returns the chunks now fully written (check them), :meth:`verified` returns the
blocks that became committable, :meth:`rejected` the blocks to receive again.
"""

from __future__ import annotations

from collections.abc import Iterable


class ChunkMap:
    """Coverage of manifest chunks by received blocks, and what is safe to commit."""

    def __init__(self, image_size: int, chunk_size: int, block_bytes: int, blocks: int,
                 committed: Iterable[int] = ()) -> None:
        """``committed``: blocks a journal already holds (each was committed only after its chunks checked)."""
        if chunk_size <= 0 or block_bytes <= 0:
            raise ValueError("chunk and block sizes must be positive")
        self.size = image_size
        self.chunk_size = chunk_size
        self.block_bytes = block_bytes
        self.blocks = blocks
        self.chunks = -(-image_size // chunk_size)
        self._written = bytearray(blocks)
        self._committed = bytearray(blocks)
        self._verified = bytearray(self.chunks)
        self.failures: dict[int, int] = {}  # chunk -> times it failed its check
        self.verified_chunks = 0
        for b in committed:
            if 0 <= b < blocks:
                self._written[b] = self._committed[b] = 1
        # A chunk whose every block is committed was checked before: its blocks could not be committed otherwise.
        for c in range(self.chunks):
            if all(self._committed[b] for b in self.blocks_of(c)):
                self._verified[c] = 1
                self.verified_chunks += 1

    # ------------------------------------------------------------------ geometry

    def blocks_of(self, chunk: int) -> range:
        """The blocks that hold some byte of ``chunk``."""
        start, length = self.chunk_range(chunk)
        return range(start // self.block_bytes, min(self.blocks, -(-(start + length) // self.block_bytes)))

    def chunks_of(self, block: int) -> range:
        """The chunks that hold some byte of ``block``."""
        start = block * self.block_bytes
        end = min(self.size, start + self.block_bytes)
        return range(start // self.chunk_size, min(self.chunks, -(-end // self.chunk_size)))

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        """(offset, length) of ``chunk`` in the image (the last chunk may be short)."""
        start = chunk * self.chunk_size
        return start, min(self.chunk_size, self.size - start)

    def is_verified(self, chunk: int) -> bool:
        return bool(self._verified[chunk])

    def writable_spans(self, block: int) -> list[tuple[int, int]]:
        """(offset, length) parts of ``block`` in chunks not yet verified: the only bytes to write.

        A block received again after its chunk failed may straddle a verified neighbour; its
        bytes there are left alone, so checked data is never overwritten by unchecked data.
        """
        start = block * self.block_bytes
        end = min(self.size, start + self.block_bytes)
        spans: list[tuple[int, int]] = []
        for c in self.chunks_of(block):
            if self._verified[c]:
                continue
            lo, n = self.chunk_range(c)
            lo, hi = max(lo, start), min(lo + n, end)
            if spans and spans[-1][0] + spans[-1][1] == lo:
                spans[-1] = (spans[-1][0], spans[-1][1] + hi - lo)
            else:
                spans.append((lo, hi - lo))
        return spans

    # ------------------------------------------------------------------ transitions

    def written(self, block: int) -> list[int]:
        """``block``'s bytes are at the output: the chunks that became fully written and await their check."""
        if self._written[block]:
            return []
        self._written[block] = 1
        return [c for c in self.chunks_of(block)
                if not self._verified[c] and all(self._written[b] for b in self.blocks_of(c))]

    def verified(self, chunk: int) -> list[int]:
        """``chunk`` matched the manifest: the blocks now safe to commit (every chunk they touch checked)."""
        if self._verified[chunk]:
            return []
        self._verified[chunk] = 1
        self.verified_chunks += 1
        ready = []
        for b in self.blocks_of(chunk):
            if not self._committed[b] and all(self._verified[c] for c in self.chunks_of(b)):
                self._committed[b] = 1
                ready.append(b)
        return ready

    def rejected(self, chunk: int) -> list[int]:
        """``chunk`` did not match: the blocks to receive again (none of them was committed).

        A block also overlapping an already verified neighbour is received again as a whole;
        the neighbour's bytes it rewrites are the same verified bytes (the adapter keeps them).
        """
        self.failures[chunk] = self.failures.get(chunk, 0) + 1
        again = []
        for b in self.blocks_of(chunk):
            if self._committed[b]:  # impossible by construction; never hand out a committed block
                continue
            if self._written[b]:
                self._written[b] = 0
                again.append(b)
        return again
