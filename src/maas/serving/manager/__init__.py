"""The model manager: which versions are loaded (:mod:`.loading`), which one each bare name means and how it is
deployed (:mod:`.watching`), and the lookups requests make (:mod:`.manager`)."""

from maas.serving.manager.loading import IDLE_UNLOAD_S, RETRY_FAILED_S, LoadedModel, Loading
from maas.serving.manager.manager import ModelManager

__all__ = ["IDLE_UNLOAD_S", "RETRY_FAILED_S", "LoadedModel", "Loading", "ModelManager"]
