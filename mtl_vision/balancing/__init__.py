"""Loss-weighting and gradient-aggregation strategies behind one interface, one file each."""

from mtl_vision.balancing.base import Balancer
from mtl_vision.balancing.dwa import DynamicWeightAverage
from mtl_vision.balancing.ew import EqualWeighting
from mtl_vision.balancing.famo import FAMO
from mtl_vision.balancing.fixed import FixedWeighting
from mtl_vision.balancing.gls import GeometricLossStrategy
from mtl_vision.balancing.gradient import GradientBalancer
from mtl_vision.balancing.gradnorm import GradNorm
from mtl_vision.balancing.rlw import RandomLossWeighting
from mtl_vision.balancing.stch import STCH
from mtl_vision.balancing.uncertainty import UncertaintyWeighting

__all__ = [
    "FAMO",
    "STCH",
    "Balancer",
    "DynamicWeightAverage",
    "EqualWeighting",
    "FixedWeighting",
    "GeometricLossStrategy",
    "GradNorm",
    "GradientBalancer",
    "RandomLossWeighting",
    "UncertaintyWeighting",
]
