"""A projection stored as two factors, the storage of the manifold (low-rank) option.

``W ~ B A`` with ``A`` (rank, in) and ``B`` (out, rank): ``rank * (in + out)`` parameters instead of ``in * out``. A
decoder layer's optional ``ranks`` field (``{"q_proj": 96, "down_proj": 160, ...}``) makes those projections
`NexusLowRankLinear`; the others stay ``nn.Linear``. The factors are ordinary ``nn.Linear`` modules (``factor_a``:
in -> rank, no bias; ``factor_b``: rank -> out, with the projection's bias), so PEFT can target them by name
(``target_modules=["factor_a", "factor_b"]``) and bitsandbytes quantises them like any other linear.
"""

from torch import nn

# the projections a layer's ``ranks`` may factorise
FACTORISABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class NexusLowRankLinear(nn.Module):
    """``factor_b(factor_a(x))``: a rank-``rank`` linear map from ``in_features`` to ``out_features``."""

    def __init__(self, in_features, out_features, rank, bias=False):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.factor_a = nn.Linear(in_features, rank, bias=False)
        self.factor_b = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x):
        return self.factor_b(self.factor_a(x))


def projection(in_features, out_features, bias, rank=None):
    """``nn.Linear``, or its factored form when the layer spec gives the projection a ``rank``."""
    if rank is None:
        return nn.Linear(in_features, out_features, bias=bias)
    return NexusLowRankLinear(in_features, out_features, rank, bias=bias)
