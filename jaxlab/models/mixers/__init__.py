"""Token mixers (attention, PaTH, Mamba-2, Gated DeltaNet, ...) behind one interface."""

from jaxlab.models.mixers.base import get_mixer_factory, known_mixers, register_mixer

__all__ = ["get_mixer_factory", "known_mixers", "register_mixer"]
