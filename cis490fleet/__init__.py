"""cis490fleet: coordinate training jobs across a lab fleet; every job trained at most once."""

__version__ = "0.1.0"
