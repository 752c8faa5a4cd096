import pytest

from sbora_core.method.config import SBoRAConfig


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"variant": "dora"}, "variant"),
        ({"r": 0}, "r"),
        ({"r": -3}, "r"),
        ({"r": 2.5}, "r"),
        ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"target_modules": []}, "target_modules"),
        ({"index_seed": -1}, "index_seed"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}:"):
        SBoRAConfig(**kwargs)


def test_defaults_and_round_trip():
    config = SBoRAConfig(variant="sbora_fb", r=4, alpha=8, target_modules="q_proj")
    assert config.scaling == 2.0
    assert config.target_modules == ["q_proj"]
    assert SBoRAConfig.from_dict(config.to_dict()) == config
    assert SBoRAConfig(target_modules="all-linear").target_modules == "all-linear"
