"""Server-side DP-FedAvg math (pure numpy, no I/O): the stages of a round close.

`accumulator.RoundAccumulator` sums uploads one at a time (zero, clip), `fedavg.finalize_round`
adds the DP noise (`dp`, `gaussian_noise`, `queries`), applies the server optimizer
(`optimizers`) and finalizes the metrics (`metrics`). Follows TFF 0.87's
`build_unweighted_fed_avg` with the `DifferentiallyPrivateFactory` aggregators:
`gaussian_fixed` (McMahan et al. 2018, arXiv 1710.17220), `gaussian_adaptive`
(`adaptive_clipping`, Andrew et al. 2021, arXiv 1905.03871), `tree_aggregation` and
`tree_adaptive` (`tree_queries`, DP-FTRL, Kairouz et al. 2021, arXiv 2103.00039).
"""

from fcp_server.aggregation.accumulator import AddResult, RoundAccumulator
from fcp_server.aggregation.fedavg import RoundOutcome, finalize_evaluation, finalize_round
from fcp_server.aggregation.gaussian_noise import make_noise_rng
from fcp_server.aggregation.state import ClientUpdate, ModelWeights, ServerState

__all__ = [
    "AddResult",
    "ClientUpdate",
    "ModelWeights",
    "RoundAccumulator",
    "RoundOutcome",
    "ServerState",
    "finalize_evaluation",
    "finalize_round",
    "make_noise_rng",
]
