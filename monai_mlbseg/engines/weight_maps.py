"""The weight maps of a stage-2 iteration kept for a figure, as a handler."""

from __future__ import annotations

from typing import Any

import torch
from ignite.engine import Engine

from .events import MetaIterationEvents

__all__ = ["WeightMapKeeper"]


class WeightMapKeeper:
    """
    Keeps the weight (trust) maps of the label sources of the latest stage-2 iteration whose slice shows foreground
    in a source's label (of the latest iteration while none has), for the figure: the views, the label of every
    source in them (whatever its name: MLB-Seg's ``initial`` and ``pseudo``, the weak-to-strong ``teacher``...) and
    the weights. A method without label sources has none.

    Example::

        keeper = WeightMapKeeper()
        keeper.attach(trainer)
        trainer.run()
        keeper.maps["weights"]  # [views, sources, H, W]
    """

    def __init__(self) -> None:
        self.maps: dict[str, Any] | None = None
        self.weighting = ""
        self.foreground = False

    def attach(self, engine: Engine) -> None:
        """Keep the maps of every stage-2 iteration when its weights are made."""
        engine.add_event_handler(MetaIterationEvents.WEIGHTS_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        maps = engine.state.weight_maps
        if maps is None or not maps.get("sources"):
            return
        k = maps["num_views"]  # references only: copied to the host once, for the figure
        sources = {str(name): label[:k, 0].detach() for name, label in maps["sources"].items()}
        foreground = bool(torch.stack([label[0].sum() for label in sources.values()]).max() >= 20)  # one sync
        if self.foreground and not foreground:
            return
        self.foreground |= foreground
        self.weighting = type(engine.weighting).__name__
        self.maps = {"views": maps["views"][:k, 0], "weights": maps["weights"][:k], "sources": sources}
