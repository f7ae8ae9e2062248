import json
import re
from dataclasses import fields

import pytest

from potion import PotionError
from potion.config import (
    SECTIONS,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    load_preset,
    preset_names,
    resolve,
)


def test_presets_load():
    names = preset_names()
    assert {"tiny", "shakespeare-char", "gpt2"} <= set(names)
    sc = load_preset("shakespeare-char").model
    assert (sc.n_layer, sc.n_head, sc.n_embd, sc.context_length, sc.dropout) == (6, 6, 384, 256, 0.2)
    # the GPU recipe trains the same model, so its figures compare with shakespeare-char's
    assert load_preset("shakespeare-gpu").model == sc
    assert resolve("shakespeare-gpu", None, []).train.optimizer == "muon"


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


FLOAT_FIELDS = [(s, f.name) for s, klass in SECTIONS.items() for f in fields(klass) if f.type == "float"]


@pytest.mark.parametrize("section, name", FLOAT_FIELDS)
@pytest.mark.parametrize("text", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused_wherever_they_enter(section, name, text, tmp_path):
    message = re.escape(f"{section}.{name} must be a finite number, got {float(text)}")
    with pytest.raises(PotionError, match=message):  # --set
        apply_overrides(load_preset("tiny"), [f"{section}.{name}={text}"])
    toml = tmp_path / "c.toml"
    toml.write_text(f"[{section}]\n{name} = {text}\n")
    with pytest.raises(PotionError, match=message):  # a TOML file
        resolve("tiny", str(toml))
    with pytest.raises(PotionError, match=message):  # Python
        SECTIONS[section](**{name: float(text)})
    with pytest.raises(PotionError, match=message):  # config.json (Python's json reads NaN and Infinity)
        RunConfig.from_dict(json.loads(json.dumps({section: {name: float(text)}})))


@pytest.mark.parametrize(
    "item, message",
    [
        ("beta2=1.5", "train.beta2 must be in [0, 1), got 1.5"),
        ("beta1=1", "train.beta1 must be in [0, 1), got 1.0"),
        ("beta1=-0.1", "train.beta1 must be in [0, 1), got -0.1"),
        ("weight_decay=-1", "train.weight_decay must be at least 0, got -1.0"),
        ("grad_clip=-0.5", "train.grad_clip must be at least 0, got -0.5"),
        ("min_lr_ratio=2", "train.min_lr_ratio must be in [0, 1], got 2.0"),
        ("decay_fraction=1.5", "train.decay_fraction must be in [0, 1], got 1.5"),
        ("max_time=-5", "train.max_time must be at least 0, got -5.0"),
        ("stop_at_loss=-1", "train.stop_at_loss must be at least 0, got -1.0"),
        ("muon_lr=0", "train.muon_lr must be positive, got 0.0"),
        ("learning_rate=-1e-3", "train.learning_rate must be positive, got -0.001"),
        ("seed=-1", "train.seed must be between 0 and 2**63 - 1, got -1"),
        ("seed=9223372036854775808", "train.seed must be between 0 and 2**63 - 1, got 9223372036854775808"),
        ("rope_base=0.5", "model.rope_base must be at least 1, got 0.5"),
        ("logit_softcap=-30", "model.logit_softcap must be in [0, 10000], got -30.0"),
        ("logit_softcap=1e308", "model.logit_softcap must be in [0, 10000], got 1e+308"),
        ("dropout=1", "model.dropout must be in [0, 1), got 1.0"),
        ("val_fraction=nan", "data.val_fraction must be a finite number, got nan"),
        (
            "bpe_vocab_size=99999999999",
            "data.bpe_vocab_size must be between 257 (256 bytes + end of text) and 16,777,216",
        ),
    ],
)
def test_out_of_range_numbers_that_would_fail_later(item, message):
    with pytest.raises(PotionError, match=re.escape(message)):
        apply_overrides(load_preset("tiny"), [item])


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: ModelConfig(n_layer=2.5), "model.n_layer must be an integer, got float 2.5"),
        (lambda: ModelConfig(bias="yes"), "model.bias must be true or false, got str 'yes'"),
        (lambda: TrainConfig(learning_rate="fast"), "train.learning_rate must be a number, got str 'fast'"),
        (lambda: TrainConfig(max_steps=True), "train.max_steps must be an integer, got bool True"),
        (lambda: DataConfig(data=None), "data.data must be a string, got NoneType None"),
    ],
)
def test_python_constructors_check_types(build, message):
    with pytest.raises(PotionError, match=re.escape(message)):
        build()
    assert TrainConfig(learning_rate=1).learning_rate == 1.0 and type(TrainConfig(max_time=5).max_time) is float
