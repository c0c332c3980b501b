import pytest

from trainer.injectors import INJECTORS, Injector
from trainer.losses import LOSSES
from utils.registry import Registry, RegistryError, component_name, snake_case


def test_snake_case_and_suffix():
    assert snake_case("TorchMelSpectrogramInjector") == "torch_mel_spectrogram_injector"

    class TorchMelSpectrogramInjector:
        pass

    assert component_name(TorchMelSpectrogramInjector, "injector") == "torch_mel_spectrogram"


def test_builtins_registered_by_snake_case():
    assert {"generator", "for_each"} <= set(INJECTORS.names())
    assert {"direct", "cross_entropy", "l1", "mse"} <= set(LOSSES.names())


def test_subclass_registers_and_explicit_name():
    class ShiftTokensInjector(Injector):
        def forward(self, state):
            return {}

    class Renamed(Injector):
        name = "my_custom_name"

        def forward(self, state):
            return {}

    assert INJECTORS.get("shift_tokens") is ShiftTokensInjector
    assert INJECTORS.get("my_custom_name") is Renamed


def test_duplicate_name_fails():
    reg = Registry("thing")
    reg.add("a", int)
    with pytest.raises(RegistryError, match="registered twice"):
        reg.add("a", float)


def test_wrong_base_fails():
    reg = Registry("thing", base=Exception)
    with pytest.raises(TypeError, match="not a subclass of Exception"):
        reg.add("x", int)


def test_unknown_name_lists_closest():
    reg = Registry("loss")
    for n in ("mse", "l1", "cross_entropy"):
        reg.add(n, object)
    with pytest.raises(RegistryError) as e:
        reg.get("cross_entropi", where="steps.s.losses.ce.type")
    msg = str(e.value)
    assert "steps.s.losses.ce.type" in msg and "did you mean 'cross_entropy'" in msg
    assert "mse" in msg and "l1" in msg
