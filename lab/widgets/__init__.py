"""Notebook views on top of ``lab.probe``, ``lab.plots``, ``lab.memory`` and ``lab.flops``.

- ``Composer``: design an architecture, see its size, build it;
- ``AttentionView``: attention patterns of a text, per layer and head, live in training;
- ``RoutingView``: which experts each token goes to, and the load, live in training.
"""

from lab.widgets.attention import AttentionView
from lab.widgets.composer import Composer
from lab.widgets.memory import MemoryView
from lab.widgets.routing import RoutingView
from lab.widgets.training import TrainingView

__all__ = ["AttentionView", "Composer", "MemoryView", "RoutingView", "TrainingView"]
