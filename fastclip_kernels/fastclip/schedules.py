"""FastCLIP's host-side schedule of the inner learning rate gamma (per epoch): a plain function of
Python numbers (no device reads), so it never synchronizes with a GPU. The global temperature's
``step_thresh`` rule runs on the device: ``GlobalTemperature.step_thresh_``."""

import math

GAMMA_SCHEDULES = ("cosine", "constant")


def gamma_at(epoch: int, gamma_min: float, decay_epochs: int, schedule: str = "cosine") -> float:
    """Inner learning rate gamma of the u estimators at ``epoch`` (FastCLIP, Wei et al. 2024).

    gamma = 1 in epoch 0 (the first visit sets u = g), then for 0 < e < E
        cosine:   0.5 (1 + cos(pi e / E)) (1 - gamma_min) + gamma_min
        constant: gamma_min
    and gamma_min from epoch E = ``decay_epochs`` on. E = 18, gamma_min = 0.2 gives gamma(9) = 0.6.
    """
    if schedule not in GAMMA_SCHEDULES:
        raise ValueError(f"schedule must be one of {GAMMA_SCHEDULES}, got {schedule!r}")
    if not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
    if not 0.0 < gamma_min <= 1.0:
        raise ValueError(f"gamma_min must be in (0, 1], got {gamma_min!r}")
    if not isinstance(decay_epochs, int) or decay_epochs < 1:
        raise ValueError(f"decay_epochs must be a positive int, got {decay_epochs!r}")
    if epoch == 0:
        return 1.0
    if epoch >= decay_epochs or schedule == "constant":
        return gamma_min
    return 0.5 * (1.0 + math.cos(math.pi * epoch / decay_epochs)) * (1.0 - gamma_min) + gamma_min
