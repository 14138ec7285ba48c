"""Cross-entropy losses: on logits (``softmax_cross_entropy``, ``sigmoid_binary_cross_entropy``)
and fused with the output projection (``linear_softmax_cross_entropy``), which never forms
the logits."""

from stablelayers.losses._cross_entropy import mean_over_valid, softmax_cross_entropy
from stablelayers.losses._linear_cross_entropy import linear_softmax_cross_entropy
from stablelayers.losses._sigmoid_cross_entropy import sigmoid_binary_cross_entropy
from stablelayers.losses._vocab_parallel import linear_softmax_cross_entropy_sharded

__all__ = [
    "linear_softmax_cross_entropy",
    "linear_softmax_cross_entropy_sharded",
    "mean_over_valid",
    "sigmoid_binary_cross_entropy",
    "softmax_cross_entropy",
]
