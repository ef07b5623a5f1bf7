"""The budgeted fit's learning-rate schedule (tfseg.fit.budget.BudgetCosine) against the cosine
written out in numpy, before and after its end moves."""

import math

import numpy as np
import pytest

keras = pytest.importorskip("keras")


def _cosine(lr, step, end):
    return 0.5 * lr * (1 + math.cos(math.pi * min(step / end, 1.0)))


def test_cosine_follows_its_end_as_it_moves_and_matches_keras():
    from tfseg.fit.budget import BudgetCosine

    schedule = BudgetCosine(2e-3, 100)
    steps = [0, 1, 25, 50, 99, 100, 180]
    np.testing.assert_allclose([float(schedule(s)) for s in steps], [_cosine(2e-3, s, 100) for s in steps], rtol=1e-5, atol=1e-9)
    reference = keras.optimizers.schedules.CosineDecay(2e-3, decay_steps=100)
    np.testing.assert_allclose([float(schedule(s)) for s in steps], [float(reference(s)) for s in steps], rtol=1e-5, atol=1e-9)
    schedule.end_at(400)
    np.testing.assert_allclose([float(schedule(s)) for s in steps], [_cosine(2e-3, s, 400) for s in steps], rtol=1e-5, atol=1e-9)
    assert BudgetCosine.from_config(schedule.get_config()).get_config() == {"initial_learning_rate": 2e-3,
                                                                             "decay_steps": 400}


def test_a_training_step_reads_the_end_set_after_compiling():
    from tfseg.fit.budget import BudgetCosine

    schedule = BudgetCosine(0.1, 10_000)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
    model.compile(optimizer=keras.optimizers.SGD(schedule), loss="mse")
    x, y = np.ones((1, 2), "float32"), np.ones((1, 1), "float32")
    model.fit(x, y, epochs=1, verbose=0)  # traced with the far end
    schedule.end_at(2)  # the budget decided: the cosine ends after step 2
    w0 = model.get_weights()[0].copy()
    model.fit(x, y, epochs=1, verbose=0)  # step 1 of 2: lr = 0.05
    grad = 2 * (w0.sum() - 1.0)  # d/dw (x.w - 1)^2 with x = (1, 1)
    np.testing.assert_allclose(model.get_weights()[0], w0 - _cosine(0.1, 1, 2) * grad, rtol=1e-5, atol=1e-9)
    w1 = model.get_weights()[0].copy()
    model.fit(x, y, epochs=1, verbose=0)  # step 2: past the end, lr 0
    np.testing.assert_allclose(model.get_weights()[0], w1, rtol=1e-6)


def _drive(controller, clock, epoch_seconds, steps):
    """Run the callback through epochs whose durations are given, on a fake clock."""
    controller.set_model(type("M", (), {"stop_training": False})())
    epochs = 0
    for seconds in epoch_seconds:
        for _ in range(steps):
            clock[0] += seconds / steps
            controller.on_train_batch_end(0)
        controller.on_epoch_end(epochs)
        epochs += 1
        if controller.model.stop_training:
            break
    return epochs


def test_a_fixed_end_moves_earlier_when_epochs_slow_down(monkeypatch):
    from tfseg.fit import budget

    clock = [0.0]
    monkeypatch.setattr(budget.time, "time", lambda: clock[0])
    records = []
    schedule = budget.BudgetCosine(1e-3, 10_000)
    controller = budget.BudgetController(budget_seconds=100, started=0.0, steps_per_epoch=10, first_epoch=0,
                                         resolved=None, schedule=schedule, on_resolved=records.append)
    # Epochs of 2 s while the end is measured and fixed, then another job halves the pace.
    durations = [2.0] * 10 + [4.0] * 100
    epochs = _drive(controller, clock, durations, 10)
    assert records[0]["epochs"] == 47  # 95 s left at 2 s an epoch, after the first
    fixed = next(r for r in records if r["final"] and "revised_after_epoch" not in r)
    assert fixed["epochs"] == 47
    last = records[-1]
    assert last["revised_after_epoch"] > 10 and last["epochs"] < fixed["epochs"] and epochs == last["epochs"]
    assert clock[0] <= 95 + 2.0  # within the budget less its reserve, give or take half an epoch at 4 s
    assert float(schedule.decay_steps.numpy()) == last["epochs"] * 10
    # Without the slowdown nothing is revised: the end decided is the end reached.
    clock[0], records[:] = 0.0, []
    steady = budget.BudgetController(budget_seconds=100, started=0.0, steps_per_epoch=10, first_epoch=0,
                                     resolved=None, schedule=None, on_resolved=records.append)
    assert _drive(steady, clock, [2.0] * 100, 10) == 47 and not any("revised_after_epoch" in r for r in records)
    # A resumed run keeps the end it was given, whatever the pace.
    clock[0] = 0.0
    resumed = budget.BudgetController(budget_seconds=100, started=0.0, steps_per_epoch=10, first_epoch=0,
                                      resolved=30, schedule=None, on_resolved=records.append)
    assert _drive(resumed, clock, [4.0] * 100, 10) == 30
