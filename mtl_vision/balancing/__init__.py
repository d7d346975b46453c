"""Loss-weighting and gradient-aggregation strategies behind one interface, one file each."""

from mtl_vision.balancing.base import Balancer
from mtl_vision.balancing.ew import EqualWeighting
from mtl_vision.balancing.fixed import FixedWeighting

__all__ = ["Balancer", "EqualWeighting", "FixedWeighting"]
