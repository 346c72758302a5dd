"""The paged KV cache's bookkeeping: which fixed-size block holds which tokens of which request.

Pure Python (no torch), so it is tested without a model. Invariants:

- every block is either referenced (``ref_count > 0``) or in the free queue, never both;
- a block holding a *full* block of a request's tokens may carry a hash of those tokens chained to the
  hash of the block before it, so the same prefix maps to the same block: a prefix-cache hit;
- a free block keeps its hash until it is reused, so freed prefixes stay hits until memory is needed;
- blocks are handed out in this order: a used block without content; a never-used block whose memory
  is ``mapped``; the least recently freed block (evicting its prefix); a never-used unmapped block.

Why mapped memory first: on the CPU the cache's pages are mapped when first written, and a fresh
block's first write costs page faults inside the step that writes it, paid by every request in that
step. The engine maps never-used blocks while it is idle (``LLMEngine.warm_idle``), but bursts that
follow each other leave it no idle time: a server given back-to-back bursts of 16 prompts of 200
tokens faulted ~200 fresh blocks (74 MiB) per burst, 0.2-0.25 s of the kernel clearing pages. So a
prefix cached in the least recently freed block is evicted before unmapped memory is touched (2-core
EPYC, six alternating pairs of 3-burst server runs: median first token 569-764 ms against 733-1269
ms before, lower in every pair); with idle time, the mapped region runs ahead of use and nothing is
evicted early. Where every block is mapped from the start (the default, and a GPU's cache) the order
is the plain LRU one: blocks without content, then the least recently freed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from lmserve.engine.request import Request

BlockHash = int


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None
    token_ids: tuple[int, ...] = ()  # kept for cached blocks: a hash hit is verified, never trusted


def hash_block(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """The hash of a full block, chained to its parent so equal blocks at different places differ."""
    return hash((parent, tuple(token_ids)))


class BlockManager:
    """Allocates, shares and frees KV blocks for requests."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks}x{block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks that were used before: without content first, then cached ones, least recently
        # freed first. The never-used blocks are the ids from ``high_water`` on, all free.
        self._free: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[BlockHash, int] = {}
        # Per request: hashes of its full blocks so far (recomputed lazily as tokens are generated).
        self._hashes: dict[str, list[BlockHash]] = {}
        self.prefix_hit_tokens = 0
        # Blocks from this id on have never been handed out: nothing was ever written there.
        self.high_water = 0
        # Blocks below this id (at most num_blocks) have their memory mapped; the engine lowers it where
        # memory is mapped on first write (the CPU) and raises it as it maps blocks ahead of use.
        self.mapped = num_blocks

    # -- queries ---------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + self.num_blocks - self.high_water

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_ever_fit(self, num_tokens: int) -> bool:
        """Whether a request of this many tokens fits an otherwise empty cache."""
        return self.blocks_needed(num_tokens) <= self.num_blocks

    # -- prefix cache ----------------------------------------------------------------------------
    def _block_hashes(self, request: Request) -> list[BlockHash]:
        """Hashes of the request's full blocks, extended as it grows."""
        hashes = self._hashes.setdefault(request.request_id, [])
        n_full = request.num_tokens // self.block_size
        bs = self.block_size
        while len(hashes) < n_full:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, request.token_slice(i * bs, (i + 1) * bs)))
        return hashes

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Blocks already holding a prefix of the request's tokens (not yet referenced by it).

        At least one token is always left to compute, because the step that computes the last token
        is the one that produces the next token's logits.
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        bs = self.block_size
        for i, h in enumerate(self._block_hashes(request)):
            block_id = self._cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tuple(request.token_slice(i * bs, (i + 1) * bs)):
                break
            hits.append(block_id)
        if hits and len(hits) * bs >= request.num_tokens:
            hits.pop()
        return hits

    # -- allocation ------------------------------------------------------------------------------
    def allocate(self, request: Request, num_new_tokens: int, cached_prefix: Sequence[int] = ()) -> bool:
        """Give the request blocks for ``num_new_tokens`` more tokens beyond those computed.

        ``cached_prefix`` (from ``find_cached_prefix``, only when the request holds no blocks yet) is
        shared instead of computed. Returns False, changing nothing, when free blocks run out: the
        caller then preempts someone or waits.
        """
        if cached_prefix:
            assert not request.block_ids, "a cached prefix is only attached to a request with no blocks"
        held = len(request.block_ids) + len(cached_prefix)
        computed = request.num_computed_tokens + len(cached_prefix) * self.block_size
        needed = self.blocks_needed(computed + num_new_tokens) - held
        # Cached-prefix blocks that sit in the free queue stop being free once referenced.
        reclaimed = sum(1 for b in cached_prefix if self.blocks[b].ref_count == 0)
        if needed > self.num_free_blocks - reclaimed:
            return False
        for block_id in cached_prefix:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            request.block_ids.append(block_id)
        if cached_prefix:
            request.num_computed_tokens += len(cached_prefix) * self.block_size
            self.prefix_hit_tokens += len(cached_prefix) * self.block_size
        for _ in range(max(needed, 0)):
            request.block_ids.append(self._take_free_block())
        return True

    def _take_free_block(self) -> int:
        front = next(iter(self._free), None)
        no_mapped_never_used = self.high_water >= self.mapped
        if front is not None and (self.blocks[front].block_hash is None or no_mapped_never_used):
            block_id = front
            del self._free[front]
        else:
            block_id = self.high_water
            self.high_water += 1
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict the cached content it held
            if self._cached.get(block.block_hash) == block_id:
                del self._cached[block.block_hash]
            block.block_hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id

    def cache_computed_blocks(self, request: Request) -> None:
        """Publish the request's newly completed full blocks so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        n_full = min(request.num_computed_tokens // self.block_size, len(request.block_ids))
        hashes = self._block_hashes(request)
        bs = self.block_size
        for i in range(n_full):
            block = self.blocks[request.block_ids[i]]
            if block.block_hash is not None:
                continue
            h = hashes[i]
            block.block_hash = h
            block.token_ids = tuple(request.token_slice(i * bs, (i + 1) * bs))
            self._cached.setdefault(h, block.block_id)

    def free(self, request: Request) -> None:
        """Release the request's blocks. Cached blocks go to the back of the free queue (kept longest),
        blocks without content to the front (reused first). Blocks are released tail first, so the
        deepest blocks of a prefix are evicted before the shallow ones that more requests share."""
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed more often than allocated"
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.block_hash is None:
                    self._free.move_to_end(block_id, last=False)
        request.block_ids = []
        self._hashes.pop(request.request_id, None)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (e.g. after weights change)."""
        for block in self.blocks:
            if block.ref_count == 0:
                block.block_hash, block.token_ids = None, ()
        self._cached.clear()
