r"""The two preconditioned attention steps of MATH §1.1, named once for the whole library.

.. math::
    \text{(a) } \texttt{METRIC}: P = (D + \lambda I)\otimes W,\quad Y^+ = (1-\alpha)Y + \alpha A Y
    \qquad
    \text{(b) } \texttt{TOKEN}: P = (D + \lambda I)\otimes I,\quad Y^+ = Y - \alpha (Y - A Y) W

with :math:`A = (D + \lambda I)^{-1}\Gamma`. Step (a) has identity values (no value/output map for one head); step
(b) has values :math:`K = Y M` and output map :math:`\kappa M^\top`, i.e. values tied to :math:`W`.
"""

from __future__ import annotations

import enum

__all__ = ["Preconditioner"]


class Preconditioner(str, enum.Enum):
    """Which preconditioner turns the energy's gradient into the attention step (MATH §1.1 (a)/(b)).

    A ``str`` enum: the plain strings ``"metric"`` and ``"token"`` are accepted wherever a member is.

    >>> Preconditioner("token") is Preconditioner.TOKEN
    True
    """

    METRIC = "metric"
    """Step (a): preconditioner :math:`(D + \\lambda I)\\otimes W`, identity values."""
    TOKEN = "token"
    """Step (b): preconditioner :math:`(D + \\lambda I)\\otimes I`, values tied to :math:`W`."""
