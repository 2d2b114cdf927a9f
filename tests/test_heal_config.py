import dataclasses
import math

import pytest
import torch

from selfheal_ext import HealerConfig, SelfHealer
from selfheal_ext.governance import AuditLog


def test_every_setting_names_its_meaning_and_source():
    rows = HealerConfig.describe()
    assert len(rows) == len(dataclasses.fields(HealerConfig)) >= 40
    for row in rows:
        assert row["meaning"].strip() and row["source"].strip(), row["name"]


def test_keyword_arguments_override_the_config_and_the_rest_comes_from_it():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    base = HealerConfig(lr=5e-4, label_shift=2, keep_versions=3)
    healer = SelfHealer(model, config=base, lr=2e-3, monitor_options={"window": 32})
    assert healer.config.lr == 2e-3 and healer.config.keep_versions == 3
    assert isinstance(healer.config.label_shift, float) and healer.config.label_shift == 2.0
    assert base.lr == 5e-4  # the given config is left as it was
    assert SelfHealer(model).config == HealerConfig()
    healer.calibrate([torch.randn(32, 4) for _ in range(8)])
    assert healer.state_dict()["config"] == healer.config.as_dict()
    assert HealerConfig.from_dict(healer.config.as_dict()) == healer.config


@pytest.mark.parametrize("changes, message", [
    ({"lr": 0.0}, "lr must be > 0"), ({"mode": "eager"}, "mode must be"), ({"entropy_margin": 1.5}, "entropy_margin"),
    ({"check_split": 2.0}, "check_split must be in"), ({"keep_versions": 0}, "must be >= 1"),
    ({"norm_prior": math.inf}, "norm_prior"), ({"approval": True, "mode": "deferred"}, "approval mode runs inline"),
])
def test_bad_settings_are_refused_with_their_name(changes, message):
    with pytest.raises(ValueError, match=message):
        HealerConfig(**changes)
    if "check_split" not in changes:  # (a setting of the config only, not a keyword argument)
        with pytest.raises(ValueError, match=message):
            SelfHealer(torch.nn.Sequential(torch.nn.Linear(4, 3)), **changes)


def test_unknown_settings_and_wrong_types_are_refused():
    with pytest.raises(TypeError, match="no setting"):
        HealerConfig().replace(learning_rate=1.0)
    with pytest.raises(TypeError, match="no setting"):
        HealerConfig.from_dict({"learning_rate": 1.0})
    with pytest.raises(TypeError, match="HealerConfig"):
        SelfHealer(torch.nn.Linear(4, 3), config={"lr": 1.0})
    with pytest.raises(dataclasses.FrozenInstanceError):
        HealerConfig().lr = 1.0


def test_the_activation_record_carries_the_config(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 3)).eval()
    audit = str(tmp_path / "audit.db")
    healer = SelfHealer(model, audit=audit, monitor_options={"window": 64}, lr=2e-3)
    healer.calibrate([torch.randn(64, 4) for _ in range(16)])
    for _ in range(6):
        healer(torch.randn(64, 4) * 3 + 4)
    assert healer.active
    healer.audit.close()
    records = [r for r in AuditLog(audit).records() if r.kind == "activate"]
    assert records and records[0].payload["config"]["lr"] == 2e-3
    assert set(records[0].payload["config"]) == {f.name for f in dataclasses.fields(HealerConfig)}


def test_the_docs_table_lists_every_setting_with_its_default():
    import pathlib
    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "healer.md").read_text()
    for row in HealerConfig.describe():
        default = "ln 2" if row["default"] == math.log(2.0) else str(row["default"])
        assert f"| `{row['name']}` | {default} |" in text, row["name"]
