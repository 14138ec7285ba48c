"""Attention: the public function (``_api``) and its argument checks (``_arguments``), the
masks (``_masks``), the dense path (``_dense``), the chunked (flash) path (``_chunked_layout``
lays the inputs out, ``_chunked_blocks`` holds one block pair's arithmetic,
``_chunked_rule`` the custom_vjp), and ring attention over several devices (``_ring``,
its rule in ``_ring_rule``, shard_map helpers in ``_sharding``)."""

from stablelayers.attention._api import dot_product_attention
from stablelayers.attention._ring import ring_attention, ring_attention_sharded, zigzag_order

__all__ = ["dot_product_attention", "ring_attention", "ring_attention_sharded", "zigzag_order"]
