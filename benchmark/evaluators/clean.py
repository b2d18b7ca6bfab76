"""Clean accuracy on the test split (with a Clopper-Pearson interval)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import EvalContext, EvalResult, Evaluator, predict, proportion


@dataclass(frozen=True)
class CleanParams:
    pass


class CleanAccuracy(Evaluator):
    """Top-1 accuracy on the test split, and on the members (training set) for the generalisation gap."""

    name = "clean"
    description = "clean top-1 accuracy on the test split (and on the training members)"
    version = 1
    Params = CleanParams

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        d = ctx.data
        res = EvalResult()
        test_pred = predict(ctx.model, d.x_test, ctx.device).argmax(1)
        res.metrics["clean.accuracy"] = proportion(int((test_pred == d.y_test).sum()), len(d.y_test))
        res.per_example["clean.correct"] = (test_pred == d.y_test).numpy()
        train_pred = predict(ctx.model, d.x_train, ctx.device).argmax(1)
        res.metrics["clean.train_accuracy"] = proportion(int((train_pred == d.y_train).sum()), len(d.y_train))
        res.metrics["clean.generalization_gap"] = (res.metrics["clean.train_accuracy"]["value"]
                                                   - res.metrics["clean.accuracy"]["value"])
        return res
