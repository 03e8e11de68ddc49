r"""Recurrent depth with a stopping rule (MATH §7.6): one weight-tied layer iterated until the energy stops falling.

>>> import torch
>>> from unfold.recurrent import RecurrentUnrolled
>>> body = RecurrentUnrolled(["attention", "ffn", "relu"], max_depth=8, d=6, tol=1e-2)
>>> Y, info = body(torch.randn(3, 4, 6), trace="layer")
>>> info["depth_used"].shape, bool((info["depth_used"] <= 8).all())
(torch.Size([3]), True)

Per input, with :math:`E = \sum_{\text{terms}} E_j` the model energy of the tied layer and :math:`Y^\ell` the state
after :math:`\ell` layers, the iteration stops after layer :math:`\ell \ge` ``min_depth`` when

.. math:: E(Y^{\ell-1}) - E(Y^{\ell}) \le \mathrm{tol}\cdot|E(Y^{\ell-1})| ,

i.e. when the relative decrease of the energy falls below ``tol`` (an increase stops it too), or at ``max_depth``.
A stopped input keeps its state (its later steps are the identity), so the output of a batch is the output of each
input run alone, and ``info["depth_used"]`` reports the layers each input used. Every step keeps the guarantee of its
kind (the steps are those of :mod:`unfold.steps`); the stopping rule adds one statement: the reported depth is the
first at which the energy's relative decrease fell below ``tol``.

The forward computes the energy once per layer (the stopping test) and reads one boolean per layer to leave the loop
when every input has stopped (through :func:`energy._validation.value_holds`: under ``vmap`` / tracing transforms the
loop runs to ``max_depth``, with the same result since stopped inputs are frozen).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from energy._validation import EnergyInputError, check_real, value_holds
from unfold.unroller import CheckpointError, ScheduleEntry, Unrolled, register_builder

__all__ = ["RecurrentUnrolled"]


class RecurrentUnrolled(Unrolled):
    """A weight-tied :class:`~unfold.unroller.Unrolled` that stops per input (module docstring).

    Args:
        schedule: the steps of the one tied layer (as :class:`~unfold.unroller.Unrolled`).
        max_depth: the most layers.
        d: token width.
        tol: relative decrease below which an input stops (``≥ 0``).
        min_depth: layers every input runs before the test applies (``1 ≤ min_depth ≤ max_depth``).
        **kwargs: ``alphas``, ``step_kwargs`` of :class:`~unfold.unroller.Unrolled`.
    """

    BUILDER = "RecurrentUnrolled"

    def __init__(self, schedule: Sequence[ScheduleEntry], max_depth: int, d: int, *, tol: float = 1e-3,
                 min_depth: int = 1, **kwargs: Any) -> None:
        if "tied" in kwargs and kwargs.pop("tied") is not True:
            raise EnergyInputError("a recurrent model is weight-tied (one layer iterated); drop `tied` or pass "
                                   "tied=True.")
        super().__init__(schedule, max_depth, d, tied=True, **kwargs)
        self.tol = check_real(tol, "tol", what="(relative energy decrease below which an input stops)")
        if isinstance(min_depth, bool) or not isinstance(min_depth, int) or not 1 <= min_depth <= max_depth:
            raise EnergyInputError(f"`min_depth` must be an int in [1, max_depth = {max_depth}], got {min_depth!r}.")
        self.min_depth = min_depth
        if all(name is None for name in self.term_names):
            raise EnergyInputError("a recurrent model needs an energy for its stopping rule; its schedule "
                                   f"{self.step_kinds} has no energy step.")

    def config(self) -> dict[str, Any]:
        return {**super().config(), "tol": self.tol, "min_depth": self.min_depth}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RecurrentUnrolled:
        try:
            schedule = [(name, dict(kw)) for name, kw in config["schedule"]]
            return cls(schedule, config["depth"], config["d"], tol=config["tol"], min_depth=config["min_depth"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"invalid RecurrentUnrolled config {config!r}: {exc}") from None

    def _total(self, prepared: list[Any], Y: Tensor) -> Tensor:
        steps = self._steps(0)
        return torch.stack([s.energy_at(p, Y) for s, p in zip(steps, prepared[0]) if s.term is not None]).sum(0)

    def _forward(self, Y: Tensor, granularity: str | None,
                 energies: bool) -> Tensor | tuple[Tensor, dict[str, Any]]:
        prepared = self._prepare()
        steps = self._steps(0)
        active = torch.ones(Y.shape[:-2], dtype=torch.bool, device=Y.device)
        used = torch.zeros(Y.shape[:-2], dtype=torch.long, device=Y.device)
        E_prev = self._total(prepared, Y)
        states, ts, t = [Y], [0], 0
        running = True
        for ell in range(self.depth):
            start = Y
            if running:
                for step, prep in zip(steps, prepared[0]):
                    Y = torch.where(active[..., None, None], step.forward_prepared(prep, Y), start)
                    t += 1
                    if granularity == "step":
                        states.append(Y)
                        ts.append(t)
                used = used + active.long()
                E = self._total(prepared, Y)
                if ell + 1 >= self.min_depth:
                    stop = (E_prev - E) <= self.tol * E_prev.abs()
                    active = active & ~stop
                E_prev = torch.where(active, E, E_prev)
                running = value_holds(active.any())
            else:  # every input has stopped: the remaining layers are the identity
                for _ in steps:
                    t += 1
                    if granularity == "step":
                        states.append(Y)
                        ts.append(t)
            if granularity == "layer":
                states.append(Y)
                ts.append(t)
            if granularity is None and not running:
                break
        if granularity is None:
            return Y
        info: dict[str, Any] = {"states": states, "t": ts, "energies": {}, "step_names": self.step_kinds * self.depth,
                                "layer_of_state": self._layer_of_state(ts), "trace": granularity, "depth_used": used}
        if energies:
            values: dict[tuple[str, int], Tensor] = {}
            for i in range(len(states)):
                self._evaluate_missing(states, 0, prepared, values, i)
            info["energies"] = self._collect(values, len(states))
        return Y, info


register_builder("RecurrentUnrolled", RecurrentUnrolled.from_config)
