"""Paged latent cache: a pool of fixed-size pages holding the absorbed-MLA latent, per-sequence page tables,
and the host-side allocator with reference-counted prefix sharing.

Shape legend: L stacked layers, P pages in the pool, G page size (tokens per page), R kv_lora_rank,
dr qk_rope_head_dim, B rows of a step, M page-table entries per row, S = M * G slots a row can see.

Device side (`PagedLatentCache`, a pytree): one pool per layer stack, c_kv [L, P, G, R] and k_pe [L, P, G, dr]
in the cache dtype (the MTP module's: [P, G, *]), plus the step's page table [B, M] int32. It has the
interface of `mla.LatentCache` that `MLA.decode` uses, so the model's decode path runs on it unchanged:
    write(positions [B, T], c_kv, k_pe, layer)   slot p of row b -> page table[b, p // G], offset p % G;
                                                 positions < 0 (padding) go to page 0, the trash page
    layer(layer) -> c_kv [B, S, R], k_pe [B, S, dr]   each row's pages gathered in table order, so gathered
                                                 slot s is the row's logical position s (the plain-jnp
                                                 reference read; unused table entries point at page 0 and
                                                 sit past the row's positions, so the causal mask hides them)
Page 0 is never handed out: it absorbs the writes of padding tokens.

Sparse attention (V3.2): each layer's indexer key (index_head_dim values per token) is cached too. By default it
follows the rope channels in k_pe ([.., dr + Dh], the cache dtype); with `index_fp8` it is held apart as E4M3 with
one float32 scale per token (`k_idx` [.., G, Dh], `k_idx_scale` [.., G, 1]; DeepSeek's own serving caches it in
FP8): Dh + 4 bytes instead of 2 Dh in BF16. `key_channels` gives both back as the same [B, S, dr + Dh] view.

Host side (`PagePool`): free pages, a reference count per page, and the prefix table: a full page of a
prompt is registered under the hash of every token up to its end (the chain of page keys), so a later
prompt that starts with the same tokens finds the same page. A registered page whose count drops to zero
stays cached (and findable) until the pool needs it back; then the least recently released goes first.
Sizing: `pages_for_budget` turns a byte budget into a page count from the bytes one token occupies in
every layer (576 values per layer at V3 sizes).
"""
from __future__ import annotations

import collections
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dsv3_jax.infer.paged_attention import gather_pages, paged_attention

TRASH_PAGE = 0


