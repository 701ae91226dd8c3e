"""The ``lmms_eval.models`` entry point: ``--model metacompress`` names ``mc_lmms.model``.

lmms-eval calls ``manifest()`` when it builds its model registry; the class itself is imported
only when the model is requested.
"""

from __future__ import annotations

MODEL_ID = "metacompress"


def manifest():
    """The registration payload lmms-eval 0.7 reads from the entry point."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path="mc_lmms.model.MetaCompress")
