"""jaxtickets: tickets (masks, scores, signs) inside randomly initialized networks, in JAX."""

from jaxtickets.errors import UserError

__all__ = ["UserError"]
__version__ = "0.1.0"
