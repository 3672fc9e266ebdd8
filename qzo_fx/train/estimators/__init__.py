"""Gradient estimators: settings objects that own their step (see :mod:`.base`)."""
from __future__ import annotations

from qzo_fx.train.estimators.base import Estimator
from qzo_fx.train.estimators.fogzo import FOGZO, beta_for_share
from qzo_fx.train.estimators.nspsa import NSPSA, ZOSign
from qzo_fx.train.estimators.ste import STE
from qzo_fx.train.estimators.zoqo import ZOQO

__all__ = ["STE", "FOGZO", "NSPSA", "ZOSign", "ZOQO", "Estimator", "beta_for_share"]
