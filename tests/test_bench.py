import pytest

from ladderlm.bench import recipe_rate
from ladderlm.config import load_config


def test_recipe_rate_weights_each_step_by_its_passes():
    rates = {"ladder_train_passes": 100.0, "ladder_early_passes": 800.0}
    plain = load_config("bench", overrides=["train.early_passes=0", "train.early_passes_iters=0"])
    assert recipe_rate("ladder", rates, plain) == 100.0
    schedule = load_config("bench")  # 1950 of 2000 steps at one pass
    assert recipe_rate("ladder", rates, schedule) == pytest.approx(2000 / (50 / 100 + 1950 / 800))
    longer = load_config("bench", overrides=["train.max_iters=100"])
    assert recipe_rate("ladder", rates, longer) == 800.0  # every step is an early one
