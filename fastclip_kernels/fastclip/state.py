"""Per-sample FastCLIP state on the device, sharded across ranks by global sample index.

Sample ``idx`` lives on rank ``idx % K`` at slot ``idx // K``; each rank holds ceil((N - rank)/K)
slots. Per slot and modality (0 = image anchor, 1 = text anchor):

    log_u       log of the moving-average estimator u of g (log domain: g can reach e^200 at
                s = 100, far past fp32; -inf means "never visited")
    tau         per-sample temperature (``per_sample_tau`` only; RGCL / FastCLIP-v2)
    exp_avg     Adam first moment of tau's gradient (``per_sample_tau`` only)
    exp_avg_sq  Adam second moment (``per_sample_tau`` only)

Bytes per sample: 8 (log_u) or 32 (per-sample tau) in fp32. At N = 400M samples that is 3.2 GB or
12.8 GB in all, i.e. 0.4 GB or 1.6 GB per rank at K = 8. The buffers are ordinary module buffers,
so ``state_dict()`` / ``load_state_dict()`` checkpoint each rank's shard; the extra state records
(data_size, world_size, rank) and a load with a different sharding is refused.
"""

import math

import torch
import torch.distributed as dist
from torch import nn

from ..ops.state_update.naive import owned_slots

FIELDS_U = ("log_u",)
FIELDS_TAU = ("tau", "exp_avg", "exp_avg_sq")


def shard_size(data_size: int, rank: int, world_size: int) -> int:
    """Number of global indices idx in [0, data_size) with idx % world_size == rank."""
    return max(0, -(-(data_size - rank) // world_size))


class FastCLIPState(nn.Module):
    """Device-resident, rank-sharded u (and per-sample tau with its Adam moments).

    Args:
        data_size (int): N, one more than the largest global sample index.
        rank, world_size (int): this rank and the number of ranks sharing the state.
        per_sample_tau (bool): keep tau and Adam moments per sample (mode ``rgcl``).
        tau_init (float): initial per-sample temperature.
        device, dtype: where the buffers live; fp32 by default (fp64 for exactness tests).
    """

    def __init__(
        self,
        data_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        per_sample_tau: bool = False,
        tau_init: float = 0.07,
        device=None,
        dtype=torch.float32,
    ):
        super().__init__()
        if not isinstance(data_size, int) or data_size < 2:
            raise ValueError(f"data_size must be an int >= 2, got {data_size!r}")
        self.data_size, self.rank, self.world_size = data_size, rank, world_size
        self.per_sample_tau = per_sample_tau
        size = (2, shard_size(data_size, rank, world_size))
        self.register_buffer("log_u", torch.full(size, -math.inf, device=device, dtype=dtype))
        if per_sample_tau:
            self.register_buffer("tau", torch.full(size, float(tau_init), device=device, dtype=dtype))
            self.register_buffer("exp_avg", torch.zeros(size, device=device, dtype=dtype))
            self.register_buffer("exp_avg_sq", torch.zeros(size, device=device, dtype=dtype))

    def owned_slots(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(owned [n] bool, slot [n] int64): which global indices this rank stores, and where.
        Out-of-range indices are owned by no rank (never written); slots of indices this rank does
        not own are clamped into range (read, never used unmasked)."""
        return owned_slots(indices, self.rank, self.world_size, self.log_u.shape[1])

    def fetch(self, indices: torch.Tensor, group=None, collective: bool = True) -> dict[str, torch.Tensor]:
        """{'log_u': [2, n], 'tau': [2, n] if per_sample_tau} for the global batch ``indices`` [n].

        Each rank contributes the entries it owns (zeros elsewhere) to ONE all_reduce(SUM) of a
        [F, 2, n] buffer, so every rank gets every value exactly (x + 0 = x). No host sync.
        ``collective=False`` returns this rank's contribution only (tests, tools).
        """
        owned, slot = self.owned_slots(indices)
        names = ("log_u", "tau") if self.per_sample_tau else ("log_u",)
        values = torch.stack([getattr(self, name)[:, slot] for name in names])
        values = torch.where(owned, values, torch.zeros((), dtype=values.dtype, device=values.device))
        if self.world_size > 1 and collective:
            dist.all_reduce(values, group=group)
        return dict(zip(names, values.unbind(0), strict=True))

    def get_extra_state(self):
        return {"data_size": self.data_size, "rank": self.rank, "world_size": self.world_size}

    def set_extra_state(self, state) -> None:
        mine = self.get_extra_state()
        if state != mine:
            raise ValueError(
                f"FastCLIP state checkpoint was saved with {state}, this state is {mine}: "
                "load it with the same data_size, rank and world_size"
            )
