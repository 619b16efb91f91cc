"""The model families: a registry of ``Family`` values, detection and parameterisation."""

from latentforge.families import catalog as _catalog  # noqa: F401  (registers the built-in families)
from latentforge.families.base import Family, Signature, TextEncoderSpec, families, get_family, register

__all__ = ["Family", "Signature", "TextEncoderSpec", "families", "get_family", "register"]
