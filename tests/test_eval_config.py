"""EvalConfig: the evaluation settings typed once, extended by the pipeline's evaluate section."""

from __future__ import annotations

import inspect

import pytest

from mc_core.evaluation.config import EvalConfig
from mc_core.evaluation.runner import evaluate
from tasks.params import EvaluateParams


def test_run_kwargs_are_keywords_of_evaluate():
    accepted = inspect.signature(evaluate).parameters
    for key in EvalConfig().run_kwargs():
        assert key in accepted, key


def test_the_pipeline_section_extends_the_library_config():
    assert issubclass(EvaluateParams, EvalConfig)
    section = EvaluateParams(methods=["none"], batch_size=4, history="gold")
    assert section.run_kwargs() == EvalConfig(batch_size=4, history="gold").run_kwargs()


@pytest.mark.parametrize(("key", "value"), [("history", "none"), ("batch_size", 0)])
def test_a_bad_value_names_its_key(key, value):
    with pytest.raises(ValueError, match=key):
        EvalConfig(**{key: value})