@struct.dataclass
class PagedLatentCache:
    """The pool of one layer stack ([L, P, G, *]) or of one layer ([P, G, *]) and this step's page table."""

    c_kv: jax.Array
    k_pe: jax.Array
    page_table: jax.Array  # [B, M] int32
    k_idx: jax.Array | None = None  # [(L,) P, G, Dh] float8_e4m3fn: the indexer's keys (with `index_fp8`)
    k_idx_scale: jax.Array | None = None  # [(L,) P, G, 1] float32: their per-token scales

    @classmethod
    def zeros(cls, cfg, pages: int, page_size: int, dtype, layers: int | None = None,
              index_fp8: bool = False) -> PagedLatentCache:
        lead = (() if layers is None else (layers,)) + (pages, page_size)
        fp8 = index_fp8 and cfg.dsa
        return cls(c_kv=jnp.zeros(lead + (cfg.kv_lora_rank,), dtype),
                   k_pe=jnp.zeros(lead + (cfg.qk_rope_head_dim if fp8 else cfg.cache_rope_width,), dtype),
                   page_table=jnp.zeros((1, 1), jnp.int32),
                   k_idx=jnp.zeros(lead + (cfg.index_head_dim,), FP8) if fp8 else None,
                   k_idx_scale=jnp.zeros(lead + (1,), jnp.float32) if fp8 else None)

    @property
    def page_size(self) -> int:
        return self.c_kv.shape[-2]

    @property
    def capacity(self) -> int:
        return self.page_table.shape[1] * self.page_size

    def with_table(self, page_table: jax.Array) -> PagedLatentCache:
        return self.replace(page_table=page_table)

    def _slots(self, positions):
        G = self.page_size
        rows = jnp.arange(positions.shape[0])[:, None]
        page = self.page_table[rows, jnp.clip(positions, 0) // G]
        page = jnp.where(positions >= 0, page, TRASH_PAGE)
        return page, jnp.where(positions >= 0, positions % G, 0)

    def write(self, positions: jax.Array, c_kv: jax.Array, k_pe: jax.Array, layer=None) -> PagedLatentCache:
        """Write c_kv [B, T, R] and k_pe [B, T, dr (+ Dh: the indexer's key)] at positions [B, T]."""
        page, off = self._slots(positions)
        idx = (page, off) if layer is None else (layer, page, off)
        new = {}
        if self.k_idx is not None:
            dr = self.k_pe.shape[-1]
            q, scale = quantize_keys(k_pe[..., dr:])
            new = dict(k_idx=self.k_idx.at[idx].set(q), k_idx_scale=self.k_idx_scale.at[idx].set(scale))
            k_pe = k_pe[..., :dr]
        return self.replace(c_kv=self.c_kv.at[idx].set(c_kv.astype(self.c_kv.dtype)),
                            k_pe=self.k_pe.at[idx].set(k_pe.astype(self.k_pe.dtype)), **new)

    def layer(self, layer=None) -> tuple[jax.Array, jax.Array]:
        c_kv, k_pe = (self.c_kv, self.k_pe) if layer is None else (self.c_kv[layer], self.k_pe[layer])
        return gather_pages(c_kv, self.page_table), gather_pages(k_pe, self.page_table)

    def attend(self, q_abs, q_pe, positions, layer=None, *, scale: float, impl: str = "jnp",
               keep=None) -> jax.Array:
        """The absorbed core read through the page table -> o_lat [B, T, N, R] f32 (`paged_attention`:
        'jnp' gathers the pages, 'pallas' is the kernel; `keep` [B, T, S]: sparse attention's selection)."""
        return paged_attention(q_abs, q_pe, self.c_kv, self.k_pe, self.page_table, positions, scale=scale,
                               layer=layer, impl=impl, keep=keep)

    def key_channels(self, layer=None) -> jax.Array:
        """The row's cached k_pe entries [B, M*G, cache_rope_width] in table order (the indexer's keys follow
        the rope channels; FP8-held ones dequantised)."""
        pick = lambda a: a if layer is None else a[layer]  # noqa: E731
        k_pe = gather_pages(pick(self.k_pe), self.page_table)
        if self.k_idx is None:
            return k_pe
        keys = gather_pages(pick(self.k_idx), self.page_table).astype(jnp.float32)
        keys = keys * gather_pages(pick(self.k_idx_scale), self.page_table)
        return jnp.concatenate([k_pe.astype(jnp.float32), keys], axis=-1)


FP8 = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8).max)  # 448


