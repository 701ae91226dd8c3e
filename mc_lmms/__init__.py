"""MetaCompress inside lmms-eval: a model plugin and a multi-turn task generator.

- ``mc_lmms.model``: ``--model metacompress`` (registered through the ``lmms_eval.models``
  entry point by ``mc_lmms.registration``); any base model, any compressor, multi-turn dialogues
  as one ``mc_core.inference.conversation.Conversation`` each (compress once, reuse the KV cache).
- ``mc_lmms.tasks``: writes an lmms-eval task folder from any dialogue dataset
  (``python -m mc_lmms.tasks data/test out/ --name mt_gqa``).
- ``mc_lmms.task_utils``: the callbacks such a task uses (scoring = ``mc_core.evaluation.runner``).
- ``mc_lmms.loading``: ``model_args`` -> base model and compressor.
- ``mc_lmms.compare``: lmms-eval's per-turn accuracies beside the evaluator's report.

Only ``mc_lmms.model`` and ``mc_lmms.registration`` import lmms-eval, which lives in its own
venv (``make lmms-env``, docs/lmms-eval.md).
"""
