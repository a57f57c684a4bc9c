"""lab's errors form one family and render as their message alone in IPython."""

import pytest

import lab
from lab.errors import AdapterError, CheckpointError, ConfigError, LabError, NonFiniteLossError


@pytest.mark.parametrize("error", [ConfigError, CheckpointError, AdapterError])
def test_every_error_is_a_lab_error_and_a_value_error(error):
    assert issubclass(error, LabError) and issubclass(error, ValueError)


def test_config_errors_render_short_in_ipython():
    with pytest.raises(ConfigError) as caught:
        lab.Config(n_embd=100, n_head=3)
    lines = caught.value._render_traceback_()
    assert len(lines) == 2
    assert "ConfigError" in lines[0] and "n_embd" in lines[0]
    assert "%tb" in lines[1]


def test_non_finite_loss_error_pickles_with_its_fields():
    import pickle

    error = pickle.loads(pickle.dumps(NonFiniteLossError("nan at step 3", 3, None, None)))
    assert (str(error), error.step) == ("nan at step 3", 3)
    assert isinstance(error, FloatingPointError)