def quantize_keys(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token E4M3 of the indexer's keys [..., Dh]: (q [..., Dh] e4m3, scale [..., 1] float32), keys ~ q * scale,
    the scale amax / 448 (1 for an all-zero key)."""
    k = keys.astype(jnp.float32)
    amax = jnp.max(jnp.abs(k), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0)
    return (k / scale).astype(FP8), scale


def bytes_per_token(cfg, itemsize: int, mtp: bool = False, index_fp8: bool = False) -> int:
    """Cache bytes one token takes in every main layer (and the MTP layer when speculating): the latent and the
    rope key in the cache dtype, and with sparse attention the indexer's key (in the cache dtype, or E4M3 and a
    float32 scale)."""
    layers = cfg.num_hidden_layers + (1 if mtp else 0)
    if index_fp8 and cfg.dsa:
        return ((cfg.kv_lora_rank + cfg.qk_rope_head_dim) * itemsize + cfg.index_head_dim + 4) * layers
    return (cfg.kv_lora_rank + cfg.cache_rope_width) * layers * itemsize


def pages_for_budget(cfg, budget_bytes: int, page_size: int, itemsize: int, mtp: bool = False,
                     index_fp8: bool = False) -> int:
    """Pages (including the trash page) that fit in `budget_bytes`."""
    return int(budget_bytes // (page_size * bytes_per_token(cfg, itemsize, mtp, index_fp8)))


def page_keys(tokens, page_size: int, extra: int = 0) -> list[bytes]:
    """The prefix-table key of each full page of `tokens`: a hash of every token up to that page's end, plus
    `extra` tokens after it (1 with MTP speculation: the MTP latent of a page's last slot depends on the token
    after the page). Pages whose key would need tokens past the end get none."""
    keys, h = [], hashlib.blake2b(digest_size=16)
    for i in range((len(tokens) - extra) // page_size):
        h.update(np.asarray(tokens[i * page_size:(i + 1) * page_size], np.int64).tobytes())
        tail = np.asarray(tokens[(i + 1) * page_size:(i + 1) * page_size + extra], np.int64).tobytes()
        keys.append(hashlib.blake2b(h.copy().digest() + tail, digest_size=16).digest() if extra else h.copy().digest())
    return keys


class PoolExhausted(Exception):
    """No free or evictable page: the scheduler waits or preempts."""


class PagePool:
    """Host bookkeeping of the device pool: free list, reference counts, the prefix table."""

    def __init__(self, pages: int, page_size: int):
        if pages < 2:
            raise ValueError(f"a page pool needs at least 2 pages (one is the trash page), got {pages}")
        self.pages, self.page_size = pages, page_size
        self.free = collections.deque(range(1, pages))
        self.refs = np.zeros(pages, np.int64)
        self.by_key: dict[bytes, int] = {}
        self.key_of: dict[int, bytes] = {}
        self.cached = collections.OrderedDict()  # registered pages with no reference, least recent first
        self.peak_used = 0
        self.hits = 0  # prefix pages reused

    @property
    def available(self) -> int:
        return len(self.free) + len(self.cached)

    @property
    def used(self) -> int:
        return self.pages - 1 - self.available

    def allocate(self, n: int) -> list[int]:
        if n > self.available:
            raise PoolExhausted(n)
        out = []
        for _ in range(n):
            if self.free:
                page = self.free.popleft()
            else:  # evict the least recently released cached prefix page
                page, _ = self.cached.popitem(last=False)
                del self.by_key[self.key_of.pop(page)]
            self.refs[page] = 1
            out.append(page)
        self.peak_used = max(self.peak_used, self.used)
        return out

    def release(self, pages) -> None:
        for page in pages:
            self.refs[page] -= 1
            assert self.refs[page] >= 0, page
            if self.refs[page] == 0:
                if page in self.key_of:
                    self.cached[page] = None
                else:
                    self.free.append(page)

    def lookup(self, keys: list[bytes]) -> list[int]:
        """The cached pages of the longest registered prefix of `keys`, each now referenced once more."""
        out = []
        for k in keys:
            page = self.by_key.get(k)
            if page is None:
                break
            if self.refs[page] == 0:
                self.cached.pop(page)
            self.refs[page] += 1
            out.append(page)
        self.hits += len(out)
        self.peak_used = max(self.peak_used, self.used)
        return out

    def forget_prefixes(self) -> None:
        """Drop the prefix table (the pages' contents are gone): unreferenced cached pages become free."""
        self.free.extend(self.cached)
        self.cached.clear()
        self.by_key.clear()
        self.key_of.clear()

    def register(self, key: bytes, page: int) -> None:
        """Make a full, written page findable by its prefix key (first writer wins)."""
        if key not in self.by_key and page not in self.key_of:
            self.by_key[key] = page
            self.key_of[page] = key
