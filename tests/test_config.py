import pytest

from potion import PotionError
from potion.config import apply_overrides, load_preset, preset_names, resolve


def test_presets_load():
    names = preset_names()
    assert {"tiny", "shakespeare-char", "gpt2"} <= set(names)
    sc = load_preset("shakespeare-char").model
    assert (sc.n_layer, sc.n_head, sc.n_embd, sc.context_length, sc.dropout) == (6, 6, 384, 256, 0.2)


def test_overrides_bare_and_dotted():
    c = resolve("tiny", None, ["n_layer=3", "train.learning_rate=0.01", "tie_embeddings=false", "data=foo.txt"])
    assert c.model.n_layer == 3 and c.train.learning_rate == 0.01 and c.model.tie_embeddings is False
    assert c.data.data == "foo.txt"


def test_config_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[model]\nn_embd = 64\nn_head = 2\n")
    assert resolve("tiny", str(f)).model.n_embd == 64


@pytest.mark.parametrize(
    "item, message",
    [
        ("n_layer", "KEY=VALUE"),
        ("nonsense=1", "unknown config key"),
        ("n_layer=two", "not a valid int"),
        ("positions=sideways", "positions must be one of"),
        ("n_head=5", "divisible"),
        ("model.batch_size=4", "unknown config key"),
    ],
)
def test_bad_overrides(item, message):
    with pytest.raises(PotionError, match=message):
        apply_overrides(load_preset("tiny"), [item])


def test_bad_config_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[model]\nn_layer = 'six'\n")
    with pytest.raises(PotionError, match="expected int"):
        resolve("tiny", str(f))
    f.write_text("[model]\nlayers = 6\n")
    with pytest.raises(PotionError, match="unknown key"):
        resolve("tiny", str(f))
    with pytest.raises(PotionError, match="unknown preset"):
        resolve("huge")
