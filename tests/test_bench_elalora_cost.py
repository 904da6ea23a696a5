"""The ElaLoRA step-cost benchmark compares what it says: LoRA at the buffer rank and at the budget, and an
ElaLoRA that reallocates during the timed steps."""

import torch

from ds_scalora.bench import elalora_cost


def test_variants_have_the_stated_ranks_and_elalora_reallocates():
    models = elalora_cost.variants(elalora_cost.base_model(layers=1), init_rank=2, max_rank=4, interval=2)
    assert list(models) == ["lora r=4", "lora r=2", "elalora 2 of 4"]
    for name, r in (("lora r=4", 4), ("lora r=2", 2)):
        model = models[name][0]
        assert {m.lora_A["default"].weight.shape[0] for m in model.modules() if hasattr(m, "lora_A")
                and "default" in m.lora_A} == {r}
    ids = torch.randint(0, 49152, (1, 8))
    ratios = elalora_cost.interleaved(models, ids, rounds=1, steps=2)
    assert set(ratios) == {"lora r=2", "elalora 2 of 4"} and all(len(v) == 1 and v[0] > 0 for v in ratios.values())
    ela = models["elalora 2 of 4"][2]
    assert ela.step == 4  # two blocks of 2 steps went through after_backward
    reports = []
    elalora_cost.block(*models["elalora 2 of 4"], ids, steps=3, reports=reports)
    assert [r.step for r in reports] == [4, 5, 6]
    assert reports[0].moves > 0 and reports[0].pruned and reports[0].grown  # a round at step 4 moved ranks
    assert reports[1].moves == 0 and reports[2].moves > 0
    assert sum(ela.rank_pattern().values()) == 2 * len(ela.rank_pattern())  # the budget is kept
    from ds_scalora.bench.console_report import verdict

    assert verdict([1.01, 1.02], 1.05) == "met"
    assert verdict([1.06, 1.10], 1.05).startswith("missed by 0.03")
    assert verdict([1.0, 1.1], 1.05).startswith("undecided")
