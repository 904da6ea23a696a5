"""The best evaluation and early stopping against transformers' own code fed the same metric sequences:
``Trainer._determine_best_metric`` (which step is best) and ``EarlyStoppingCallback`` (when to stop)."""

import random
from types import SimpleNamespace

import pytest

from ds_scalora.train import best
from ds_scalora.train.config import EvalConfig, TrainConfig


def _sequences():
    rng = random.Random(0)
    for _ in range(40):
        n = rng.randint(1, 12)
        # coarse values so that ties and near-ties (within a threshold) happen
        yield [round(rng.uniform(0.0, 1.0), 1) for _ in range(n)]


@pytest.mark.parametrize("metric,greater", [("eval_loss", None), ("loss", False), ("eval_exact_match", None),
                                            ("eval_exact_match", True)])  # fmt: skip
def test_best_step_is_the_trainers(metric, greater):
    from transformers import Trainer
    from transformers.trainer_utils import SaveStrategy

    train = TrainConfig(metric_for_best_model=metric, greater_is_better=greater)
    hf_greater = best.greater_is_better(train)
    assert hf_greater == (metric == "eval_exact_match")  # the Trainer's default: a loss is better lower
    for values in _sequences():
        hf = SimpleNamespace(args=SimpleNamespace(metric_for_best_model=metric, greater_is_better=hf_greater,
                                                  save_strategy=SaveStrategy.STEPS),
                             state=SimpleNamespace(best_metric=None, best_global_step=None, global_step=0))  # fmt: skip
        history = []
        for step, value in enumerate(values, 1):
            hf.state.global_step = step
            Trainer._determine_best_metric(hf, metrics={best.metric_key(metric): value}, trial=None)
            history.append({"step": step, best.metric_key(metric): value})
        assert best.best_record(history, train)["step"] == hf.state.best_global_step


@pytest.mark.parametrize("threshold", [0.0, 0.15])
@pytest.mark.parametrize("patience", [1, 2, 3])
def test_early_stopping_stops_where_the_callback_stops(patience, threshold):
    from transformers import EarlyStoppingCallback

    train = TrainConfig(metric_for_best_model="eval_loss", early_stopping_patience=patience,
                        early_stopping_threshold=threshold)  # fmt: skip
    stops = 0
    for values in _sequences():
        callback = EarlyStoppingCallback(early_stopping_patience=patience, early_stopping_threshold=threshold)
        args = SimpleNamespace(metric_for_best_model="eval_loss", greater_is_better=False)
        state, control = SimpleNamespace(best_metric=None), SimpleNamespace(should_training_stop=False)
        history, hf_stop, our_stop = [], None, None
        for step, value in enumerate(values, 1):
            callback.on_evaluate(args, state, control, metrics={"eval_loss": value})
            if state.best_metric is None or value < state.best_metric:  # the Trainer updates it after on_evaluate
                state.best_metric = value
            history.append({"step": step, "eval_loss": value})
            if control.should_training_stop and hf_stop is None:
                hf_stop = step
            if our_stop is None and best.evaluations_without_improvement(history, train) >= patience:
                our_stop = step
        assert our_stop == hf_stop, values
        stops += hf_stop is not None
    assert stops > 5  # the sequences do exercise stopping


def test_best_among_saved_skips_evaluations_without_a_checkpoint():
    train = TrainConfig(metric_for_best_model="eval_loss")
    history = [{"step": 2, "eval_loss": 0.5, "saved": True}, {"step": 3, "eval_loss": 0.1},
               {"step": 4, "eval_loss": 0.3, "saved": True}, {"step": 5, "loss": 0.0}]  # fmt: skip
    assert best.best_record(history, train)["step"] == 3
    assert best.best_record(history, train, saved_only=True)["step"] == 4


@pytest.mark.parametrize("fields,message", [
    ({"load_best_model_at_end": True, "metric_for_best_model": "accuracy"}, "not a metric of the run's evaluation"),
    ({"early_stopping_patience": 2, "eval_steps": 0}, "need train.eval_steps > 0"),
    ({"load_best_model_at_end": True, "eval_steps": 4, "save_steps": 6}, "save_steps a multiple of train.eval_steps"),
    ({"early_stopping_patience": 1, "metric_for_best_model": "exact_match"}, "needs eval.exact_match"),
])  # fmt: skip
def test_settings_that_cannot_work_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        best.check(TrainConfig(**fields), EvalConfig())
