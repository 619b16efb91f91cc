"""What users apply on top of a loaded model. ``patcher.ModelPatcher`` owns every change to the loaded
networks (weight patches with exact restore, forward hooks, attention context hooks); each adapter
kind is a way of producing such patches and hooks."""

from latentforge.adapters.patcher import ModelPatcher

__all__ = ["ModelPatcher"]
