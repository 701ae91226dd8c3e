"""The code MLflow logs as a registered compressor's model ("models from code").

``mc_registry.mlmodel.save_model`` passes this file as ``python_model``: MLflow copies it into
the model folder and runs it when the model loads, so the model is defined by code, not by a
pickle. It is never imported by the package itself (``set_model`` registers the instance).
"""

from mlflow.models import set_model

from mc_registry.pyfunc import CompressorModel

set_model(CompressorModel())
