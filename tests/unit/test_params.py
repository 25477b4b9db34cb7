import msgspec
import pytest

from tandem.engine import SamplingParams


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"stop": [""]}, "stop"),
    ({"seed": 1.5}, "seed"),
])
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_defaults_and_normalisation():
    p = SamplingParams(stop=["a", "b"], stop_token_ids=[3])
    assert p.max_tokens == 16 and p.temperature == 1.0 and p.top_k == 0 and p.top_p == 1.0
    assert p.stop == ("a", "b") and p.stop_token_ids == (3,)
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(stop="x").stop == ("x",)


def test_params_survive_msgpack():
    p = SamplingParams(max_tokens=5, temperature=0.7, top_k=3, seed=9, stop=("!",))
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(p), type=SamplingParams) == p
